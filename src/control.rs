//! The control channel between a controller (singlevm, multivm) and the
//! firerunner it spawned: a connected Unix stream socket the parent passes
//! as `--control_fd N`, carrying one JSON object per line each way.
//!
//! firerunner → parent: [`Event`]s (VM ready, guest signals with their
//! timing, exit). parent → firerunner: [`Command`]s. When the parent's end
//! closes, firerunner stops its VM: a VM never outlives its controller.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use serde::{Deserialize, Serialize};

/// What firerunner reports; `us` is microseconds since firerunner started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The VM is built and its vCPUs are running.
    Ready { us: u64 },
    /// The guest wrote 123 (boot done).
    BootDone { us: u64 },
    /// The guest wrote 124 (snapshot point).
    SnapshotPoint { us: u64 },
    /// The guest wrote 126 (timestamp).
    Timestamp { us: u64 },
    /// The guest wrote 125: its app failed to load.
    AppFailed { us: u64 },
    /// A snapshot was written: at the guest's snapshot point (`--dump_dir`;
    /// firerunner exits 0 next), or for a `snapshot` command (then the VM
    /// resumes or exits, as asked). `dir` is the path as firerunner sees it
    /// (inside a jail: `/snapshots/NAME`). `memory_bytes` is the non-hole
    /// part of the memory file, `create_us` the time from the request to
    /// the snapshot directory in place (the VM is paused all along).
    SnapshotWritten {
        us: u64,
        dir: String,
        memory_bytes: u64,
        create_us: u64,
    },
    /// The working set (`--dump_ws`) was written after the controller's
    /// `ws_done`: `pages` recorded, `data_bytes` in `ws` (zero pages take
    /// none), `faults` served while recording.
    WsWritten {
        us: u64,
        dir: String,
        pages: u64,
        data_bytes: u64,
        faults: u64,
    },
    /// `ws_done` could not be honoured (no recording, or the write failed);
    /// the VM keeps running.
    WsFailed { us: u64, reason: String },
    /// A `snapshot` command was refused or failed; the VM runs on.
    SnapshotFailed { us: u64, reason: String },
    /// A shell (`firerunner shell`) has its VM, vCPUs and memory slots
    /// and waits for `restore`.
    ShellReady { us: u64 },
    /// A `restore` command was refused before the shell was touched; the
    /// shell waits for another. (A snapshot refused while it is restored
    /// ends the shell, with the reason in `exit`.)
    RestoreFailed { us: u64, reason: String },
    /// The VM ended; `code` is firerunner's exit code.
    Exit { code: i32, reason: String },
}

/// What a controller asks of firerunner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Stop the VM and exit 0.
    Shutdown,
    /// The first request is done (`--dump_ws`): stop recording and write
    /// the working set; answered with `ws_written` or `ws_failed`.
    WsDone,
    /// Snapshot the VM now, wherever its vCPUs are, into
    /// `--snapshot_dir`/`name` (a new directory): a full snapshot of a
    /// booted VM, a diff layer over its own layers of a restored one. Then
    /// resume or exit 0, as `then` says. The controller sends it with no
    /// request in flight; vsock connections are reset when the layer is
    /// restored, as after any restore. Answered with `snapshot_written` or
    /// `snapshot_failed`.
    Snapshot { name: String, then: AfterSnapshot },
    /// To a shell: restore the snapshot `layers` (bottom first) into it,
    /// with the flags of the same names (`--rootfs`, `--appfs`, `--id`,
    /// `--copy_base`, `--copy_diff`, `--load_ws`, `--dump_ws`). Answered
    /// with `ready`, and the guest's connection, or `restore_failed`.
    Restore(RestoreRequest),
}

/// What a `restore` command restores; see [`Command::Restore`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub rootfs: PathBuf,
    #[serde(default)]
    pub appfs: Option<PathBuf>,
    pub layers: Vec<PathBuf>,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub copy_base: bool,
    #[serde(default)]
    pub copy_diff: bool,
    #[serde(default)]
    pub load_ws: bool,
    /// `--dump_ws [DIR]`: `""` records into the top layer.
    #[serde(default)]
    pub dump_ws: Option<String>,
}

/// What a VM does after a `snapshot` command wrote its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSnapshot {
    Resume,
    Exit,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("--control_fd {0} is not an open socket")]
    BadFd(RawFd),
    #[error("control channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("control channel: malformed message {line:?}: {source}")]
    Malformed {
        line: String,
        source: serde_json::Error,
    },
}

/// firerunner's end of the control channel.
pub struct Channel {
    writer: Mutex<UnixStream>,
    reader: UnixStream,
}

impl Channel {
    /// Takes ownership of the inherited socket `fd`.
    pub fn from_fd(fd: RawFd) -> Result<Self, ControlError> {
        // Refuse anything that is not an open socket before owning it
        // (fstat, not /proc/self/fd: a jailed firerunner has no /proc).
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes one `struct stat` into `st` or fails (EBADF
        // for a descriptor that is not open); it owns or closes nothing.
        let is_socket = unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0 && {
            // SAFETY: fstat succeeded, so it filled `st`.
            let mode = unsafe { st.assume_init() }.st_mode;
            mode & libc::S_IFMT == libc::S_IFSOCK
        };
        if fd < 0 || !is_socket {
            return Err(ControlError::BadFd(fd));
        }
        // SAFETY: `fd` is an open socket (checked above) that the parent
        // passed for this process alone; nothing else in firerunner owns or
        // closes it, so taking ownership here is sound.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let stream = UnixStream::from(owned);
        let reader = stream.try_clone()?;
        Ok(Self {
            writer: Mutex::new(stream),
            reader,
        })
    }

    /// Sends one event; a parent that went away is only logged.
    pub fn send(&self, event: &Event) {
        let mut line = serde_json::to_string(event).unwrap_or_default();
        line.push('\n');
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = w.write_all(line.as_bytes()) {
            log::debug!("control channel: cannot send {event:?}: {e}");
        }
    }

    /// The socket to watch for commands (readable: call
    /// [`Channel::read_commands`]).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.reader.as_fd()
    }

    /// Reads the commands that have arrived, without blocking; `pending`
    /// keeps a partial line between calls. Returns `None` once the parent
    /// has closed its end.
    pub fn read_commands(
        &self,
        pending: &mut Vec<u8>,
    ) -> Result<Option<Vec<Command>>, ControlError> {
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match recv(self.reader.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ControlError::Io(e.into())),
            }
        }
        let mut commands = Vec::new();
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str(&line) {
                Ok(cmd) => commands.push(cmd),
                Err(source) => return Err(ControlError::Malformed { line, source }),
            }
        }
        if closed && commands.is_empty() {
            return Ok(None);
        }
        Ok(Some(commands))
    }
}

/// Parses one event line (the parent's side).
pub fn parse_event(line: &str) -> Result<Event, ControlError> {
    serde_json::from_str(line).map_err(|source| ControlError::Malformed {
        line: line.to_string(),
        source,
    })
}

/// Encodes one command line (the parent's side).
pub fn encode_command(cmd: &Command) -> String {
    let mut s = serde_json::to_string(cmd).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::fd::IntoRawFd;

    #[test]
    fn events_and_commands_are_json_lines() {
        let e = Event::BootDone { us: 12 };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"event":"boot_done","us":12}"#);
        assert_eq!(parse_event(&s).unwrap(), e);
        assert_eq!(
            encode_command(&Command::Shutdown),
            "{\"cmd\":\"shutdown\"}\n"
        );
        assert!(parse_event("{\"event\":\"nope\"}").is_err());
    }

    #[test]
    fn channel_carries_both_directions_and_rejects_non_sockets() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let chan = Channel::from_fd(theirs.into_raw_fd()).unwrap();
        chan.send(&Event::Ready { us: 1 });
        let mut r = BufReader::new(ours.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(parse_event(line.trim()).unwrap(), Event::Ready { us: 1 });
        (&ours)
            .write_all(encode_command(&Command::Shutdown).as_bytes())
            .unwrap();
        drop((ours, r));
        let mut pending = Vec::new();
        let got = chan.read_commands(&mut pending).unwrap();
        assert_eq!(got, Some(vec![Command::Shutdown]));
        assert_eq!(chan.read_commands(&mut pending).unwrap(), None);

        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            Channel::from_fd(file.into_raw_fd()),
            Err(ControlError::BadFd(_))
        ));
    }
}
