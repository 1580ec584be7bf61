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
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dir::{DirError, SnapshotDir};
use super::disk::{self, DiskError};
use super::format::{
    self, FormatError, MemoryLayer, MemoryTable, RegionEntry, SnapshotState, VmShape, MEMORY_FILE,
    STATE_FILE,
};
use super::quiesce::QuiesceError;
use crate::vmm::builder::{device_list, Machine};
use crate::vmm::bus::lock;
use crate::vmm::memory::{self, MemoryError};
use crate::vmm::vcpu::VcpuError;
use crate::vmm::vm::VmError;

/// How long a vCPU or the event loop may take to pause or answer.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Test hook: when set to a path, all of guest RAM is also written there
/// (regions concatenated) at the snapshot point, so a test can check that
/// the layers rebuild it byte for byte.
pub const DUMP_RAM_ENV: &str = "SNAPVM_TEST_DUMP_RAM";

/// Test hook: when set, the writer stops forever after the memory file is
/// written and synced, before the state file — so a test can kill it there.
pub const STALL_ENV: &str = "SNAPVM_TEST_STALL_SNAPSHOT";

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error(transparent)]
    Vm(#[from] VmError),
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
}

/// Pauses `m` and writes its snapshot to `target` (full, or a diff layer
/// when `m` was restored). The VM stays paused (the caller exits).
pub fn create(m: &Machine, target: &Path) -> Result<Written, CreateError> {
    let t0 = Instant::now();
    m.vcpus.pause(PAUSE_TIMEOUT)?;
    m.event_loop.pause(PAUSE_TIMEOUT)?;
    let paused = t0.elapsed();

    let msrs = Arc::new(m.vm.msr_index_list()?);
    let vcpus = m.vcpus.save(&msrs, PAUSE_TIMEOUT)?;
    let vm = m.vm.save_state()?;
    let devices = m
        .devices
        .iter()
        .map(|d| lock(d.transport()).save_state())
        .collect();
    let serial = lock(&m.serial).save_state();
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
    if let Some(path) = std::env::var_os(DUMP_RAM_ENV) {
        log::warn!("{DUMP_RAM_ENV} is set: writing all of guest RAM to {path:?}");
        memory::dump_all(&m.mem, std::path::Path::new(&path))?;
    }
    let stats = memory::dump(&m.mem, &mem_file, &select)?;
    mem_file.sync_all().map_err(CreateError::Sync)?;
    drop(mem_file);
    let dumped = t0.elapsed();
    if std::env::var_os(STALL_ENV).is_some() {
        log::warn!("{STALL_ENV} is set: stalling before the state file is written");
        loop {
            std::thread::sleep(Duration::from_secs(1));
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
    let state = SnapshotState {
        created_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        snapvm: env!("CARGO_PKG_VERSION").to_string(),
        shape: VmShape {
            mem_mib: m.mem_mib,
            vcpus: vcpus.len() as u8,
            devices: device_list(),
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
    Ok(Written {
        dir: path,
        memory_bytes,
        elapsed,
    })
}
