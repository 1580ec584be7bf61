//! One function VM as the scheduler sees it: launched (boot or restore),
//! handshaken, called with one request at a time under a deadline, killed.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

use crate::control::{AfterSnapshot, Command, Event};
use crate::jail::JailOptions;
use crate::launcher::{self, CallError, Launch, VmProcess};
use crate::protocol::ProtocolError;

use super::config::{Config, Function};
use super::hibernate::{Kept, LAYER_NAME};
use super::pool::FnId;
use super::shells::ShellPool;

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
    pub function: FnId,
    /// The function's generation and spec this VM was launched from.
    pub generation: u64,
    pub spec: Arc<Function>,
    /// Restored into a ready shell (src/multivm/shells.rs).
    pub from_shell: bool,
    /// A VM of a `keep_state` function: where it hibernates, what it woke from.
    kept: Option<Kept>,
    vm: VmProcess,
    stream: UnixStream,
}

impl FunctionVm {
    /// Starts a VM of `spec` (restore when it has `load_dir`, boot
    /// otherwise) with its console in `console`, and waits for its agent.
    /// A restore takes a ready shell of its shape from `shells` if there
    /// is one (its console then stays in the shell's runtime directory),
    /// and starts a VM of its own if that shell fails before its guest
    /// connects. A VM of a `keep_state` function (`kept`) never takes a
    /// shell, and restores the hibernated layers it carries.
    pub fn launch(
        cfg: &Config,
        jail: Option<&JailOptions>,
        shells: Option<&ShellPool>,
        (function, generation, spec): (FnId, u64, Arc<Function>),
        (id, kept): (VmId, Option<Kept>),
        console: &Path,
    ) -> Result<Self, VmError> {
        let shells = shells.filter(|_| kept.is_none());
        // A shell can die between the pool's last look and its guest's
        // connection (it had not run the function yet): a VM of its own
        // is started instead.
        let from_pool = shells.zip(spec.restore_request()).and_then(|(pool, r)| {
            let mut sh = pool.take((spec.memory_mib, spec.vcpus))?;
            let connected = sh.restore(&r).map_err(|e| e.to_string()).and_then(|()| {
                sh.wait_for_guest(cfg.boot_timeout)
                    .map_err(|e| e.to_string())
            });
            match connected {
                Ok(stream) => Some((sh, stream)),
                Err(e) => {
                    log::warn!("a shell did not restore {}: {e}; starting a VM", spec.name);
                    sh.kill();
                    None
                }
            }
        });
        let from_shell = from_pool.is_some();
        let (mut vm, stream) = match from_pool {
            Some(started) => started,
            None => {
                let launch = Launch {
                    firerunner: cfg.firerunner.clone(),
                    vm_args: match &kept {
                        Some(k) => spec.kept_args(cfg.no_seccomp, &k.dir, &k.chain_dirs()),
                        None => spec.firerunner_args(cfg.no_seccomp),
                    },
                    console: Some(console.to_path_buf()),
                    jail: jail.cloned(),
                    network: spec.network,
                };
                let mut vm =
                    VmProcess::spawn(&launch).map_err(|e| VmError::Launch(e.to_string()))?;
                match vm.wait_for_guest(cfg.boot_timeout) {
                    Ok(s) => (vm, s),
                    Err(e) => {
                        vm.kill();
                        return Err(VmError::Launch(e.to_string()));
                    }
                }
            }
        };
        if let Err(e) = launcher::handshake(&stream, Some(Instant::now() + cfg.boot_timeout)) {
            vm.kill();
            return Err(VmError::Handshake(e));
        }
        Ok(Self {
            id,
            function,
            generation,
            spec,
            from_shell,
            kept,
            vm,
            stream,
        })
    }

    /// Hibernates the VM: it writes its layer (the control channel's
    /// `snapshot`, then exit) within `timeout`; returns what it carried,
    /// for the layer to be adopted (src/multivm/hibernate.rs). On any
    /// failure the VM is killed and its state lost.
    pub fn hibernate(mut self, timeout: Duration) -> Result<Kept, VmError> {
        let kept = self
            .kept
            .take()
            .ok_or_else(|| VmError::Failed("the VM keeps no state".into()))?;
        let deadline = Instant::now() + timeout;
        self.vm
            .command(&Command::Snapshot {
                name: LAYER_NAME.into(),
                then: AfterSnapshot::Exit,
            })
            .map_err(|e| VmError::Failed(format!("cannot ask for a snapshot: {e}")))?;
        // The maintainer may be watching this receiver too (it watches
        // idle VMs for an exit) and take an event first: the exit status
        // and the layer itself (checked when adopted) are what count.
        loop {
            match self.vm.events().recv_deadline(deadline) {
                Ok(Event::SnapshotFailed { reason, .. }) => return Err(VmError::Failed(reason)),
                Ok(Event::SnapshotWritten { .. } | Event::Exit { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let status = self
            .vm
            .wait_for_exit(deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| VmError::Failed(e.to_string()))?;
        if !status.success() {
            return Err(VmError::Failed(format!("firerunner {status}")));
        }
        Ok(kept)
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
        let deadline = Instant::now() + timeout;
        match self.vm.call(&self.stream, request, Some(deadline)) {
            Ok(body) => Ok(body),
            Err(CallError::Timeout) => Err(VmError::Timeout(timeout)),
            Err(CallError::TooLarge(e)) => Err(VmError::TooLarge(e)),
            Err(CallError::BadJson(e)) => Err(VmError::BadJson(e)),
            Err(CallError::Broken(why)) => Err(VmError::Failed(why)),
        }
    }

    /// Kills firerunner (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        self.vm.kill();
    }

    /// Sends firerunner SIGKILL without reaping it ([`Self::kill`] or
    /// dropping does).
    pub fn stop_now(&mut self) {
        self.vm.stop_now();
    }
}
