//! Assembles a VM from its parts and runs it until it ends.
//!
//! Two ways in: [`boot`] builds a fresh VM from a kernel (memory, KVM VM,
//! kernel, devices, boot structures, vCPUs); [`restore`] rebuilds one from
//! a snapshot directory (validate, VM + irqchip + PIT, memory, vCPU state,
//! clock, devices). Both end in the same running [`Machine`]: vCPU
//! threads, the device event loop, and the main thread waiting for the
//! reason to stop — or for the guest's snapshot point, when `--dump_dir`
//! is given.

use std::fs::File;
use std::io::LineWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Sender};
use nix::sys::signal::{SigSet, Signal};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{lock, Bus, BusError};
use super::devices::control::{ControlPort, GuestSignal, SignalSink};
use super::devices::i8042::I8042;
use super::devices::serial::{ConsoleSink, SerialDevice, SerialError};
use super::devices::virtio::block::{Block, BlockError};
use super::devices::virtio::mmio::{self, MmioDeviceHandle, MmioError, SharedDevice};
use super::devices::virtio::vsock::{Vsock, VsockError};
use super::event_loop::EventManager;
use super::kernel::{self, KernelError};
use super::layout;
use super::memory::{self, GuestMemoryMmap, MemoryError};
use super::vcpu::{self, Vcpu, VcpuContext, VcpuError, Vcpus};
use super::vm::{Vm, VmError};
use super::x86_64::cpu_template::{CpuTemplate, CpuTemplateError};
use super::x86_64::{boot_params, cpuid::CpuidShape, mptable, regs};
use super::{VmExit, MAX_VCPUS};
use crate::control::{Channel, Command, Event};
use crate::snapshot::format::{self, DeviceEntry, FormatError, MemoryLayer, SnapshotState};
use crate::snapshot::quiesce::{LoopPause, QuiesceError};
use crate::snapshot::{self, disk, ws};

/// Kernel command line used when the user gives none.
pub const DEFAULT_KERNEL_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Environment variable a parent may set to CLOCK_MONOTONIC (ns) just
/// before it spawns firerunner, so the log can say how long exec took.
pub const SPAWN_TIME_ENV: &str = "SNAPVM_SPAWN_MONO_NS";

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
    /// Restore this stack of snapshot layers (base first, then its diff
    /// layers) instead of booting the kernel; empty to boot.
    pub layers: Vec<PathBuf>,
    /// At the guest's snapshot point, write a snapshot here and exit: a
    /// full snapshot of a booted VM, a diff layer on top of a restored
    /// one.
    pub dump_dir: Option<PathBuf>,
    /// Copy the base layer's memory up front instead of mapping it lazily.
    pub copy_base: bool,
    /// Copy the diff layers' memory up front instead of mapping it lazily.
    pub copy_diff: bool,
    /// Record the working set of the first request into this directory
    /// (see `snapshot::ws`); the controller says when the request is done.
    pub dump_ws: Option<PathBuf>,
    /// Load the top layer's working set eagerly at restore.
    pub load_ws: bool,
    /// CPU template (JSON) applied to every vCPU at boot.
    pub cpu_template: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--cpu_template cannot be used with --load_dir: a snapshot keeps the CPUID it was taken with")]
    TemplateAtRestore,
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
    CpuTemplate(#[from] CpuTemplateError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot create the device event loop: {0}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error(transparent)]
    Ws(#[from] ws::WsError),
    #[error(
        "--dump_ws needs a controller (singlevm, multivm) to say when the first request is done"
    )]
    WsWithoutController,
    #[error("cannot start a VMM thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot block termination signals: {0}")]
    Signals(nix::Error),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    DumpDir(#[from] snapshot::dir::DirError),
    #[error("cannot restore: {0}")]
    Format(#[from] FormatError),
    #[error("cannot restore: {0}")]
    Rootfs(#[from] disk::DiskError),
    #[error("cannot restore {dir}: {reason}")]
    Mismatch { dir: String, reason: String },
    #[error("cannot restore {dir}: its memory file {path}: {reason}")]
    MemoryFile {
        dir: String,
        path: String,
        reason: String,
    },
}

fn host_ram_mib() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total() >> 20)
        .unwrap_or(u64::MAX)
}

/// Logs the guest's control-port signals, reports them to the controller,
/// ends the VM when the app failed to load, and at the snapshot point asks
/// for a snapshot when one is wanted.
struct GuestSignals {
    exit: Sender<VmExit>,
    control: Option<Arc<Channel>>,
    /// Where to ask for a snapshot (`--dump_dir` given).
    snapshot: Option<Sender<()>>,
    snapshot_requested: AtomicBool,
    /// The guest reported 125: the VM is ending and is never snapshotted.
    app_failed: AtomicBool,
}

impl SignalSink for GuestSignals {
    fn signal(&self, signal: GuestSignal, since_start: Duration) {
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
                match &self.snapshot {
                    Some(_) if self.app_failed.load(Ordering::SeqCst) => log::warn!(
                        "guest snapshot point {us} us after start: the app failed to load, no snapshot"
                    ),
                    Some(tx) if !self.snapshot_requested.swap(true, Ordering::SeqCst) => {
                        log::info!("guest snapshot point {us} us after start: taking a snapshot");
                        // This runs on the vCPU thread that wrote 124: it
                        // stops right after the write completes.
                        vcpu::pause_this_vcpu();
                        let _ = tx.send(());
                    }
                    Some(_) => {
                        log::info!("guest snapshot point {us} us after start (snapshot under way)")
                    }
                    None => log::info!(
                        "guest snapshot point {us} us after start (no --dump_dir: ignored)"
                    ),
                }
                Event::SnapshotPoint { us }
            }
            GuestSignal::AppFailed => {
                self.app_failed.store(true, Ordering::SeqCst);
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

/// What both ways of building a VM share: where its events go.
struct Wiring {
    start: Instant,
    control: Option<Arc<Channel>>,
    exit: Sender<VmExit>,
    snapshot: Option<Sender<()>>,
    /// Where the control thread passes the controller's `ws_done`.
    ws_done: Sender<()>,
}

/// A running VM: everything that drives it and everything a snapshot saves.
pub struct Machine {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) mem_mib: u64,
    pub(crate) vcpus: Vcpus,
    /// The virtio devices, in slot order (vda, vdb, vsock).
    pub(crate) devices: Vec<MmioDeviceHandle>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) event_loop: LoopPause,
    pub(crate) rootfs: PathBuf,
    /// The rootfs identity for the snapshot, hashed while the guest runs
    /// (`--dump_dir` only).
    pub(crate) rootfs_identity: Option<disk::IdentityJob>,
    /// The snapshot layers this VM was restored from, bottom first, with
    /// their state checksums (empty for a booted VM). A snapshot of this
    /// VM is a diff layer on top of them.
    pub(crate) layers: Vec<MemoryLayer>,
    /// The working-set fault handler and what it serves (`--dump_ws`,
    /// `--load_ws`); kept for the life of the VM.
    ws: Option<WsRuntime>,
}

/// A built VM whose threads have not started.
struct Parts {
    vm: Vm,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    devices: Vec<MmioDeviceHandle>,
    serial: Arc<Mutex<SerialDevice>>,
    pio: Bus,
    mmio: Bus,
    event_manager: EventManager,
    event_loop: LoopPause,
    layers: Vec<MemoryLayer>,
    ws: Option<WsRuntime>,
    /// Runs on vCPU 0's thread just before its first `KVM_RUN`.
    on_first_run: Box<dyn FnOnce() + Send>,
}

/// The virtio devices in slot order, as DESIGN.md fixes them.
pub fn device_list() -> Vec<DeviceEntry> {
    let e = |kind: &str, role: &str| DeviceEntry {
        kind: kind.into(),
        role: role.into(),
    };
    vec![
        e("block", "rootfs"),
        e("block", "appfs"),
        e("vsock", "vsock"),
    ]
}

/// Builds the VM described by `config` — booted, or restored with
/// `--load_dir` — runs it and returns why it ended. `start` is when the
/// process started (for timing logs); `control`, when given, is the
/// channel to the controller that spawned us.
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
    let host_mib = host_ram_mib();
    if config.mem_mib > host_mib {
        return Err(BuildError::MemoryTooLarge {
            mib: config.mem_mib,
            host_mib,
        });
    }
    if let Some(dir) = &config.dump_dir {
        snapshot::dir::check_target(dir)?;
    }
    if config.dump_ws.is_some() && control.is_none() {
        return Err(BuildError::WsWithoutController);
    }

    let (exit_tx, exit_rx) = unbounded();
    let (snap_tx, snap_rx) = unbounded();
    let (ws_tx, ws_rx) = unbounded();
    let wiring = Wiring {
        start,
        control: control.clone(),
        exit: exit_tx.clone(),
        snapshot: config.dump_dir.as_ref().map(|_| snap_tx.clone()),
        ws_done: ws_tx,
    };
    let (parts, rootfs_identity) = match config.layers.last() {
        None => (boot(config, &wiring)?, None),
        Some(top) => {
            let (parts, id) = restore(config, top, &wiring)?;
            (parts, Some(id))
        }
    };
    let mut machine = start_machine(config, parts, &wiring, signals)?;
    if config.dump_dir.is_some() {
        machine.rootfs_identity = Some(match rootfs_identity {
            // A restored VM's rootfs was verified against the snapshot.
            Some(id) => disk::IdentityJob::known(id),
            // Hash it while the guest runs towards its snapshot point.
            None => disk::IdentityJob::start(&config.rootfs).map_err(BuildError::Thread)?,
        });
    }

    if let Some(c) = &control {
        c.send(&Event::Ready {
            us: start.elapsed().as_micros() as u64,
        });
    }

    if let Some(w) = &machine.ws {
        watch_fault_handler(&w.handler, wiring.exit.clone())?;
    }

    // The first reason to stop wins; the process exit ends the other threads.
    // (`snap_tx` lives until here, so the snapshot channel never closes.)
    let exit = loop {
        select! {
            recv(exit_rx) -> e => break e.unwrap_or(VmExit::Fatal("all VM threads ended".into())),
            recv(snap_rx) -> _ => break take_snapshot(&machine, config, &wiring),
            recv(ws_rx) -> _ => write_working_set(&mut machine, &wiring),
        }
    };
    lock(&machine.serial).flush();
    // The process exits without dropping the vsock device (its event loop
    // still runs), so remove the listener socket it created here.
    if let Err(e) = std::fs::remove_file(vsock_path(config)) {
        log::debug!("cannot remove the vsock listener socket: {e}");
    }
    // Keep the VM (and so its memory slots) alive until here.
    drop((machine, snap_tx));
    Ok(exit)
}

/// The controller said the first request is done: stop recording and
/// write the working set where `--dump_ws` asked. The VM keeps running.
fn write_working_set(machine: &mut Machine, wiring: &Wiring) {
    let us = || wiring.start.elapsed().as_micros() as u64;
    let event = match machine.ws.as_mut() {
        Some(w) => match w.record_into.take() {
            Some(dir) => {
                let pages = w.handler.stop_recording();
                let faults = w.handler.stats().faults;
                let ram = machine.mem_mib << 20;
                match ws::write(&dir, &pages, w.stack.as_ref(), ram, &w.identity) {
                    Ok(set) => {
                        log::info!(
                            "working set written to {}: {} pages, {} KiB of data, {faults} faults served",
                            dir.display(),
                            set.pages(),
                            set.data_bytes() >> 10
                        );
                        Event::WsWritten {
                            us: us(),
                            dir: dir.display().to_string(),
                            pages: set.pages(),
                            data_bytes: set.data_bytes(),
                            faults,
                        }
                    }
                    Err(e) => Event::WsFailed {
                        us: us(),
                        reason: e.to_string(),
                    },
                }
            }
            None => Event::WsFailed {
                us: us(),
                reason: "no working set is being recorded (already written, or --load_ws)".into(),
            },
        },
        None => Event::WsFailed {
            us: us(),
            reason: "no working set is being recorded (no --dump_ws)".into(),
        },
    };
    if let Event::WsFailed { reason, .. } = &event {
        log::error!("working set not written: {reason}");
    }
    if let Some(c) = &wiring.control {
        c.send(&event);
    }
}

/// Ends the VM if the working-set fault handler dies: a guest page it does
/// not serve would block its vCPU forever.
fn watch_fault_handler(handler: &ws::FaultHandler, exit: Sender<VmExit>) -> Result<(), BuildError> {
    let failure = handler
        .failure()
        .try_clone_to_owned()
        .map_err(BuildError::Thread)?;
    std::thread::Builder::new()
        .name("ws-watch".into())
        .spawn(move || {
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&failure),
                nix::poll::PollFlags::POLLIN,
            )];
            while let Err(nix::errno::Errno::EINTR) =
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE)
            {}
            let _ = exit.send(VmExit::Fatal(
                "the working-set fault handler failed (see the log)".into(),
            ));
        })
        .map(drop)
        .map_err(BuildError::Thread)
}

/// Writes the snapshot `--dump_dir` asks for; the VM ends either way.
fn take_snapshot(machine: &Machine, config: &VmConfig, wiring: &Wiring) -> VmExit {
    let Some(target) = &config.dump_dir else {
        return VmExit::Fatal("a snapshot was requested without --dump_dir".into());
    };
    match snapshot::create::create(machine, target) {
        Ok(written) => {
            if let Some(c) = &wiring.control {
                c.send(&Event::SnapshotWritten {
                    us: wiring.start.elapsed().as_micros() as u64,
                    dir: written.dir.display().to_string(),
                    memory_bytes: written.memory_bytes,
                    create_us: written.elapsed.as_micros() as u64,
                });
            }
            VmExit::Snapshotted(written.dir)
        }
        Err(e) => VmExit::Fatal(format!(
            "cannot write the snapshot to {}: {e}",
            target.display()
        )),
    }
}

/// The boot path: a fresh VM that enters the kernel.
fn boot(config: &VmConfig, wiring: &Wiring) -> Result<Parts, BuildError> {
    let vcpu_count = config.vcpus as u8;
    // A bad CPU template fails before any work is done.
    let template = match &config.cpu_template {
        Some(path) => CpuTemplate::from_file(path)?,
        None => CpuTemplate::default(),
    };
    let (rootfs, appfs) = open_disks(config)?;
    // Refuse an unusable command line before doing any work.
    kernel::cmdline(&config.kernel_args, &[])?;
    let mem = memory::create(config.mem_mib)?;
    let vm = Vm::new()?;
    check_vcpu_limit(&vm, config)?;
    // KVM_SET_USER_MEMORY_REGION costs milliseconds whatever the size:
    // register the slots on a second thread while the rest is built (vCPUs
    // only run once both are done).
    let built = std::thread::scope(|s| {
        let slots = s.spawn(|| vm.register_memory(&mem, false));
        let rest = (|| -> Result<_, BuildError> {
            let kernel = kernel::load(&mem, &config.kernel)?;

            // virtio devices on the MMIO bus, in the order of DESIGN.md: vda, vdb, vsock.
            let mut mmio = Bus::new();
            let mut event_manager = EventManager::new().map_err(BuildError::EventLoop)?;
            let event_loop = LoopPause::new(&mut event_manager)?;
            let vsock = Vsock::new(config.cid, &vsock_path(config))?;
            let (devices, _vsock) = attach_virtio(
                &vm,
                &mem,
                &mut mmio,
                &mut event_manager,
                [rootfs, appfs],
                vsock,
            )?;
            let device_args: Vec<String> = devices.iter().map(|d| d.cmdline_fragment()).collect();

            // Boot structures.
            let cmdline = kernel::cmdline(&config.kernel_args, &device_args)?;
            let (cmdline_addr, cmdline_size) = kernel::write_cmdline(&mem, &cmdline)?;
            log::debug!("kernel command line: {:?}", cmdline.as_cstring().ok());
            boot_params::write(&mem, kernel.setup_header, cmdline_addr, cmdline_size)?;
            mptable::setup(&mem, vcpu_count)?;
            regs::write_boot_tables(&mem)?;

            // Legacy devices on the port-I/O bus.
            let serial = Arc::new(Mutex::new(SerialDevice::new(
                serial_irq(&vm)?,
                console_sink(&config.console)?,
            )));
            let pio = legacy_bus(serial.clone(), wiring)?;

            let supported = vm
                .kvm()
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(BuildError::Cpuid)?;
            template.check_leaves(&supported)?;
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
                vcpu.apply_cpu_template(&template, &supported, shape)?;
                vcpus.push(vcpu);
            }

            Ok((vcpus, devices, serial, pio, mmio, event_manager, event_loop))
        })();
        let slots = slots.join().map_err(|_| {
            BuildError::Thread(std::io::Error::other("memory registration panicked"))
        })?;
        slots?;
        rest
    });
    let (vcpus, devices, serial, pio, mmio, event_manager, event_loop) = built?;

    let start = wiring.start;
    Ok(Parts {
        vm,
        mem,
        vcpus,
        devices,
        serial,
        pio,
        mmio,
        event_manager,
        event_loop,
        layers: Vec::new(),
        ws: None,
        on_first_run: Box::new(move || {
            log::info!(
                "first KVM_RUN {} us after start",
                start.elapsed().as_micros()
            );
        }),
    })
}

/// Restore timings, logged when the first vCPU enters the guest.
struct Phases {
    start: Instant,
    /// Parent's spawn → our `main`, when the parent said when it spawned.
    exec: Option<Duration>,
    marks: Vec<(&'static str, Duration)>,
    last: Duration,
    /// Work done on another thread alongside the marks.
    alongside: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new(start: Instant) -> Self {
        let exec = std::env::var(SPAWN_TIME_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .and_then(|spawned| {
                let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
                let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
                let since_spawn = Duration::from_nanos(now_ns.checked_sub(spawned)?);
                since_spawn.checked_sub(start.elapsed())
            });
        let last = start.elapsed();
        Self {
            start,
            exec,
            marks: vec![("start→restore", last)],
            last,
            alongside: Vec::new(),
        }
    }

    fn mark(&mut self, name: &'static str) {
        let now = self.start.elapsed();
        self.marks.push((name, now - self.last));
        self.last = now;
    }

    /// The log line, completed with the first KVM_RUN.
    fn into_logger(self) -> Box<dyn FnOnce() + Send> {
        Box::new(move || {
            let run = self.start.elapsed();
            let exec = self.exec.unwrap_or_default();
            let mut line = match self.exec {
                Some(e) => format!("spawn→main {}", e.as_micros()),
                None => "spawn→main unknown".to_string(),
            };
            for (name, d) in &self.marks {
                line.push_str(&format!(", {name} {}", d.as_micros()));
            }
            line.push_str(&format!(
                ", →first KVM_RUN {}",
                (run - self.last).as_micros()
            ));
            if !self.alongside.is_empty() {
                let par: Vec<String> = self
                    .alongside
                    .iter()
                    .map(|(n, d)| format!("{n} {}", d.as_micros()))
                    .collect();
                line.push_str(&format!(" [alongside: {}]", par.join(", ")));
            }
            line.push_str(&format!(
                "; first KVM_RUN {} us after spawn",
                (exec + run).as_micros()
            ));
            log::info!("restore phases (us): {line}");
        })
    }
}

/// Most mappings one diff layer may add to guest memory: each merged range
/// of its pages is one mapping (a VMA, and a `mmap` call at restore), so a
/// badly fragmented layer has its remaining ranges copied instead.
const MAX_LAYER_MAPPINGS: usize = 4096;

/// What the memory thread needs from the checked state file.
struct RestorePlan {
    /// The base layer's ranges (its memory table entry).
    base_ranges: Vec<(u64, u64)>,
    /// Each diff layer's memory file and the ranges it holds.
    diffs: Vec<(File, Vec<(u64, u64)>)>,
    /// The top layer's state checksum: what a working set belongs to.
    identity: String,
}

/// A restored VM's working-set machinery (`--dump_ws`, `--load_ws`): its
/// memory is anonymous and every page not yet placed is served on first
/// touch from the layers by the fault handler, which must outlive the
/// vCPUs and devices.
pub(crate) struct WsRuntime {
    handler: ws::FaultHandler,
    stack: Arc<ws::LayerStack>,
    identity: String,
    /// Where `--dump_ws` writes the recording; `None` once written, and
    /// when loading.
    record_into: Option<PathBuf>,
}

/// Builds a restored VM's guest memory on the restore-memory thread: the
/// base mapped (or copied), then — once the state file is checked — the
/// diff layers over it; or, for the working-set modes, anonymous memory
/// behind the fault handler. Registers it with KVM last. Returns the
/// memory, the working-set machinery and the phase timings.
fn restore_memory(
    config: &VmConfig,
    vm: &Vm,
    base_file: File,
    plan_rx: crossbeam_channel::Receiver<RestorePlan>,
) -> Result<(GuestMemoryMmap, Option<WsRuntime>, [Duration; 4]), BuildError> {
    let t = Instant::now();
    let uffd = config.dump_ws.is_some() || config.load_ws;
    let mem = if uffd {
        memory::create(config.mem_mib)?
    } else if config.copy_base {
        let ranges = memory::data_ranges(&base_file)?;
        memory::copy_snapshot(&base_file, config.mem_mib, &ranges)?
    } else {
        memory::map_snapshot(&base_file, config.mem_mib)?
    };
    let t_mem = t.elapsed();
    // Nothing to wait for if the main thread gave up (a refusal).
    let plan = plan_rx
        .recv()
        .map_err(|_| BuildError::Thread(std::io::Error::other("the restore was abandoned")))?;
    let t_plan = t.elapsed();
    let ws = if uffd {
        // --load_ws with copies: those layers go in first, bottom up, so a
        // diff page lands over its base page; the fault handler only ever
        // sees pages that are still missing.
        if config.copy_base {
            memory::copy_ranges(&mem, &base_file, &plan.base_ranges)?;
        }
        if config.copy_diff {
            for (file, ranges) in &plan.diffs {
                memory::copy_ranges(&mem, file, ranges)?;
            }
        }
        let mut layers = vec![(base_file, plan.base_ranges)];
        layers.extend(plan.diffs);
        let stack = Arc::new(ws::LayerStack::new(layers));
        let handler = match &config.dump_ws {
            Some(_) => ws::FaultHandler::record(&mem, stack.clone())?,
            None => {
                let top = config
                    .layers
                    .last()
                    .map_or(Path::new("."), PathBuf::as_path);
                let set = ws::read(top, config.mem_mib << 20, &plan.identity)?;
                log::info!(
                    "working set: {} pages ({} KiB of data) loaded from {}",
                    set.pages(),
                    set.data_bytes() >> 10,
                    top.display()
                );
                ws::load_anonymous(&mem, set, stack.clone(), ws::AnonLoad::Prefetch)?
            }
        };
        Some(WsRuntime {
            handler,
            stack,
            identity: plan.identity,
            record_into: config.dump_ws.clone(),
        })
    } else {
        for (i, (file, ranges)) in plan.diffs.iter().enumerate() {
            if config.copy_diff {
                memory::copy_ranges(&mem, file, ranges)?;
                log::info!("diff layer {}: {} ranges copied", i + 1, ranges.len());
            } else {
                let o = memory::overlay_ranges(&mem, file, ranges, MAX_LAYER_MAPPINGS)?;
                log::info!(
                    "diff layer {}: {} ranges mapped ({} KiB), {} copied ({} KiB)",
                    i + 1,
                    o.mapped,
                    o.mapped_bytes >> 10,
                    o.copied,
                    o.copied_bytes >> 10
                );
            }
        }
        None
    };
    let t_layers = t.elapsed();
    memory::reset_dirty(&mem);
    vm.register_memory(&mem, config.dump_dir.is_some())?;
    let timings = [
        t_mem,
        t_plan - t_mem,
        t_layers - t_plan,
        t.elapsed() - t_layers,
    ];
    Ok((mem, ws, timings))
}

/// The restore path: validates the snapshot stack in `config.layers` (a
/// base, then its diff layers; `top` is the last) against `config`, then rebuilds the VM from
/// the top layer's state in the order KVM needs: VM with irqchip and PIT,
/// memory, vCPU state, clock, devices. No vCPU exists before the snapshot
/// passed every check, and nothing runs until [`start_machine`].
///
/// Creating the VM and mapping and registering its memory cost
/// milliseconds (mostly `KVM_SET_USER_MEMORY_REGION`), so they run on a
/// helper thread while this one reads and checks the state files; the
/// diff layers' ranges reach it once the top state file is read. A refusal
/// simply drops that VM.
fn restore(
    config: &VmConfig,
    top: &Path,
    wiring: &Wiring,
) -> Result<(Parts, format::DiskIdentity), BuildError> {
    let mut phases = Phases::new(wiring.start);
    if config.cpu_template.is_some() {
        return Err(BuildError::TemplateAtRestore);
    }
    format::check_present(top)?;
    let mut files = config
        .layers
        .iter()
        .map(|dir| open_memory_file(config, dir))
        .collect::<Result<Vec<_>, _>>()?;
    let base_file = files.remove(0);
    let (plan_tx, plan_rx) = crossbeam_channel::bounded::<RestorePlan>(1);
    let thread_config = config.clone();
    let memory_thread = std::thread::Builder::new()
        .name("restore-memory".into())
        .spawn(move || -> Result<_, BuildError> {
            let t = Instant::now();
            let vm = Vm::new()?;
            let t_vm = t.elapsed();
            let (mem, ws, timings) = restore_memory(&thread_config, &vm, base_file, plan_rx)?;
            Ok((vm, mem, ws, t_vm, timings))
        })
        .map_err(BuildError::Thread)?;

    let (state, checksum) = format::read(top)?;
    check_snapshot_shape(config, top, &state)?;
    let layers = check_layers(config, top, &state, checksum)?;
    let rootfs_identity = disk::verify(&config.rootfs, &state.rootfs)?;
    let (rootfs, appfs) = open_disks(config)?;
    let vsock = Vsock::new(config.cid, &vsock_path(config))?;
    let console = console_sink(&config.console)?;
    let plan = RestorePlan {
        base_ranges: layers[0].ranges.clone(),
        diffs: files
            .into_iter()
            .zip(&layers[1..])
            .map(|(file, layer)| (file, layer.ranges.clone()))
            .collect(),
        identity: layers
            .last()
            .and_then(|l| l.state_checksum.clone())
            .unwrap_or_default(),
    };
    // The thread holds the receiver until it has the plan.
    let _ = plan_tx.send(plan);
    phases.mark("open+validate");

    let (vm, mem, ws, t_vm, [t_map, t_wait, t_layers, t_slots]) = memory_thread
        .join()
        .map_err(|_| BuildError::Thread(std::io::Error::other("the memory thread panicked")))??;
    phases.mark("memory wait");
    let (copy_base, copy_diff) = (config.copy_base, config.copy_diff);
    phases.alongside = vec![
        ("create VM", t_vm),
        (
            match (&ws, copy_base) {
                (Some(_), _) => "anonymous",
                (None, true) => "copy",
                (None, false) => "mmap",
            },
            t_map,
        ),
        ("wait for layers", t_wait),
        (
            match (&ws, copy_diff) {
                (Some(_), _) if config.load_ws => "load ws",
                (Some(_), _) => "start recorder",
                (None, true) => "copy diffs",
                (None, false) => "map diffs",
            },
            t_layers,
        ),
        ("memslots", t_slots),
    ];
    check_vcpu_limit(&vm, config)?;
    vm.restore_irqchip_and_pit(&state.vm)?;
    let mut vcpus = Vec::new();
    for s in &state.vcpus {
        let vcpu = Vcpu::new(vm.fd(), s.id)?;
        vcpu.restore_state(s)?;
        vcpus.push(vcpu);
    }
    let clock = vm.restore_clock(&state.vm)?;
    phases.mark("KVM state");

    let mut mmio = Bus::new();
    let mut event_manager = EventManager::new().map_err(BuildError::EventLoop)?;
    let event_loop = LoopPause::new(&mut event_manager)?;
    let (devices, vsock) = attach_virtio(
        &vm,
        &mem,
        &mut mmio,
        &mut event_manager,
        [rootfs, appfs],
        vsock,
    )?;
    for (handle, saved) in devices.iter().zip(&state.devices) {
        lock(handle.transport()).restore_state(saved)?;
    }
    let serial = Arc::new(Mutex::new(SerialDevice::restore(
        serial_irq(&vm)?,
        console,
        &state.serial,
    )?));
    let pio = legacy_bus(serial.clone(), wiring)?;
    // No connection survived: tell the guest (its agent reconnects).
    lock(&vsock).send_transport_reset();
    phases.mark("devices");
    log::info!(
        "kvmclock advanced by {} ms (host time since the snapshot); guest clock is {} us off the host's",
        clock.elapsed_ns / 1_000_000,
        clock.error_ns / 1000
    );

    let parts = Parts {
        vm,
        mem,
        vcpus,
        devices,
        serial,
        pio,
        mmio,
        event_manager,
        event_loop,
        layers,
        ws,
        on_first_run: phases.into_logger(),
    };
    Ok((parts, rootfs_identity))
}

/// Refuses a snapshot whose VM shape differs from the command line's.
fn check_snapshot_shape(
    config: &VmConfig,
    dir: &Path,
    s: &SnapshotState,
) -> Result<(), BuildError> {
    let mismatch = |reason: String| BuildError::Mismatch {
        dir: dir.display().to_string(),
        reason,
    };
    if s.shape.mem_mib != config.mem_mib {
        return Err(mismatch(format!(
            "it was taken with --mem_size {} but --mem_size is {}",
            s.shape.mem_mib, config.mem_mib
        )));
    }
    if u64::from(s.shape.vcpus) != config.vcpus {
        return Err(mismatch(format!(
            "it was taken with --vcpu_count {} but --vcpu_count is {}",
            s.shape.vcpus, config.vcpus
        )));
    }
    let ids: Vec<u8> = s.vcpus.iter().map(|v| v.id).collect();
    if ids != (0..s.shape.vcpus).collect::<Vec<_>>() {
        return Err(mismatch(format!("it holds the state of vCPUs {ids:?}")));
    }
    let kinds = |d: &[DeviceEntry]| {
        d.iter()
            .map(|e| format!("{}:{}", e.kind, e.role))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ours = device_list();
    if s.shape.devices != ours || s.devices.len() != ours.len() {
        return Err(mismatch(format!(
            "its devices are [{}], this VM has [{}]",
            kinds(&s.shape.devices),
            kinds(&ours)
        )));
    }
    let layout: Vec<(u64, u64, u64)> = memory::regions(config.mem_mib)?;
    let table: Vec<(u64, u64, u64)> = s
        .memory
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size, r.file_offset))
        .collect();
    if table != layout {
        return Err(mismatch(format!(
            "its RAM regions {table:x?} are not this VM's {layout:x?}"
        )));
    }
    Ok(())
}

/// Checks the top layer's memory table against the layers given: one
/// entry per layer, each lower one the very snapshot the table names (its
/// state checksum), every range a page range of RAM. Returns the stack as
/// a later diff of this VM records it (absolute directories, checksums).
fn check_layers(
    config: &VmConfig,
    top: &Path,
    s: &SnapshotState,
    top_checksum: String,
) -> Result<Vec<MemoryLayer>, BuildError> {
    let given = &config.layers;
    let fail = |reason: String| BuildError::Mismatch {
        dir: top.display().to_string(),
        reason,
    };
    let table = &s.memory.layers;
    if table.len() != given.len() {
        return Err(fail(if table.len() == 1 {
            format!(
                "it is a full snapshot, so it cannot be stacked on {} other layer(s)",
                given.len() - 1
            )
        } else {
            let below: Vec<String> = table[..table.len() - 1]
                .iter()
                .map(|l| l.dir.display().to_string())
                .collect();
            format!(
                "it is a diff snapshot on top of {} layer(s) ({}), but {} were given: pass \
                 them bottom first, --load_dir BASE --diff_dirs DIFF[,DIFF]",
                below.len(),
                below.join(", "),
                given.len() - 1
            )
        }));
    }
    let page = memory::PAGE_SIZE as u64;
    let ram = config.mem_mib << 20;
    let mut stack = Vec::new();
    for (i, (dir, layer)) in given.iter().zip(table).enumerate() {
        let is_top = i + 1 == given.len();
        let checksum = if is_top {
            if layer.dir != Path::new(".") || layer.state_checksum.is_some() {
                return Err(fail(
                    "its memory table does not end with its own layer".into(),
                ));
            }
            top_checksum.clone()
        } else {
            let found = format::checksum(dir)?;
            if layer.state_checksum.as_deref() != Some(found.as_str()) {
                return Err(fail(format!(
                    "it was taken on top of {} (state checksum {}), but layer {} given is {} \
                     (state checksum {found}): a layer whose parent is not the given one is refused",
                    layer.dir.display(),
                    layer.state_checksum.as_deref().unwrap_or("none"),
                    i + 1,
                    dir.display()
                )));
            }
            found
        };
        for &(off, l) in &layer.ranges {
            if off % page != 0 || l % page != 0 || off.checked_add(l).is_none_or(|e| e > ram) {
                return Err(fail(format!(
                    "layer {} has range {off:#x}+{l:#x}, which is not a page range of RAM",
                    i + 1
                )));
            }
        }
        stack.push(MemoryLayer {
            dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()),
            state_checksum: Some(checksum),
            ranges: layer.ranges.clone(),
        });
    }
    Ok(stack)
}

/// Opens a layer's memory file read-only and checks it covers guest RAM
/// exactly (a shorter file would fault the guest on its tail).
fn open_memory_file(config: &VmConfig, dir: &Path) -> Result<File, BuildError> {
    let path = dir.join(format::MEMORY_FILE);
    let fail = |reason: String| BuildError::MemoryFile {
        dir: dir.display().to_string(),
        path: path.display().to_string(),
        reason,
    };
    let file = File::open(&path).map_err(|e| fail(e.to_string()))?;
    let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let want = config.mem_mib << 20;
    if len != want {
        return Err(fail(format!(
            "it is {len} bytes, guest RAM is {want} (truncated, or another --mem_size)"
        )));
    }
    Ok(file)
}

fn check_vcpu_limit(vm: &Vm, config: &VmConfig) -> Result<(), BuildError> {
    let max = vm.max_vcpus().min(MAX_VCPUS as usize);
    if config.vcpus > max as u64 {
        return Err(BuildError::VcpuCount {
            got: config.vcpus,
            max,
        });
    }
    Ok(())
}

/// Opens the rootfs and the appfs (an empty disk without `--appfs`).
fn open_disks(config: &VmConfig) -> Result<(Block, Block), BuildError> {
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
    Ok((rootfs, appfs))
}

/// Where the vsock device listens (`--vsock_uds`, else a per-process path).
fn vsock_path(config: &VmConfig) -> PathBuf {
    config.vsock_uds.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("snapvm-{}.vsock", std::process::id()))
    })
}

/// Places the three virtio devices in their slots (vda, vdb, vsock).
/// Returns the handles and the vsock device.
fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    event_manager: &mut EventManager,
    [rootfs, appfs]: [Block; 2],
    vsock: Vsock,
) -> Result<(Vec<MmioDeviceHandle>, Arc<Mutex<Vsock>>), BuildError> {
    let vsock = Arc::new(Mutex::new(vsock));
    let devices: [SharedDevice; 3] = [
        Arc::new(Mutex::new(rootfs)),
        Arc::new(Mutex::new(appfs)),
        vsock.clone(),
    ];
    let mut handles = Vec::new();
    for (slot, device) in devices.into_iter().enumerate() {
        handles.push(mmio::register(
            vm.fd(),
            mmio,
            event_manager,
            mem,
            device,
            slot as u32,
        )?);
    }
    Ok((handles, vsock))
}

/// The serial port's interrupt line (an irqfd on IRQ 4).
fn serial_irq(vm: &Vm) -> Result<EventFd, BuildError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.fd()
        .register_irqfd(&irq, layout::SERIAL_IRQ)
        .map_err(|source| BuildError::Irqfd {
            gsi: layout::SERIAL_IRQ,
            source,
        })?;
    Ok(irq)
}

/// The port-I/O bus: serial, i8042, control port.
fn legacy_bus(serial: Arc<Mutex<SerialDevice>>, wiring: &Wiring) -> Result<Bus, BuildError> {
    let mut pio = Bus::new();
    pio.insert(
        serial,
        u64::from(layout::SERIAL_PORT),
        u64::from(layout::SERIAL_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(ResetTrigger(wiring.exit.clone())))),
        u64::from(layout::I8042_PORT),
        u64::from(layout::I8042_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(ControlPort::new(
            wiring.start,
            GuestSignals {
                exit: wiring.exit.clone(),
                control: wiring.control.clone(),
                snapshot: wiring.snapshot.clone(),
                snapshot_requested: AtomicBool::new(false),
                app_failed: AtomicBool::new(false),
            },
        ))),
        u64::from(layout::CONTROL_PORT),
        1,
    )?;
    Ok(pio)
}

/// Starts the event loop, the control and signal threads and the vCPUs.
fn start_machine(
    config: &VmConfig,
    parts: Parts,
    wiring: &Wiring,
    signals: SigSet,
) -> Result<Machine, BuildError> {
    let Parts {
        vm,
        mem,
        vcpus,
        devices,
        serial,
        pio,
        mmio,
        event_manager,
        event_loop,
        layers,
        ws,
        on_first_run,
    } = parts;
    // vCPUs first: they are what a restore waits for. A queue notification
    // they make before the event loop runs waits in its eventfd, and the
    // termination signals stay blocked (pending) until their thread waits.
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut on_first_run = Some(on_first_run);
    let mut handles = Vec::new();
    for vcpu in vcpus {
        let first = if vcpu.id() == 0 {
            on_first_run.take()
        } else {
            None
        };
        handles.push(vcpu.spawn(VcpuContext {
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            exit: wiring.exit.clone(),
            start: wiring.start,
            on_first_run: first,
        })?);
    }
    spawn_event_loop(event_manager, wiring.exit.clone())?;
    if let Some(c) = &wiring.control {
        spawn_control_thread(c.clone(), wiring.exit.clone(), wiring.ws_done.clone())?;
    }
    spawn_signal_thread(signals, wiring.exit.clone())?;
    Ok(Machine {
        rootfs_identity: None,
        vm,
        mem,
        mem_mib: config.mem_mib,
        vcpus: Vcpus::new(handles),
        devices,
        serial,
        event_loop,
        rootfs: config.rootfs.clone(),
        layers,
        ws,
    })
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

fn spawn_control_thread(
    control: Arc<Channel>,
    exit: Sender<VmExit>,
    ws_done: Sender<()>,
) -> Result<(), BuildError> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let served = control.serve(|cmd| match cmd {
                Command::Shutdown => {
                    let _ = exit.send(VmExit::Shutdown);
                }
                Command::WsDone => {
                    let _ = ws_done.send(());
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
