//! Spawning firerunner from a controller: a private runtime directory with
//! the vsock sockets and the console, the control channel, waiting for the
//! guest agent to connect, calling it ([`VmProcess::call`], the one request path
//! of singlevm and multivm), and stopping the VM.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};

use crate::control::{self, Event, RestoreRequest};
use crate::jail::{self, JailError, JailOptions, Slot};
use crate::network::{NetworkError, VmNetwork};
use crate::protocol::{self, ProtocolError, AGENT_PORT};
use nix::fcntl::{fcntl, FcntlArg};

/// The fd number firerunner receives its control channel on.
const CONTROL_FD: i32 = 3;
/// The descriptor a networked VM's TAP is passed on (`--tap_fd`); the
/// jailer keeps it open.
pub const TAP_FD: i32 = 4;
/// How long a VM gets to stop after a shutdown request before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot create the runtime directory {path}: {source}")]
    RuntimeDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the control channel: {0}")]
    Control(std::io::Error),
    #[error("cannot start {path}: {source}")]
    Spawn {
        path: String,
        source: std::io::Error,
    },
    #[error("firerunner exited before the guest connected ({status}){detail}")]
    Died { status: ExitStatus, detail: String },
    #[error("the guest did not connect within {0:?}{1}")]
    BootTimeout(Duration, String),
    #[error("firerunner did not exit within {0:?}{1}")]
    ExitTimeout(Duration, String),
    #[error("the guest connected to the host, so it went past its snapshot point without firerunner exiting{0}")]
    ConnectedBeforeExit(String),
    #[error("waiting for the guest failed: {0}")]
    Wait(std::io::Error),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("the VM's network: {0}")]
    Network(#[from] NetworkError),
    #[error(
        "a VM gets a network only in a jail (its namespace is named after the jail slot): run as \
         root without --no_jail / jail: false"
    )]
    NetworkWithoutJail,
    #[error("cannot pass the VM's TAP: {0}")]
    TapFd(std::io::Error),
}

/// Why a call to the guest agent got no response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no response before the deadline")]
    Timeout,
    #[error("request too large: {0}")]
    TooLarge(ProtocolError),
    #[error("the function answered invalid JSON: {0}")]
    BadJson(serde_json::Error),
    /// The connection broke: firerunner's exit (with its reason) or the
    /// error.
    #[error("{0}")]
    Broken(String),
}

/// A private directory under `$XDG_RUNTIME_DIR` (else the temporary
/// directory) for a controller's sockets and consoles; removed on drop.
pub struct RuntimeDir(PathBuf);

impl RuntimeDir {
    /// Creates `<base>/snapvm-<name>`, replacing a stale one.
    pub fn create(name: &str) -> std::io::Result<Self> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("snapvm-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads and writes a stream against one absolute deadline (none: no
/// limit): every syscall gets the time left as its socket timeout.
struct Deadlined<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl Deadlined<'_> {
    fn left(&self) -> std::io::Result<Option<Duration>> {
        let Some(deadline) = self.deadline else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::ErrorKind::TimedOut.into())
        } else {
            Ok(Some(left))
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(self.left()?)?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(self.left()?)?;
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

/// The guest agent's handshake (`protocol::handshake`) on `stream`, by
/// `deadline` (none: no limit).
pub fn handshake(stream: &UnixStream, deadline: Option<Instant>) -> Result<(), ProtocolError> {
    protocol::handshake(&mut Deadlined { stream, deadline })
}

/// What to start.
#[derive(Clone)]
pub struct Launch {
    pub firerunner: PathBuf,
    /// VM flags passed through to firerunner.
    pub vm_args: Vec<OsString>,
    /// Keep the guest console here; otherwise it goes to the runtime dir
    /// and is shown (tail) when the VM fails to start.
    pub console: Option<PathBuf>,
    /// Run firerunner in a jail (src/jail/) through the jailer.
    pub jail: Option<JailOptions>,
    /// Give the VM a network card in a network namespace of its own
    /// (src/network.rs; needs the jail).
    pub network: bool,
}

/// firerunner as this process sees it.
enum Process {
    /// An unjailed firerunner.
    Child(Child),
    /// A jailed firerunner, started by a detached jailer as a child of
    /// this process (see src/jail/mod.rs); reaped with waitpid.
    Jailed(nix::unistd::Pid),
}

impl Process {
    /// Reaps firerunner if it has ended (`block`: waits until it has).
    fn reap(&mut self, block: bool) -> std::io::Result<Option<ExitStatus>> {
        match self {
            Process::Child(c) if block => c.wait().map(Some),
            Process::Child(c) => c.try_wait(),
            Process::Jailed(pid) => {
                let flags = if block { 0 } else { libc::WNOHANG };
                let mut raw = 0;
                loop {
                    // SAFETY: waitpid writes only the status word, on a
                    // child of this process not reaped yet (`reap` is its
                    // only reaper and stops at the first status).
                    match unsafe { libc::waitpid(pid.as_raw(), &mut raw, flags) } {
                        0 => return Ok(None),
                        r if r > 0 => return Ok(Some(ExitStatus::from_raw(raw))),
                        _ => {
                            let e = std::io::Error::last_os_error();
                            if e.kind() != std::io::ErrorKind::Interrupted {
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
    }

    /// SIGKILL (to a jailed firerunner, pid 1 of its namespace, it takes
    /// the whole namespace with it).
    fn kill(&mut self) {
        match self {
            Process::Child(c) => {
                let _ = c.kill();
            }
            Process::Jailed(pid) => {
                let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// A running firerunner and its sockets. Dropping it kills the VM and
/// removes the runtime directory.
pub struct VmProcess {
    process: Process,
    status: Option<ExitStatus>,
    control: UnixStream,
    events: Receiver<Event>,
    listener: UnixListener,
    console: PathBuf,
    pub spawned_at: Instant,
    /// The VM's network namespace, removed after the VM is killed.
    _network: Option<VmNetwork>,
    /// The jail's slot: dropped after the VM is killed, it removes what
    /// is left of the jail (fields drop after `Drop::drop`).
    jail: Option<Slot>,
    /// Removed after the VM is killed.
    _runtime_dir: RuntimeDir,
}

impl VmProcess {
    /// Listens for the guest agent, then spawns firerunner.
    pub fn spawn(launch: &Launch) -> Result<Self, LaunchError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = RuntimeDir::create(&name)
            .map_err(|source| LaunchError::RuntimeDir { path: name, source })?;
        Self::spawn_in(launch, dir)
    }

    fn spawn_in(launch: &Launch, runtime_dir: RuntimeDir) -> Result<Self, LaunchError> {
        let dir = runtime_dir.path();
        // The vsock sockets get a directory of their own: a jailed VM gets
        // it (and only it) as /vsock, owned by its uid. Were it the runtime
        // directory, the VM could swap the console file the controller
        // reads for a link to any file root may read.
        let sockets = dir.join("vm");
        std::fs::create_dir(&sockets).map_err(|source| LaunchError::RuntimeDir {
            path: sockets.display().to_string(),
            source,
        })?;
        let uds = sockets.join("vsock");
        let agent_path = PathBuf::from(format!("{}_{AGENT_PORT}", uds.display()));
        let listener = UnixListener::bind(&agent_path).map_err(|source| LaunchError::Listen {
            path: agent_path.display().to_string(),
            source,
        })?;
        let console = launch
            .console
            .clone()
            .unwrap_or_else(|| dir.join("console.log"));
        let (ours, theirs) = UnixStream::pair().map_err(LaunchError::Control)?;
        let theirs_fd = theirs.as_raw_fd();

        let mut args = launch.vm_args.clone();
        args.extend([
            "--vsock_uds".into(),
            uds.into_os_string(),
            "--console".into(),
            console.clone().into_os_string(),
            "--control_fd".into(),
            CONTROL_FD.to_string().into(),
        ]);
        if launch.network && launch.jail.is_none() {
            return Err(LaunchError::NetworkWithoutJail);
        }
        let (mut cmd, slot, network) = match &launch.jail {
            Some(opts) => {
                let slot = Slot::acquire(opts)?;
                let network = launch
                    .network
                    .then(|| VmNetwork::create(slot.uid()))
                    .transpose()?;
                if network.is_some() {
                    args.extend(["--tap_fd".into(), TAP_FD.to_string().into()]);
                }
                // The VM binds its vsock socket here and connects to ours.
                slot.hand_over(&sockets)?;
                slot.hand_over(&agent_path)?;
                let libs = jail::libraries(&launch.firerunner, &opts.base)?;
                let mut cmd = Command::new(&opts.jailer);
                cmd.args(jail::jailer_args(
                    &slot,
                    opts,
                    &libs,
                    &launch.firerunner,
                    args,
                ));
                (cmd, Some(slot), network)
            }
            None => {
                let mut cmd = Command::new(&launch.firerunner);
                cmd.args(args);
                (cmd, None, None)
            }
        };
        // The TAP goes to TAP_FD from a descriptor above both fixed ones,
        // so that neither dup2 below overwrites the other's source.
        let tap = network
            .as_ref()
            .map(|n| fcntl(n.tap(), FcntlArg::F_DUPFD_CLOEXEC(10)))
            .transpose()
            .map_err(|e| LaunchError::TapFd(e.into()))?
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that this
            // process owns and nothing else holds.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        let tap_fd = tap.as_ref().map(|fd| fd.as_raw_fd());
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (dup2, fcntl) on fds this process
        // owns; `theirs` stays open in the parent until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                if theirs_fd == CONTROL_FD {
                    // dup2 onto itself would keep FD_CLOEXEC: clear it.
                    if libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = tap_fd {
                    if libc::dup2(fd, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let spawned_at = Instant::now();
        let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            path: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        drop(theirs);
        drop(tap);
        // A detached jailer exits as soon as firerunner runs (0), or after
        // it failed to set the jail up (its reason is on the control
        // channel): a status for the VM that never ran.
        let (process, status) = match &slot {
            Some(slot) => {
                let s = child.wait().map_err(LaunchError::Wait)?;
                if s.success() {
                    (Process::Jailed(jail::detached_pid(&slot.dir())?), None)
                } else {
                    (Process::Child(child), Some(s))
                }
            }
            None => (Process::Child(child), None),
        };

        let (tx, events) = unbounded();
        let reader = ours.try_clone().map_err(LaunchError::Control)?;
        std::thread::Builder::new()
            .name("control-events".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    match control::parse_event(&line) {
                        Ok(e) => {
                            if tx.send(e).is_err() {
                                break;
                            }
                        }
                        Err(e) => log::warn!("{e}"),
                    }
                }
            })
            .map_err(LaunchError::Control)?;

        Ok(Self {
            process,
            status,
            control: ours,
            events,
            listener,
            console,
            spawned_at,
            _network: network,
            jail: slot,
            _runtime_dir: runtime_dir,
        })
    }

    /// Sends `request` (one frame) to the guest agent on `stream` and waits
    /// for its response, a JSON document, until `deadline` (none: no
    /// limit). The one request path of singlevm and multivm.
    pub fn call(
        &mut self,
        stream: &UnixStream,
        request: &[u8],
        deadline: Option<Instant>,
    ) -> Result<Vec<u8>, CallError> {
        let mut io = Deadlined { stream, deadline };
        let result =
            protocol::write_frame(&mut io, request).and_then(|()| protocol::read_frame(&mut io));
        match result {
            Ok(body) => match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                Ok(_) => Ok(body),
                Err(e) => Err(CallError::BadJson(e)),
            },
            Err(e @ ProtocolError::TooLarge(_)) if request.len() > protocol::MAX_FRAME => {
                Err(CallError::TooLarge(e))
            }
            Err(e) if is_timeout(&e) => Err(CallError::Timeout),
            Err(e) => Err(CallError::Broken(self.why_broken(&e))),
        }
    }

    /// Explains a broken connection: firerunner's exit, or the error. The
    /// connection breaks a moment before the exit shows, so this waits
    /// (briefly) for the control channel to report or close.
    fn why_broken(&mut self, e: &ProtocolError) -> String {
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut reason = String::new();
        let exited = loop {
            match self.events.recv_deadline(deadline) {
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
            self.wait().ok()
        } else {
            self.try_status()
        };
        match status {
            Some(s) => format!("firerunner exited ({s}){reason}"),
            None => format!("the connection to the guest broke ({e})"),
        }
    }

    /// Events firerunner has reported so far.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// The guest console file.
    pub fn console(&self) -> &Path {
        &self.console
    }

    /// The last lines of the console, for error messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; last console lines:\n{tail}")
        }
    }

    /// firerunner's exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.process.reap(false) {
                self.reaped(s);
            }
        }
        self.status
    }

    /// Records firerunner's end; a jailed one's jail is finished (its
    /// output handed over, the jail removed) before anyone sees it ended.
    fn reaped(&mut self, status: ExitStatus) {
        if let (Some(slot), Process::Jailed(_)) = (&self.jail, &self.process) {
            if let Err(e) = jail::finish(&slot.dir(), status) {
                log::error!("{e}");
            }
        }
        self.status = Some(status);
    }

    /// Why firerunner exited, from its last control event.
    fn exit_detail(&self) -> String {
        self.events
            .try_iter()
            .filter_map(|e| match e {
                Event::Exit { reason, .. } => Some(format!(": {reason}")),
                _ => None,
            })
            .last()
            .unwrap_or_default()
    }

    /// Waits for the guest agent's connection, firerunner's exit or the
    /// deadline, whichever comes first.
    fn watch(&mut self, timeout: Duration) -> Result<Watched, LaunchError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + timeout;
        loop {
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(10u8)) {
                Ok(n) if n > 0 => {
                    let (stream, _) = self.listener.accept().map_err(LaunchError::Wait)?;
                    return Ok(Watched::Connected(stream));
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(LaunchError::Wait(e.into())),
            }
            if let Some(status) = self.try_status() {
                // Let the control reader drain the exit event.
                std::thread::sleep(Duration::from_millis(20));
                return Ok(Watched::Exited(status));
            }
            if Instant::now() >= deadline {
                return Ok(Watched::TimedOut);
            }
        }
    }

    /// Why firerunner stopped, and the console's last lines.
    pub fn failure_detail(&self) -> String {
        format!("{}{}", self.exit_detail(), self.console_tail(20))
    }

    /// Waits for the guest agent's connection; firerunner's exit or the
    /// deadline is an error.
    pub fn wait_for_guest(&mut self, timeout: Duration) -> Result<UnixStream, LaunchError> {
        match self.watch(timeout)? {
            Watched::Connected(stream) => Ok(stream),
            Watched::Exited(status) => Err(LaunchError::Died {
                status,
                detail: self.failure_detail(),
            }),
            Watched::TimedOut => Err(LaunchError::BootTimeout(timeout, self.console_tail(20))),
        }
    }

    /// Waits for firerunner to exit on its own (a snapshot run); the guest
    /// connecting first (it went past its snapshot point) or the deadline
    /// is an error, and the VM is stopped.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<ExitStatus, LaunchError> {
        let watched = self.watch(timeout)?;
        if !matches!(watched, Watched::Exited(_)) {
            self.kill();
        }
        match watched {
            Watched::Exited(status) => Ok(status),
            Watched::Connected(_) => Err(LaunchError::ConnectedBeforeExit(self.console_tail(20))),
            Watched::TimedOut => Err(LaunchError::ExitTimeout(timeout, self.console_tail(20))),
        }
    }

    /// Waits for firerunner to exit on its own.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self.process.reap(true)?.unwrap_or_default();
        self.reaped(s);
        Ok(s)
    }

    /// Kills firerunner now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.stop_now();
        let _ = self.wait();
    }

    /// Sends firerunner SIGKILL unless it has ended, without reaping it.
    pub fn stop_now(&mut self) {
        if self.try_status().is_none() {
            self.process.kill();
        }
    }

    /// Tells a shell (`firerunner shell`) to restore `r`; a jailed shell
    /// first gets `r`'s files in its jail ([`jail::stage_restore`]).
    pub fn restore(&self, r: &RestoreRequest) -> Result<(), LaunchError> {
        let staged = match &self.jail {
            Some(slot) => jail::stage_restore(&slot.dir(), slot.uid(), r)?,
            None => r.clone(),
        };
        self.command(&control::Command::Restore(staged))
            .map_err(LaunchError::Control)
    }

    /// Sends `cmd` to firerunner over the control channel.
    pub fn command(&self, cmd: &control::Command) -> std::io::Result<()> {
        (&self.control).write_all(control::encode_command(cmd).as_bytes())
    }

    /// Asks the VM to stop, waits a grace period, then kills it.
    pub fn shutdown(&mut self) -> Option<ExitStatus> {
        if self.try_status().is_none() {
            let _ = self.command(&control::Command::Shutdown);
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while self.try_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            self.kill();
        }
        self.status
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What [`VmProcess::watch`] saw first.
enum Watched {
    Connected(UnixStream),
    Exited(ExitStatus),
    TimedOut,
}

/// The binary `name` (firerunner, jailer) next to the running executable
/// (how the binaries ship).
pub fn beside_exe(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}
