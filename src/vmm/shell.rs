//! VM shells (`firerunner shell`): everything of a VM that does not depend
//! on the snapshot it will run — the KVM VM with its irqchip and PIT, the
//! vCPUs, and guest memory registered with KVM — built ahead, over
//! placeholder memory (anonymous, never touched). A `restore` command then
//! names the snapshot; the restore path fills the registered memory in
//! place (see `memory::restore::fill`) and sets the state, with no VM
//! creation and no `KVM_SET_USER_MEMORY_REGION` on its way.
//!
//! A command refused before the restore starts (bad flags) leaves the
//! shell waiting for another; a snapshot refused while it is restored (a
//! corrupt layer, another shape) ends it, before any KVM state was
//! written, with the reason in its `exit` event.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;

use super::boot::{check_vcpu_limit, BootError};
use super::config::VmConfig;
use super::memory::{self, GuestMemoryMmap, MemoryError};
use super::vcpu::{Vcpu, VcpuError};
use super::vm::{KvmVm, KvmVmError};
use super::VmExit;
use crate::cli::ShellArgs;
use crate::control::{Channel, Command, ControlError, Event};

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("--vcpu_count must be between 1 and {max}, got {got}")]
    VcpuCount { got: u64, max: u8 },
    #[error("cannot build the shell: {0}")]
    Vm(#[from] KvmVmError),
    #[error("cannot build the shell: {0}")]
    VcpuLimit(#[from] BootError),
    #[error("cannot build the shell: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("cannot build the shell: {0}")]
    Memory(#[from] MemoryError),
    #[error("the shell cannot wait for its command: {0}")]
    Wait(nix::Error),
}

/// A VM waiting for its snapshot.
pub struct Shell {
    pub(super) vm: KvmVm,
    /// Registered with KVM (with a dirty log when `log_dirty`).
    pub(super) mem: GuestMemoryMmap,
    /// vCPU `i` at index `i`.
    pub(super) vcpus: Vec<Vcpu>,
    pub(super) log_dirty: bool,
}

impl Shell {
    /// Builds a shell of `args`' shape.
    pub fn new(args: &ShellArgs) -> Result<Self, ShellError> {
        let n = u8::try_from(args.vcpu_count)
            .ok()
            .filter(|n| (1..=super::MAX_VCPUS).contains(n))
            .ok_or(ShellError::VcpuCount {
                got: args.vcpu_count,
                max: super::MAX_VCPUS,
            })?;
        let vm = KvmVm::new()?;
        check_vcpu_limit(&vm, n)?;
        let mem = memory::create(args.mem_size)?;
        let log_dirty = args.snapshot_dir.is_some();
        vm.register_memory(&mem, log_dirty)?;
        let msrs = Arc::new(vm.msr_index_list()?);
        let vcpus = (0..n)
            .map(|id| Vcpu::new(vm.fd(), id, msrs.clone()))
            .collect::<Result<_, _>>()?;
        Ok(Shell {
            vm,
            mem,
            vcpus,
            log_dirty,
        })
    }
}

/// What a shell got while it waited.
pub enum Waited {
    /// The VM to restore into the shell.
    Restore(Box<VmConfig>),
    /// Stop without running anything: a shutdown, the controller gone, a
    /// termination signal.
    Stop(VmExit),
}

/// Tells the controller the shell is ready, then waits for a `restore`
/// that `args` accept, answering `restore_failed` to the others.
pub fn wait(
    args: &ShellArgs,
    control: &Channel,
    signals: &SignalFd,
    start: Instant,
) -> Result<Waited, ShellError> {
    let us = || start.elapsed().as_micros() as u64;
    control.send(&Event::ShellReady { us: us() });
    let refuse = |reason: String| {
        log::warn!("restore refused: {reason}");
        control.send(&Event::RestoreFailed { us: us(), reason });
    };
    let mut pending = Vec::new();
    // After a malformed line, the lines behind it are read before waiting.
    let mut read_on = false;
    loop {
        let mut fds = [
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        if !std::mem::take(&mut read_on) {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(ShellError::Wait(e)),
            }
        }
        if let Ok(Some(info)) = signals.read_signal() {
            log::info!(
                "signal {} while waiting: stopping the shell",
                info.ssi_signo
            );
            return Ok(Waited::Stop(VmExit::Signal(info.ssi_signo as i32)));
        }
        let commands = match control.read_commands(&mut pending) {
            Ok(Some(c)) => c,
            Ok(None) => {
                log::info!("the controller closed the control channel: stopping the shell");
                return Ok(Waited::Stop(VmExit::Shutdown));
            }
            Err(e @ ControlError::Malformed { .. }) => {
                refuse(e.to_string());
                read_on = true;
                continue;
            }
            Err(e) => {
                log::error!("{e}: stopping the shell");
                return Ok(Waited::Stop(VmExit::Shutdown));
            }
        };
        for cmd in commands {
            match cmd {
                Command::Restore(r) => match args.vm_config(&r) {
                    Ok(config) => return Ok(Waited::Restore(Box::new(config))),
                    Err(e) => refuse(e.to_string()),
                },
                Command::Shutdown => return Ok(Waited::Stop(VmExit::Shutdown)),
                other => refuse(format!(
                    "{other:?}: a shell takes only `restore` and `shutdown`"
                )),
            }
        }
    }
}
