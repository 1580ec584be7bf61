//! Assembles a VM from its parts and runs it until it ends: memory, KVM VM,
//! kernel, devices, boot structures, vCPUs, event loop.

use std::fs::File;
use std::io::LineWriter;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{unbounded, Sender};
use nix::sys::signal::{SigSet, Signal};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{lock, Bus, BusError};
use super::devices::control::{ControlPort, GuestSignal, SignalSink};
use super::devices::i8042::I8042;
use super::devices::serial::{ConsoleSink, SerialDevice};
use super::event_loop::EventManager;
use super::kernel::{self, KernelError};
use super::layout;
use super::memory::{self, MemoryError};
use super::vcpu::{Vcpu, VcpuContext, VcpuError};
use super::vm::{Vm, VmError};
use super::x86_64::{boot_params, cpuid::CpuidShape, mptable, regs};
use super::{VmExit, MAX_VCPUS};

/// Kernel command line used when the user gives none.
pub const DEFAULT_KERNEL_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Everything needed to build one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub kernel_args: String,
    pub rootfs: PathBuf,
    pub appfs: Option<PathBuf>,
    pub mem_mib: u64,
    pub vcpus: u64,
    /// Guest console destination; stdout when absent.
    pub console: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--vcpu_count must be between 1 and {max}, got {got}")]
    VcpuCount { got: u64, max: usize },
    #[error("--mem_size {mib} MiB is more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { mib: u64, host_mib: u64 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot read {what} {path}: {source}")]
    Disk {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the console file {path}: {source}")]
    Console {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot wire interrupt line {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot get KVM's supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot create the device event loop: {0}")]
    EventLoop(event_manager::Error),
    #[error("cannot start a VMM thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot block termination signals: {0}")]
    Signals(nix::Error),
}

fn host_ram_mib() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total() >> 20)
        .unwrap_or(u64::MAX)
}

fn check_readable(what: &'static str, path: &std::path::Path) -> Result<(), BuildError> {
    File::open(path).map(drop).map_err(|source| BuildError::Disk {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Reports the guest's control-port signals.
struct ExitOnAppFailure(Sender<VmExit>);

impl SignalSink for ExitOnAppFailure {
    fn signal(&self, signal: GuestSignal, since_start: std::time::Duration) {
        let us = since_start.as_micros();
        match signal {
            GuestSignal::BootDone => log::info!("guest boot done {us} us after start"),
            GuestSignal::Timestamp => log::info!("guest timestamp {us} us after start"),
            GuestSignal::SnapshotPoint => {
                log::info!("guest snapshot point {us} us after start (no --dump_dir: ignored)")
            }
            GuestSignal::AppFailed => {
                let _ = self.0.send(VmExit::AppFailed);
            }
        }
    }
}

/// Ends the VM when the guest resets the machine through the i8042.
struct ResetTrigger(Sender<VmExit>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        let _ = self.0.send(VmExit::Reset);
        Ok(())
    }
}

fn console_sink(path: &Option<PathBuf>) -> Result<ConsoleSink, BuildError> {
    match path {
        None => Ok(Box::new(std::io::stdout())),
        Some(p) => {
            let f = File::create(p).map_err(|source| BuildError::Console {
                path: p.display().to_string(),
                source,
            })?;
            Ok(Box::new(LineWriter::new(f)))
        }
    }
}

/// Builds the VM described by `config`, runs it and returns why it ended.
/// `start` is when the process started (for timing logs).
pub fn run(config: &VmConfig, start: Instant) -> Result<VmExit, BuildError> {
    // Termination signals are taken by a dedicated thread: block them before
    // any other thread exists so every thread inherits the mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(BuildError::Signals)?;

    if config.vcpus == 0 || config.vcpus > u64::from(MAX_VCPUS) {
        return Err(BuildError::VcpuCount {
            got: config.vcpus,
            max: MAX_VCPUS as usize,
        });
    }
    let vcpu_count = config.vcpus as u8;
    let host_mib = host_ram_mib();
    if config.mem_mib > host_mib {
        return Err(BuildError::MemoryTooLarge {
            mib: config.mem_mib,
            host_mib,
        });
    }
    check_readable("the root disk", &config.rootfs)?;
    if let Some(appfs) = &config.appfs {
        check_readable("the app disk", appfs)?;
    }

    // Refuse an unusable command line before doing any work.
    kernel::cmdline(&config.kernel_args, &[])?;
    let mem = memory::create(config.mem_mib)?;
    let vm = Vm::new()?;
    let max = vm.max_vcpus().min(MAX_VCPUS as usize);
    if usize::from(vcpu_count) > max {
        return Err(BuildError::VcpuCount {
            got: config.vcpus,
            max,
        });
    }
    vm.register_memory(&mem)?;
    let kernel = kernel::load(&mem, &config.kernel)?;

    let (exit_tx, exit_rx) = unbounded();

    let mmio = Bus::new();
    let event_manager = EventManager::new().map_err(BuildError::EventLoop)?;
    let device_args: Vec<String> = Vec::new();

    // Boot structures.
    let cmdline = kernel::cmdline(&config.kernel_args, &device_args)?;
    let (cmdline_addr, cmdline_size) = kernel::write_cmdline(&mem, &cmdline)?;
    log::debug!("kernel command line: {:?}", cmdline.as_cstring().ok());
    boot_params::write(&mem, kernel.setup_header, cmdline_addr, cmdline_size)?;
    mptable::setup(&mem, vcpu_count)?;
    regs::write_boot_tables(&mem)?;

    // Legacy devices on the port-I/O bus.
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.fd()
        .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(|source| BuildError::Irqfd {
            gsi: layout::SERIAL_IRQ,
            source,
        })?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        console_sink(&config.console)?,
    )));
    pio.insert(
        serial.clone(),
        u64::from(layout::SERIAL_PORT),
        u64::from(layout::SERIAL_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(ResetTrigger(exit_tx.clone())))),
        u64::from(layout::I8042_PORT),
        u64::from(layout::I8042_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(ControlPort::new(
            start,
            ExitOnAppFailure(exit_tx.clone()),
        ))),
        u64::from(layout::CONTROL_PORT),
        1,
    )?;

    let supported = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::Cpuid)?;
    let tsc_deadline = vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let mut vcpus = Vec::new();
    for id in 0..vcpu_count {
        let vcpu = Vcpu::new(vm.fd(), id)?;
        let shape = CpuidShape {
            cpu_id: id,
            cpu_count: vcpu_count,
            tsc_deadline,
        };
        vcpu.configure(&supported, shape, kernel.entry)?;
        vcpus.push(vcpu);
    }

    spawn_event_loop(event_manager, exit_tx.clone())?;
    spawn_signal_thread(signals, exit_tx.clone())?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    for vcpu in vcpus {
        vcpu.spawn(VcpuContext {
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            exit: exit_tx.clone(),
            start,
        })?;
    }

    // The first reason to stop wins; the process exit ends the other threads.
    let exit = exit_rx.recv().unwrap_or(VmExit::Fatal("all VM threads ended".into()));
    lock(&serial).flush();
    // Keep the VM (and so its memory slots) alive until here.
    drop(vm);
    Ok(exit)
}

fn spawn_event_loop(mut em: EventManager, exit: Sender<VmExit>) -> Result<(), BuildError> {
    std::thread::Builder::new()
        .name("event-loop".into())
        .spawn(move || loop {
            if let Err(e) = em.run() {
                let _ = exit.send(VmExit::Fatal(format!("device event loop failed: {e}")));
                return;
            }
        })
        .map(drop)
        .map_err(BuildError::Thread)
}

fn spawn_signal_thread(signals: SigSet, exit: Sender<VmExit>) -> Result<(), BuildError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                log::info!("received {sig}: stopping the VM");
                let _ = exit.send(VmExit::Signal(sig as i32));
            }
        })
        .map(drop)
        .map_err(BuildError::Thread)
}
