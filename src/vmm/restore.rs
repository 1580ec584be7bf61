//! The restore path, beside the boot path: a VM rebuilt from a stack of
//! snapshot layers (a base, then its diff layers; the top one's state is
//! restored). Every check comes first — the state file, the VM shape and
//! device list, the layer stack, the rootfs — and nothing runs until the
//! run loop (`super::runner`) starts the built VM. Then, in the order KVM
//! needs: the VM with irqchip and PIT, guest memory, the vCPUs' state,
//! kvmclock, the devices (each restoring its own state and side effects).
//!
//! Creating the VM and mapping and registering its memory cost
//! milliseconds (mostly `KVM_SET_USER_MEMORY_REGION`), so they run on a
//! helper thread while this one reads and checks the state files; the diff
//! layers' ranges reach it once the top state file is read. A refusal
//! simply drops that VM. Restored into a shell ([`super::shell`]), the VM,
//! its vCPUs and its registered memory are already there: the helper
//! thread only fills the memory, once every check has passed.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::boot::{check_vcpu_limit, BootError};
use super::bus::{Bus, BusError};
use super::config::{RestoreConfig, RestoreMemory, VmConfig};
use super::devices::{self, DeviceConfig, DeviceError, VirtioDevices};
use super::event_loop::EventManager;
use super::memory::restore::{self as fill, FillError, RestorePlan};
use super::memory::{self, MemoryError};
use super::persist::{MicrovmState, Persist};
use super::runner::{legacy_bus, BuiltVm, Wiring, SPAWN_TIME_ENV};
use super::shell::Shell;
use super::vcpu::{Vcpu, VcpuError};
use super::vm::{KvmVm, KvmVmError};
use crate::snapshot::disk::{self, DiskError};
use crate::snapshot::format::{self, DeviceEntry, DiskIdentity, FormatError, MemoryLayer};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot restore: {0}")]
    Format(#[from] FormatError),
    #[error("cannot restore: {0}")]
    Rootfs(#[from] DiskError),
    #[error("cannot restore {dir}: {reason}")]
    Mismatch { dir: String, reason: String },
    #[error("cannot restore {dir}: its memory file {path}: {reason}")]
    MemoryFile {
        dir: String,
        path: String,
        reason: String,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error(transparent)]
    Vm(#[from] KvmVmError),
    #[error(transparent)]
    VcpuLimit(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("cannot restore the serial port: {0}")]
    Serial(#[from] devices::serial::SerialError),
    #[error("cannot create the device event loop: {0}")]
    EventLoop(event_manager::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot start the restore-memory thread: {0}")]
    Thread(std::io::Error),
    #[error("the restore-memory thread panicked")]
    Panicked,
}

/// Builds the VM restored from `r.layers` (into `shell`, when given);
/// returns it and the rootfs identity the snapshot was checked against.
pub(super) fn restore(
    config: &VmConfig,
    r: &RestoreConfig,
    wiring: &Wiring,
    shell: Option<Shell>,
) -> Result<(BuiltVm, DiskIdentity), RestoreError> {
    let mut phases = Phases::new(wiring.start);
    let top = r.top();
    format::check_present(top)?;
    let mut files = r
        .layers
        .iter()
        .map(|dir| open_memory_file(config.mem_mib, dir))
        .collect::<Result<Vec<_>, _>>()?;
    let base_file = files.remove(0);

    // The VM and its memory, on a helper thread.
    let (plan_tx, plan_rx) = crossbeam_channel::bounded::<RestorePlan>(1);
    let (thread_r, mem_mib, log_dirty) = (r.clone(), config.mem_mib, config.snapshots());
    let (shell_vm, shell_vcpus) = match shell {
        Some(s) => (Some((s.vm, s.mem, s.log_dirty)), Some(s.vcpus)),
        None => (None, None),
    };
    let memory_thread = std::thread::Builder::new()
        .name("restore-memory".into())
        .spawn(move || -> Result<_, RestoreError> {
            let t = Instant::now();
            let Some((vm, mem, shell_logs)) = shell_vm else {
                let vm = KvmVm::new()?;
                let t_vm = t.elapsed();
                let filled = fill::fill(&thread_r, mem_mib, base_file, plan_rx, None)?;
                let t_slots = Instant::now();
                vm.register_memory(&filled.mem, log_dirty)?;
                return Ok((vm, filled, t_vm, t_slots.elapsed()));
            };
            let filled = fill::fill(&thread_r, mem_mib, base_file, plan_rx, Some(mem))?;
            if shell_logs {
                // Nothing has run yet, so the log should be clean; a diff
                // layer must not hold the restore's own writes, whatever
                // KVM counted.
                vm.take_dirty_log(&filled.mem)?;
            }
            Ok((vm, filled, Duration::ZERO, Duration::ZERO))
        })
        .map_err(RestoreError::Thread)?;

    // Meanwhile: read and check the state, open the devices.
    let (state, checksum) = format::read::<MicrovmState>(top)?;
    check_snapshot_shape(config, top, &state)?;
    let layers = check_layers(config.mem_mib, r, &state, checksum)?;
    let rootfs_identity = disk::verify(&config.rootfs, &state.rootfs)?;
    let mut devices = VirtioDevices::open(&DeviceConfig {
        rootfs: &config.rootfs,
        appfs: config.appfs.as_deref(),
        cid: config.cid,
        vsock_uds: &config.vsock_path(),
        net: config.net.as_ref(),
    })?;
    let console = devices::console_sink(config.console.as_ref())?;
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

    let (mut vm, filled, t_vm, t_slots) =
        memory_thread.join().map_err(|_| RestoreError::Panicked)??;
    phases.mark("memory wait");
    phases.alongside = alongside(&r.memory, t_vm, filled.timings, t_slots);
    let (mem, ws) = (filled.mem, filled.ws);

    // KVM state: irqchip and PIT, then the vCPUs, then kvmclock.
    check_vcpu_limit(&vm, config.vcpus)?;
    vm.restore(&state.vm)?;
    let mut vcpus = match shell_vcpus {
        Some(v) => v,
        None => {
            let msrs = Arc::new(vm.msr_index_list()?);
            state
                .vcpus
                .iter()
                .map(|s| Vcpu::new(vm.fd(), s.id, msrs.clone()))
                .collect::<Result<_, _>>()?
        }
    };
    // check_snapshot_shape: the states are those of vCPUs 0..n, in order.
    for (vcpu, s) in vcpus.iter_mut().zip(&state.vcpus) {
        vcpu.restore(s)?;
    }
    let clock = vm.restore_clock(&state.vm)?;
    phases.mark("KVM state");

    // Devices: each restores its own state (vsock tells the guest its
    // connections are gone).
    let mut mmio = Bus::new();
    let mut event_manager = EventManager::new().map_err(RestoreError::EventLoop)?;
    devices.attach(&vm, &mem, &mut mmio, &mut event_manager)?;
    devices.restore(&state.devices)?;
    let mut serial = devices::serial(&vm, console)?;
    serial.restore(&state.serial)?;
    let serial = Arc::new(Mutex::new(serial));
    let pio = legacy_bus(serial.clone(), wiring)?;
    phases.mark("devices");
    log::info!(
        "kvmclock advanced by {} ms (host time since the snapshot); guest clock is {} us off the host's",
        clock.elapsed_ns / 1_000_000,
        clock.error_ns / 1000
    );

    let built = BuiltVm {
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
        on_first_run: phases.into_logger(),
    };
    Ok((built, rootfs_identity))
}

/// The memory thread's phases, named for what it did.
fn alongside(
    memory: &RestoreMemory,
    t_vm: Duration,
    [t_map, t_wait, t_layers]: [Duration; 3],
    t_slots: Duration,
) -> Vec<(&'static str, Duration)> {
    let copies = memory.copies();
    vec![
        ("create VM", t_vm),
        (
            match (memory.uses_fault_handler(), copies.base) {
                (true, _) => "anonymous",
                (false, true) => "copy",
                (false, false) => "mmap",
            },
            t_map,
        ),
        ("wait for layers", t_wait),
        (
            match (memory, copies.diffs) {
                (RestoreMemory::LoadWorkingSet(_), _) => "load ws",
                (RestoreMemory::RecordWorkingSet { .. }, _) => "start recorder",
                (RestoreMemory::Layers(_), true) => "copy diffs",
                (RestoreMemory::Layers(_), false) => "map diffs",
            },
            t_layers,
        ),
        ("memslots", t_slots),
    ]
}

/// Refuses a snapshot whose VM shape differs from the command line's.
fn check_snapshot_shape(
    config: &VmConfig,
    dir: &Path,
    s: &MicrovmState,
) -> Result<(), RestoreError> {
    let mismatch = |reason: String| RestoreError::Mismatch {
        dir: dir.display().to_string(),
        reason,
    };
    if s.shape.mem_mib != config.mem_mib {
        return Err(mismatch(format!(
            "it was taken with --mem_size {} but --mem_size is {}",
            s.shape.mem_mib, config.mem_mib
        )));
    }
    if s.shape.vcpus != config.vcpus {
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
    let ours = devices::device_list(config.net.is_some());
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
    mem_mib: u64,
    r: &RestoreConfig,
    s: &MicrovmState,
    top_checksum: String,
) -> Result<Vec<MemoryLayer>, RestoreError> {
    let (given, top) = (&r.layers, r.top());
    let fail = |reason: String| RestoreError::Mismatch {
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
    let ram = mem_mib << 20;
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
fn open_memory_file(mem_mib: u64, dir: &Path) -> Result<File, RestoreError> {
    let path = dir.join(format::MEMORY_FILE);
    let fail = |reason: String| RestoreError::MemoryFile {
        dir: dir.display().to_string(),
        path: path.display().to_string(),
        reason,
    };
    let file = File::open(&path).map_err(|e| fail(e.to_string()))?;
    let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let want = mem_mib << 20;
    if len != want {
        return Err(fail(format!(
            "it is {len} bytes, guest RAM is {want} (truncated, or another --mem_size)"
        )));
    }
    Ok(file)
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
