//! One function VM as the scheduler sees it: launched (boot or restore),
//! handshaken, called with one request at a time under a deadline, killed.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use crate::control::Event;
use crate::launcher::{Launch, Vm};
use crate::protocol::{self, ProtocolError};

use super::config::{Config, Function};

pub type VmId = u64;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot launch a VM: {0}")]
    Launch(String),
    #[error("the guest agent failed its handshake: {0}")]
    Handshake(ProtocolError),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
    #[error("the function answered invalid JSON: {0}")]
    BadJson(serde_json::Error),
    #[error("request too large: {0}")]
    TooLarge(ProtocolError),
}

/// A launched VM whose guest agent is connected and initialised.
pub struct FunctionVm {
    pub id: VmId,
    /// Index of its function in the config.
    pub function: usize,
    vm: Vm,
    stream: UnixStream,
}

/// Reads and writes a stream against one absolute deadline: every syscall
/// gets the time left as its socket timeout.
struct Deadlined<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::ErrorKind::TimedOut.into())
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn is_timeout(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ))
}

impl FunctionVm {
    /// Starts a VM of `f` (restore when it has `load_dir`, boot otherwise)
    /// with its console in `console`, and waits for its agent.
    pub fn launch(
        cfg: &Config,
        function: usize,
        id: VmId,
        console: &Path,
    ) -> Result<Self, VmError> {
        let f: &Function = &cfg.functions[function];
        let launch = Launch {
            firerunner: cfg.firerunner.clone(),
            vm_args: f.firerunner_args(),
            console: Some(console.to_path_buf()),
        };
        let mut vm = Vm::spawn(&launch).map_err(|e| VmError::Launch(e.to_string()))?;
        let stream = match vm.wait_for_guest(cfg.boot_timeout) {
            Ok(s) => s,
            Err(e) => {
                vm.kill();
                return Err(VmError::Launch(e.to_string()));
            }
        };
        let mut io = Deadlined {
            stream: &stream,
            deadline: Instant::now() + cfg.boot_timeout,
        };
        if let Err(e) = protocol::handshake(&mut io) {
            vm.kill();
            return Err(VmError::Handshake(e));
        }
        Ok(Self {
            id,
            function,
            vm,
            stream,
        })
    }

    /// firerunner's event channel (disconnected once it has exited).
    pub fn events(&self) -> Receiver<Event> {
        self.vm.events().clone()
    }

    /// A second handle on the guest connection; shutting it down makes a
    /// request in progress on this VM fail at once.
    pub fn abort_handle(&self) -> Option<UnixStream> {
        self.stream.try_clone().ok()
    }

    pub fn console(&self) -> PathBuf {
        self.vm.console().to_path_buf()
    }

    /// Whether the VM can take a request: firerunner runs, it has not
    /// reported an exit, and the guest has neither hung up nor sent
    /// anything unasked.
    pub fn is_healthy(&mut self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.vm.try_status().is_some() {
            return false;
        }
        loop {
            match self.vm.events().try_recv() {
                Ok(Event::Exit { .. }) | Err(TryRecvError::Disconnected) => return false,
                Ok(_) => {}
                Err(TryRecvError::Empty) => break,
            }
        }
        let flags = PollFlags::POLLIN;
        let mut fds = [PollFd::new(self.stream.as_fd(), flags)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// Sends one request and waits for its response until `timeout`.
    pub fn call(&mut self, request: &[u8], timeout: Duration) -> Result<Vec<u8>, VmError> {
        let mut io = Deadlined {
            stream: &self.stream,
            deadline: Instant::now() + timeout,
        };
        let result =
            protocol::write_frame(&mut io, request).and_then(|()| protocol::read_frame(&mut io));
        match result {
            Ok(body) => match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                Ok(_) => Ok(body),
                Err(e) => Err(VmError::BadJson(e)),
            },
            Err(e @ ProtocolError::TooLarge(_)) if request.len() > protocol::MAX_FRAME => {
                Err(VmError::TooLarge(e))
            }
            Err(e) if is_timeout(&e) => Err(VmError::Timeout(timeout)),
            Err(e) => Err(VmError::Failed(self.why_broken(&e))),
        }
    }

    /// Explains a broken connection: firerunner's exit, or the error. The
    /// connection breaks a moment before the exit shows, so this waits
    /// (briefly) for the control channel to report or close.
    fn why_broken(&mut self, e: &ProtocolError) -> String {
        let events = self.vm.events().clone();
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut reason = String::new();
        let exited = loop {
            match events.recv_deadline(deadline) {
                Ok(Event::Exit { reason: r, .. }) => {
                    reason = format!(": {r}");
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break true,
                Err(RecvTimeoutError::Timeout) => break false,
            }
        };
        // A closed control channel means the process is exiting: reap it.
        let status = if exited {
            self.vm.wait().ok()
        } else {
            self.vm.try_status()
        };
        match status {
            Some(s) => format!("firerunner exited ({s}){reason}"),
            None => format!("the connection to the guest broke ({e})"),
        }
    }

    /// Kills firerunner (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        self.vm.kill();
    }
}
