//! Taking a snapshot of a running VM: a full one of a booted VM, a diff
//! layer of a restored one.
//!
//! Pause every vCPU (each completes its pending exit, so the vCPU that
//! wrote 124 is saved past its `outb`), pause the device event loop, save
//! the vCPUs, the VM-wide KVM state and every device, then write the
//! snapshot directory crash-safely: memory first, fsynced; the state file
//! last; then the rename.
//!
//! A full snapshot's memory holds every non-zero page. A diff layer's
//! holds exactly the pages written since the restore — the guest's writes
//! from KVM's dirty log, the VMM's own (device DMA) from the guest memory
//! bitmaps — and its memory table lists the stack below it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::bus::lock;
use super::devices::{self, DeviceError};
use super::memory::{self, MemoryError};
use super::persist::{MicrovmState, Persist};
use super::runner::Machine;
use super::vcpu::VcpuError;
use super::vm::KvmVmError;
use crate::snapshot::dir::{DirError, SnapshotDir};
use crate::snapshot::disk::{self, DiskError};
use crate::snapshot::format::{
    self, FormatError, MemoryLayer, MemoryTable, RegionEntry, VmShape, MEMORY_FILE, STATE_FILE,
};

/// How long a vCPU or the event loop may take to pause or answer.
pub(super) const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Test hooks, compiled in only with the `test-hooks` feature (the
/// integration tests enable it; release binaries never carry them).
#[cfg(feature = "test-hooks")]
pub mod hooks {
    /// When set to a path, all of guest RAM is also written there (regions
    /// concatenated) at the snapshot point, so a test can check that the
    /// layers rebuild it byte for byte.
    pub const DUMP_RAM_ENV: &str = "SNAPVM_TEST_DUMP_RAM";

    /// When set, the writer stops forever after the memory file is written
    /// and synced, before the state file — so a test can kill it there.
    pub const STALL_ENV: &str = "SNAPVM_TEST_STALL_SNAPSHOT";
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vm(#[from] KvmVmError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Serial(#[from] devices::serial::SerialError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Rootfs(#[from] DiskError),
    #[error("cannot sync the memory file: {0}")]
    Sync(std::io::Error),
}

/// A snapshot that was written.
#[derive(Debug)]
pub struct Written {
    pub dir: PathBuf,
    /// Bytes of guest memory in the memory file (its non-hole part).
    pub memory_bytes: u64,
    /// From the snapshot request to the directory in place.
    pub elapsed: Duration,
    /// The new layer as a layer above it names it: a VM that runs on
    /// after a diff snapshot stacks it, so the next diff is over it.
    pub layer: MemoryLayer,
}

/// Pauses `m` and writes its snapshot to `target` (full, or a diff layer
/// when `m` was restored). The VM stays paused: the caller exits or
/// resumes it.
pub(super) fn create(m: &Machine, target: &Path) -> Result<Written, CreateError> {
    let t0 = Instant::now();
    // This runs on the event-loop thread, between two events: with the
    // vCPUs paused, nothing touches a device or guest memory.
    m.vcpus.pause(PAUSE_TIMEOUT)?;
    let paused = t0.elapsed();

    let vcpus = m.vcpus.save(PAUSE_TIMEOUT)?;
    let vm = m.vm.save()?;
    let devices = m.devices.save()?;
    let serial = lock(&m.serial).save()?;
    let saved = t0.elapsed();

    let rootfs = match &m.rootfs_identity {
        Some(job) => job.finish()?,
        None => disk::identify(&m.rootfs)?,
    };
    let hashed = t0.elapsed();

    let dir = SnapshotDir::create(target)?;
    let total = memory::total_size(&m.mem);
    let mem_file = dir.create_sparse(MEMORY_FILE, total)?;
    let select = if m.layers.is_empty() {
        memory::Selection::Resident
    } else {
        let mut dirty = m.vm.take_dirty_log(&m.mem)?;
        let count =
            |maps: &[Vec<u64>]| -> u32 { maps.iter().flatten().map(|w| w.count_ones()).sum() };
        let by_guest = count(&dirty);
        memory::add_vmm_dirty(&m.mem, &mut dirty);
        log::info!(
            "diff: {by_guest} pages written by the guest, {} more by the VMM only",
            count(&dirty) - by_guest
        );
        memory::Selection::Dirty(dirty)
    };
    #[cfg(feature = "test-hooks")]
    if let Some(path) = std::env::var_os(hooks::DUMP_RAM_ENV) {
        log::warn!(
            "{} is set: writing all of guest RAM to {path:?}",
            hooks::DUMP_RAM_ENV
        );
        memory::dump_all(&m.mem, std::path::Path::new(&path))?;
    }
    let stats = memory::dump(&m.mem, &mem_file, &select)?;
    mem_file.sync_all().map_err(CreateError::Sync)?;
    drop(mem_file);
    let dumped = t0.elapsed();
    #[cfg(feature = "test-hooks")]
    if std::env::var_os(hooks::STALL_ENV).is_some() {
        log::warn!(
            "{} is set: stalling before the state file is written",
            hooks::STALL_ENV
        );
        loop {
            std::thread::park();
        }
    }

    let regions = memory::regions(m.mem_mib)?
        .into_iter()
        .map(|(guest_addr, size, file_offset)| RegionEntry {
            guest_addr,
            size,
            file_offset,
        })
        .collect();
    let state = MicrovmState {
        created_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        snapvm: env!("CARGO_PKG_VERSION").to_string(),
        shape: VmShape {
            mem_mib: m.mem_mib,
            vcpus: vcpus.len() as u8,
            devices: m.devices.device_list(),
        },
        rootfs,
        memory: MemoryTable {
            regions,
            layers: m
                .layers
                .iter()
                .cloned()
                .chain([MemoryLayer {
                    dir: PathBuf::from("."),
                    state_checksum: None,
                    ranges: stats.ranges.clone(),
                }])
                .collect(),
        },
        vcpus,
        vm,
        devices,
        serial,
    };
    dir.write_file(STATE_FILE, &format::encode(&state)?)?;
    let path = dir.commit()?;
    let elapsed = t0.elapsed();
    let memory_bytes = stats.pages_written * memory::PAGE_SIZE as u64;
    log::info!(
        "{} snapshot written to {} in {} us (pause {}, save state {}, rootfs identity {}, memory {} \
         [{} pages selected, {} written, {} ranges], state file + commit {})",
        if m.layers.is_empty() { "full" } else { "diff" },
        path.display(),
        elapsed.as_micros(),
        paused.as_micros(),
        (saved - paused).as_micros(),
        (hashed - saved).as_micros(),
        (dumped - hashed).as_micros(),
        stats.pages_scanned,
        stats.pages_written,
        stats.ranges.len(),
        (elapsed - dumped).as_micros(),
    );
    let layer = MemoryLayer {
        state_checksum: Some(format::checksum(&path)?),
        dir: path.clone(),
        ranges: stats.ranges,
    };
    Ok(Written {
        dir: path,
        memory_bytes,
        elapsed,
        layer,
    })
}
