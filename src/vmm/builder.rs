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
use super::devices::virtio::block::{Block, BlockError};
use super::devices::virtio::mmio::{self, MmioError, SharedDevice};
use super::devices::virtio::vsock::{Vsock, VsockError};
use super::event_loop::EventManager;
use super::kernel::{self, KernelError};
use super::layout;
use super::memory::{self, MemoryError};
use super::vcpu::{Vcpu, VcpuContext, VcpuError};
use super::vm::{Vm, VmError};
use super::x86_64::{boot_params, cpuid::CpuidShape, mptable, regs};
use super::{VmExit, MAX_VCPUS};
use crate::control::{Channel, Command, Event};

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
    /// The guest's vsock CID.
    pub cid: u64,
    /// Guest console destination; stdout when absent.
    pub console: Option<PathBuf>,
    /// Base path of the vsock Unix sockets (see the vsock device).
    pub vsock_uds: Option<PathBuf>,
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
    #[error("{what}: {source}")]
    Disk {
        what: &'static str,
        source: BlockError,
    },
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("cannot attach a virtio device: {0}")]
    Virtio(#[from] MmioError),
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

/// Logs the guest's control-port signals, reports them to the controller
/// and ends the VM when the app failed to load.
struct GuestSignals {
    exit: Sender<VmExit>,
    control: Option<Arc<Channel>>,
}

impl SignalSink for GuestSignals {
    fn signal(&self, signal: GuestSignal, since_start: std::time::Duration) {
        let us = since_start.as_micros() as u64;
        let event = match signal {
            GuestSignal::BootDone => {
                log::info!("guest boot done {us} us after start");
                Event::BootDone { us }
            }
            GuestSignal::Timestamp => {
                log::info!("guest timestamp {us} us after start");
                Event::Timestamp { us }
            }
            GuestSignal::SnapshotPoint => {
                log::info!("guest snapshot point {us} us after start (no --dump_dir: ignored)");
                Event::SnapshotPoint { us }
            }
            GuestSignal::AppFailed => {
                let _ = self.exit.send(VmExit::AppFailed);
                Event::AppFailed { us }
            }
        };
        if let Some(c) = &self.control {
            c.send(&event);
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
/// `control`, when given, is the channel to the controller that spawned us.
pub fn run(
    config: &VmConfig,
    start: Instant,
    control: Option<Arc<Channel>>,
) -> Result<VmExit, BuildError> {
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
    let rootfs = Block::new(&config.rootfs).map_err(|source| BuildError::Disk {
        what: "--rootfs",
        source,
    })?;
    let appfs = match &config.appfs {
        Some(path) => Block::new(path).map_err(|source| BuildError::Disk {
            what: "--appfs",
            source,
        })?,
        None => Block::empty(),
    };

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

    let uds = config.vsock_uds.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("snapvm-{}.vsock", std::process::id()))
    });
    let vsock = Vsock::new(config.cid, &uds)?;

    // virtio devices on the MMIO bus, in the order of DESIGN.md: vda, vdb, vsock.
    let mut mmio = Bus::new();
    let mut event_manager = EventManager::new().map_err(BuildError::EventLoop)?;
    let mut device_args = Vec::new();
    let devices: [SharedDevice; 3] = [
        Arc::new(Mutex::new(rootfs)),
        Arc::new(Mutex::new(appfs)),
        Arc::new(Mutex::new(vsock)),
    ];
    for (slot, device) in devices.into_iter().enumerate() {
        let handle = mmio::register(
            vm.fd(),
            &mut mmio,
            &mut event_manager,
            &mem,
            device,
            slot as u32,
        )?;
        device_args.push(handle.cmdline_fragment());
    }

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
            GuestSignals {
                exit: exit_tx.clone(),
                control: control.clone(),
            },
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
    if let Some(c) = &control {
        spawn_control_thread(c.clone(), exit_tx.clone())?;
    }
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

    if let Some(c) = &control {
        c.send(&Event::Ready {
            us: start.elapsed().as_micros() as u64,
        });
    }

    // The first reason to stop wins; the process exit ends the other threads.
    let exit = exit_rx
        .recv()
        .unwrap_or(VmExit::Fatal("all VM threads ended".into()));
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

fn spawn_control_thread(control: Arc<Channel>, exit: Sender<VmExit>) -> Result<(), BuildError> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let served = control.serve(|cmd| match cmd {
                Command::Shutdown => {
                    let _ = exit.send(VmExit::Shutdown);
                }
            });
            match served {
                Ok(()) => log::info!("the controller closed the control channel: stopping the VM"),
                Err(e) => log::error!("{e}: stopping the VM"),
            }
            let _ = exit.send(VmExit::Shutdown);
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
