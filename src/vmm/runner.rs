//! Running a built VM, whether booted ([`super::boot`]) or restored
//! ([`super::restore`]), until the first reason to stop, then an orderly
//! teardown.
//!
//! Threads: one per vCPU, and this one, which runs the event loop — the
//! devices, the controller's channel, the termination signals (a
//! signalfd), a working-set fault handler's failure — and does what the
//! guest's snapshot point or the controller's `ws_done` asks, between two
//! events. The working-set machinery adds its fault handler (and, while it
//! loads, a prefetch thread); hashing a booted VM's rootfs for its
//! snapshot adds one thread until it is done. Each of them confines itself
//! to its own seccomp allow-list once set up ([`super::seccomp`]); this
//! one does so just before it reports the VM ready.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::boot::{self, BootError};
use super::bus::{lock, Bus, BusError};
use super::capture;
use super::config::{Start, VmConfig};
use super::devices::control::{ControlPort, GuestSignal, SignalSink};
use super::devices::i8042::I8042;
use super::devices::serial::SerialDevice;
use super::devices::VirtioDevices;
use super::event_loop::{EventManager, Subscriber, Wake, Waker};
use super::layout;
use super::memory::{GuestMemoryMmap, WsRuntime};
use super::restore::{self, RestoreError};
use super::seccomp::{self, SeccompError, ThreadClass};
use super::shell::Shell;
use super::vcpu::{self, Vcpu, VcpuContext, VcpuError, Vcpus};
use super::vm::KvmVm;
use super::VmExit;
use crate::control::{AfterSnapshot, Channel, Command, Event};
use crate::snapshot::format::MemoryLayer;
use crate::snapshot::{self, disk};

/// Environment variable a parent may set to CLOCK_MONOTONIC (ns) just
/// before it spawns firerunner, so the log can say how long exec took.
pub const SPAWN_TIME_ENV: &str = "SNAPVM_SPAWN_MONO_NS";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("--mem_size {mib} MiB is more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { mib: u64, host_mib: u64 },
    #[error(
        "--dump_ws needs a controller (singlevm, multivm) to say when the first request is done"
    )]
    WsWithoutController,
    #[error("--snapshot_dir needs a controller (singlevm, multivm) to send `snapshot` commands")]
    SnapshotWithoutController,
    #[error("--snapshot_dir {0} is not a directory")]
    SnapshotDir(PathBuf),
    #[error(transparent)]
    DumpDir(#[from] snapshot::dir::DirError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start a VMM thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot take termination signals: {0}")]
    Signals(nix::Error),
    #[error("cannot create the event-loop wake-up eventfd: {0}")]
    Waker(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Rootfs(#[from] disk::DiskError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("a shell restores a snapshot; it cannot boot a kernel")]
    BootInShell,
}

fn host_ram_mib() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|i| i.ram_total() >> 20)
        .unwrap_or(u64::MAX)
}

/// Where a VM's events go, whichever way it was built.
pub(super) struct Wiring {
    pub start: Instant,
    pub control: Option<Arc<Channel>>,
    pub exit: Wake<VmExit>,
    snapshot: Option<Wake<()>>,
}

/// A built VM whose threads have not started.
pub(super) struct BuiltVm {
    pub vm: KvmVm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub devices: VirtioDevices,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub pio: Bus,
    pub mmio: Bus,
    pub event_manager: EventManager,
    /// The snapshot layers this VM was restored from, bottom first, with
    /// their state checksums (empty for a booted VM). A snapshot of this
    /// VM is a diff layer on top of them.
    pub layers: Vec<MemoryLayer>,
    pub ws: Option<WsRuntime>,
    /// Runs on vCPU 0's thread just before its first `KVM_RUN`.
    pub on_first_run: Box<dyn FnOnce() + Send>,
}

/// A running VM: everything that drives it and everything a snapshot saves.
pub(super) struct Machine {
    pub vm: KvmVm,
    pub mem: GuestMemoryMmap,
    pub mem_mib: u64,
    pub vcpus: Vcpus,
    pub devices: VirtioDevices,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub rootfs: PathBuf,
    /// The rootfs identity for the snapshot, hashed while the guest runs
    /// (`--dump_dir` only).
    pub rootfs_identity: Option<disk::IdentityJob>,
    pub layers: Vec<MemoryLayer>,
    /// The working-set fault handler and what it serves; kept for the life
    /// of the VM.
    pub ws: Option<WsRuntime>,
}

/// Test hooks, compiled in only with the `test-hooks` feature (the
/// integration tests enable it; release binaries never carry them).
#[cfg(feature = "test-hooks")]
pub mod hooks {
    use std::time::Duration;

    /// When set to N, firerunner allocates and writes N MiB of its own
    /// memory, so that a test can make the VMM outgrow its cgroup's limit.
    pub const HOG_MIB_ENV: &str = "SNAPVM_TEST_HOG_MIB";
    /// Milliseconds after start to do it (default 0).
    pub const HOG_AFTER_MS_ENV: &str = "SNAPVM_TEST_HOG_AFTER_MS";

    fn number(name: &str) -> Option<u64> {
        std::env::var(name).ok()?.parse().ok()
    }

    /// Starts the allocation thread when [`HOG_MIB_ENV`] asks for one.
    pub(super) fn start_hog() {
        let Some(mib) = number(HOG_MIB_ENV) else {
            return;
        };
        let after = Duration::from_millis(number(HOG_AFTER_MS_ENV).unwrap_or(0));
        std::thread::spawn(move || {
            std::thread::sleep(after);
            log::warn!("test hook: allocating {mib} MiB");
            // Written, not just reserved: every page is charged.
            let hog = std::hint::black_box(vec![0x5au8; (mib as usize) << 20]);
            log::warn!("test hook: holding {} MiB", hog.len() >> 20);
            loop {
                std::thread::park();
            }
        });
    }
}

/// The termination signals (SIGTERM, SIGINT, SIGHUP) blocked and taken
/// through a signalfd. Called before any other thread exists, so that
/// every thread inherits the mask.
pub fn termination_signals() -> Result<SignalFd, StartError> {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(StartError::Signals)?;
    SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(StartError::Signals)
}

/// Builds the VM `config` describes — booted, or restored (into `shell`
/// when given) — runs it and returns why it ended. `start` is when the
/// process started (for timing logs); `control`, when given, is the
/// channel to the controller that spawned us; `signal_fd` is
/// [`termination_signals`]'.
pub fn run(
    config: &VmConfig,
    start: Instant,
    control: Option<Arc<Channel>>,
    signal_fd: SignalFd,
    shell: Option<Shell>,
) -> Result<VmExit, StartError> {
    #[cfg(feature = "test-hooks")]
    hooks::start_hog();

    let host_mib = host_ram_mib();
    if config.mem_mib > host_mib {
        return Err(StartError::MemoryTooLarge {
            mib: config.mem_mib,
            host_mib,
        });
    }
    if let Some(dir) = &config.dump_dir {
        snapshot::dir::check_target(dir)?;
    }
    if config.records_working_set() && control.is_none() {
        return Err(StartError::WsWithoutController);
    }
    if let Some(dir) = &config.snapshot_dir {
        if control.is_none() {
            return Err(StartError::SnapshotWithoutController);
        }
        if !dir.is_dir() {
            return Err(StartError::SnapshotDir(dir.clone()));
        }
    }

    let waker = Waker::new().map_err(StartError::Waker)?;
    let (exit_tx, exit_rx) = unbounded();
    let (snap_tx, snap_rx) = unbounded();
    let (ws_tx, ws_rx) = unbounded();
    let (now_tx, now_rx) = unbounded();
    let exit = Wake::new(exit_tx, &waker);
    let wiring = Wiring {
        start,
        control: control.clone(),
        exit: exit.clone(),
        snapshot: config
            .dump_dir
            .as_ref()
            .map(|_| Wake::new(snap_tx.clone(), &waker)),
    };
    let (built, rootfs_identity) = match (&config.start, shell) {
        (Start::Boot(b), None) => (boot::boot(config, b, &wiring)?, None),
        (Start::Boot(_), Some(_)) => return Err(StartError::BootInShell),
        (Start::Restore(r), shell) => {
            let (built, id) = restore::restore(config, r, &wiring, shell)?;
            (built, Some(id))
        }
    };
    let (mut machine, mut event_manager) = start_machine(config, built, &wiring)?;
    if config.snapshots() {
        machine.rootfs_identity = Some(match rootfs_identity {
            // A restored VM's rootfs was verified against the snapshot.
            Some(id) => disk::IdentityJob::known(id),
            // Hash it while the guest runs towards its snapshot point.
            None => disk::IdentityJob::start(&config.rootfs, || {
                seccomp::install(ThreadClass::RootfsHash)
            })?,
        });
    }

    // The loop's own sources: the wake-up, signals, the controller, and
    // the fault handler's failure.
    event_manager.add_subscriber(waker.subscriber());
    event_manager.add_subscriber(Arc::new(Mutex::new(Signals {
        fd: signal_fd,
        exit: exit.clone(),
    })));
    if let Some(c) = &control {
        event_manager.add_subscriber(Arc::new(Mutex::new(ControlCommands {
            channel: c.clone(),
            start,
            pending: Vec::new(),
            exit: exit.clone(),
            ws_done: ws_tx.clone(),
            snapshot: now_tx.clone(),
        })));
    }
    if let Some(w) = &machine.ws {
        let failure = w
            .failure()
            .try_clone_to_owned()
            .map_err(StartError::Thread)?;
        let sub: Subscriber = Arc::new(Mutex::new(FaultHandlerWatch {
            failure,
            exit: exit.clone(),
        }));
        event_manager.add_subscriber(sub);
    }

    // Every thread is started and set up: from here on this one only
    // serves events (and, with --dump_dir/--dump_ws, writes files).
    seccomp::install(ThreadClass::EventLoop)?;
    if let Some(c) = &control {
        c.send(&Event::Ready {
            us: start.elapsed().as_micros() as u64,
        });
    }

    let exit = serve(
        &mut machine,
        &mut event_manager,
        config,
        &wiring,
        Receivers {
            exit: &exit_rx,
            snapshot_point: &snap_rx,
            ws_done: &ws_rx,
            snapshot_now: &now_rx,
        },
    );
    teardown(machine, event_manager, config);
    drop((snap_tx, ws_tx, now_tx));
    Ok(exit)
}

/// What the event loop acts on between two events.
struct Receivers<'a> {
    exit: &'a Receiver<VmExit>,
    /// The guest reached its snapshot point (`--dump_dir`).
    snapshot_point: &'a Receiver<()>,
    /// The controller's `ws_done`.
    ws_done: &'a Receiver<()>,
    /// The controller's `snapshot`: name and what to do after.
    snapshot_now: &'a Receiver<(String, AfterSnapshot)>,
}

/// The event loop: devices and the loop's own sources, until the first
/// reason to stop. (The channels' senders live until the caller's end, so
/// they never close.)
fn serve(
    machine: &mut Machine,
    event_manager: &mut EventManager,
    config: &VmConfig,
    wiring: &Wiring,
    rx: Receivers<'_>,
) -> VmExit {
    loop {
        if let Ok(exit) = rx.exit.try_recv() {
            return exit;
        }
        if rx.snapshot_point.try_recv().is_ok() {
            return take_snapshot(machine, config, wiring);
        }
        while rx.ws_done.try_recv().is_ok() {
            write_working_set(machine, wiring);
        }
        while let Ok((name, then)) = rx.snapshot_now.try_recv() {
            if let Some(exit) = snapshot_now(machine, config, wiring, &name, then) {
                return exit;
            }
        }
        if let Err(e) = event_manager.run() {
            return VmExit::Fatal(format!("device event loop failed: {e}"));
        }
    }
}

/// How long the vCPU threads may take to end at teardown.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Stops the vCPUs, then drops the VM in order: devices (vsock removes
/// its listener socket), the event loop, guest memory, the KVM VM.
fn teardown(machine: Machine, event_manager: EventManager, config: &VmConfig) {
    lock(&machine.serial).flush();
    let Machine {
        vm,
        mem,
        vcpus,
        devices,
        serial,
        ws,
        ..
    } = machine;
    if !vcpus.stop(STOP_TIMEOUT) {
        // A vCPU still holds the devices: remove the listener socket here,
        // the process exit ends the rest.
        if let Err(e) = std::fs::remove_file(config.vsock_path()) {
            log::debug!("cannot remove the vsock listener socket: {e}");
        }
    }
    drop((devices, serial, event_manager));
    // The fault handler outlives everything that touches guest memory.
    drop((mem, vm, ws));
}

/// The controller said the first request is done: stop recording and
/// write the working set where `--dump_ws` asked. The VM keeps running.
fn write_working_set(machine: &mut Machine, wiring: &Wiring) {
    let us = wiring.start.elapsed().as_micros() as u64;
    let ram = machine.mem_mib << 20;
    let event = match machine.ws.as_mut() {
        Some(w) => match w.write_recording(ram) {
            Ok((dir, set, faults)) => {
                log::info!(
                    "working set written to {}: {} pages, {} KiB of data, {faults} faults served",
                    dir.display(),
                    set.pages(),
                    set.data_bytes() >> 10
                );
                Event::WsWritten {
                    us,
                    dir: dir.display().to_string(),
                    pages: set.pages(),
                    data_bytes: set.data_bytes(),
                    faults,
                }
            }
            Err(reason) => Event::WsFailed { us, reason },
        },
        None => Event::WsFailed {
            us,
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

/// Tells the controller a snapshot is in place.
fn report_written(wiring: &Wiring, written: &capture::Written) {
    if let Some(c) = &wiring.control {
        c.send(&Event::SnapshotWritten {
            us: wiring.start.elapsed().as_micros() as u64,
            dir: written.dir.display().to_string(),
            memory_bytes: written.memory_bytes,
            create_us: written.elapsed.as_micros() as u64,
        });
    }
}

/// Writes the snapshot `--dump_dir` asks for; the VM ends either way.
fn take_snapshot(machine: &Machine, config: &VmConfig, wiring: &Wiring) -> VmExit {
    let Some(target) = &config.dump_dir else {
        return VmExit::Fatal("a snapshot was requested without --dump_dir".into());
    };
    match capture::create(machine, target) {
        Ok(written) => {
            report_written(wiring, &written);
            VmExit::Snapshotted(written.dir)
        }
        Err(e) => VmExit::Fatal(format!(
            "cannot write the snapshot to {}: {e}",
            target.display()
        )),
    }
}

/// The controller's `snapshot`: pauses the VM wherever it is and writes
/// `--snapshot_dir`/`name`; then resumes it (`None`) or ends it. A refusal
/// or a failed write leaves the VM running and says why.
fn snapshot_now(
    machine: &mut Machine,
    config: &VmConfig,
    wiring: &Wiring,
    name: &str,
    then: AfterSnapshot,
) -> Option<VmExit> {
    let fail = |reason: String| {
        log::error!("snapshot {name:?} refused or failed: {reason}");
        if let Some(c) = &wiring.control {
            c.send(&Event::SnapshotFailed {
                us: wiring.start.elapsed().as_micros() as u64,
                reason,
            });
        }
        None
    };
    let Some(dir) = &config.snapshot_dir else {
        return fail("firerunner was started without --snapshot_dir".into());
    };
    if machine.ws.is_some() {
        return fail(
            "the VM records or loads a working set (--dump_ws, --load_ws): its memory is not \
             the VM's alone to read"
                .into(),
        );
    }
    if let Err(why) = check_snapshot_name(name) {
        return fail(why);
    }
    let target = dir.join(name);
    if target.symlink_metadata().is_ok() {
        return fail(format!("{} already exists", target.display()));
    }
    match capture::create(machine, &target) {
        Ok(written) => {
            report_written(wiring, &written);
            if then == AfterSnapshot::Exit {
                return Some(VmExit::Snapshotted(written.dir));
            }
            // The dirty log restarted with the snapshot: the next diff
            // lies over this layer.
            if !machine.layers.is_empty() {
                machine.layers.push(written.layer);
            }
            resume(machine)
        }
        Err(e) => {
            // Nothing is left half-written (the directory is renamed into
            // place last); the VM goes on as before.
            let exit = resume(machine);
            fail(format!("cannot write {}: {e}", target.display()));
            exit
        }
    }
}

/// Lets paused vCPUs run again; a VM that cannot resume ends.
fn resume(machine: &Machine) -> Option<VmExit> {
    match machine.vcpus.resume(capture::PAUSE_TIMEOUT) {
        Ok(()) => None,
        Err(e) => Some(VmExit::Fatal(format!(
            "cannot resume the vCPUs after a snapshot: {e}"
        ))),
    }
}

/// A snapshot name is one plain path component.
fn check_snapshot_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\0']);
    if plain {
        Ok(())
    } else {
        Err(format!(
            "snapshot name {name:?} is not one plain file name (no '/', NUL or leading '.', at most 255 bytes)"
        ))
    }
}

/// Logs the guest's control-port signals, reports them to the controller,
/// ends the VM when the app failed to load, and at the snapshot point asks
/// for a snapshot when one is wanted.
struct GuestSignals {
    exit: Wake<VmExit>,
    control: Option<Arc<Channel>>,
    /// Where to ask for a snapshot (`--dump_dir` given).
    snapshot: Option<Wake<()>>,
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
struct ResetTrigger(Wake<VmExit>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        let _ = self.0.send(VmExit::Reset);
        Ok(())
    }
}

/// The port-I/O bus: serial, i8042, control port.
pub(super) fn legacy_bus(
    serial: Arc<Mutex<SerialDevice>>,
    wiring: &Wiring,
) -> Result<Bus, BusError> {
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

/// Starts the vCPUs; the caller runs the event loop.
fn start_machine(
    config: &VmConfig,
    built: BuiltVm,
    wiring: &Wiring,
) -> Result<(Machine, EventManager), StartError> {
    let BuiltVm {
        vm,
        mem,
        vcpus,
        devices,
        serial,
        pio,
        mmio,
        event_manager,
        layers,
        ws,
        on_first_run,
    } = built;
    // A queue notification a vCPU makes before the event loop runs waits
    // in its eventfd, and a termination signal in the signalfd.
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
            on_first_run: first,
        })?);
    }
    let machine = Machine {
        rootfs_identity: None,
        vm,
        mem,
        mem_mib: config.mem_mib,
        vcpus: Vcpus::new(handles),
        devices,
        serial,
        rootfs: config.rootfs.clone(),
        layers,
        ws,
    };
    Ok((machine, event_manager))
}

/// Termination signals, through a signalfd.
struct Signals {
    fd: SignalFd,
    exit: Wake<VmExit>,
}

impl MutEventSubscriber for Signals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok(Some(info)) = self.fd.read_signal() {
            let sig = info.ssi_signo as i32;
            let name = Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
            log::info!("received {name}: stopping the VM");
            let _ = self.exit.send(VmExit::Signal(sig));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch the termination signals: {e}");
        }
    }
}

/// The controller's commands; its channel closing stops the VM.
struct ControlCommands {
    channel: Arc<Channel>,
    /// When firerunner started (event times).
    start: Instant,
    pending: Vec<u8>,
    exit: Wake<VmExit>,
    ws_done: Sender<()>,
    snapshot: Sender<(String, AfterSnapshot)>,
}

impl MutEventSubscriber for ControlCommands {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let stop = match self.channel.read_commands(&mut self.pending) {
            Ok(Some(commands)) => {
                for cmd in commands {
                    match cmd {
                        Command::Shutdown => {
                            let _ = self.exit.send(VmExit::Shutdown);
                        }
                        Command::WsDone => {
                            let _ = self.ws_done.send(());
                        }
                        Command::Snapshot { name, then } => {
                            let _ = self.snapshot.send((name, then));
                        }
                        Command::Restore(_) => self.channel.send(&Event::RestoreFailed {
                            us: self.start.elapsed().as_micros() as u64,
                            reason: "this firerunner runs a VM already: only a shell restores"
                                .into(),
                        }),
                    }
                }
                false
            }
            Ok(None) => {
                log::info!("the controller closed the control channel: stopping the VM");
                true
            }
            Err(e) => {
                log::error!("{e}: stopping the VM");
                true
            }
        };
        if stop {
            let _ = ops.remove(Events::new(&self.channel.as_fd(), EventSet::IN));
            let _ = self.exit.send(VmExit::Shutdown);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.channel.as_fd(), EventSet::IN)) {
            log::error!("cannot watch the control channel: {e}");
        }
    }
}

/// Ends the VM when the working-set fault handler fails.
struct FaultHandlerWatch {
    failure: std::os::fd::OwnedFd,
    exit: Wake<VmExit>,
}

impl MutEventSubscriber for FaultHandlerWatch {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = ops.remove(Events::new(&self.failure, EventSet::IN));
        let _ = self.exit.send(VmExit::Fatal(
            "the working-set fault handler failed (see the log)".into(),
        ));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.failure, EventSet::IN)) {
            log::error!("cannot watch the working-set fault handler: {e}");
        }
    }
}
