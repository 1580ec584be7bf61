//! Filling a restored VM's guest memory from its snapshot layers, as
//! `RestoreMemory` asks: the base mapped `MAP_PRIVATE` (or copied), then
//! the diff layers over it; or, for the working-set modes, anonymous
//! memory behind the userfaultfd fault handler ([`WsRuntime`]).

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::fault_handler::{FaultError, FaultHandler};
use super::{ws_loader, GuestMemoryMmap, MemoryError};
use crate::snapshot::layers::LayerStack;
use crate::snapshot::ws::{self, WorkingSet, WsError};
use crate::vmm::config::{RestoreConfig, RestoreMemory};

/// Most mappings one diff layer may add to guest memory: each merged range
/// of its pages is one mapping (a VMA, and a `mmap` call at restore), so a
/// badly fragmented layer has its remaining ranges copied instead.
const MAX_LAYER_MAPPINGS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Ws(#[from] WsError),
    #[error(transparent)]
    Fault(#[from] FaultError),
    #[error("the restore was abandoned")]
    Abandoned,
}

/// What the memory filler needs from the checked state file.
pub struct RestorePlan {
    /// The base layer's ranges (its memory table entry).
    pub base_ranges: Vec<(u64, u64)>,
    /// Each diff layer's memory file and the ranges it holds.
    pub diffs: Vec<(File, Vec<(u64, u64)>)>,
    /// The top layer's state checksum: what a working set belongs to.
    pub identity: String,
}

/// A restored VM's working-set machinery (`--dump_ws`, `--load_ws`): its
/// memory is anonymous and every page not yet placed is served on first
/// touch from the layers by the fault handler, which must outlive the
/// vCPUs and devices.
pub struct WsRuntime {
    handler: FaultHandler,
    stack: Arc<LayerStack>,
    identity: String,
    /// Where `--dump_ws` writes the recording; `None` once written, and
    /// when loading.
    record_into: Option<PathBuf>,
}

impl WsRuntime {
    /// Stops recording and writes the working set; returns where, the set
    /// and the faults served, or why nothing was written.
    pub fn write_recording(&mut self, ram: u64) -> Result<(PathBuf, WorkingSet, u64), String> {
        let Some(dir) = self.record_into.take() else {
            return Err("no working set is being recorded (already written, or --load_ws)".into());
        };
        let pages = self.handler.stop_recording();
        let faults = self.handler.stats().faults;
        ws::write(&dir, &pages, self.stack.as_ref(), ram, &self.identity)
            .map(|set| (dir, set, faults))
            .map_err(|e| e.to_string())
    }

    /// Readable once the fault handler has failed: the VM must end then,
    /// as a guest page it does not serve would block its vCPU forever.
    pub fn failure(&self) -> std::os::fd::BorrowedFd<'_> {
        self.handler.failure()
    }
}

/// The filled memory, its working-set machinery and the phase timings
/// (map, wait for the plan, layers, memslots are the caller's).
pub struct Filled {
    pub mem: GuestMemoryMmap,
    pub ws: Option<WsRuntime>,
    pub timings: [Duration; 3],
}

/// Builds a restored VM's guest memory: the base mapped (or copied) at
/// once, then — once the state file is checked and `plan` arrives — the
/// diff layers over it; or, for the working-set modes, anonymous memory
/// behind the fault handler.
///
/// `shell`: a shell's memory (anonymous, never touched, already registered
/// with KVM) to fill in place instead, at the same host addresses; it is
/// left untouched until the plan arrives, so that a refused restore
/// leaves it as it was. A file mapped over part of a registered slot
/// (`MAP_FIXED`) is what the guest sees from then on (KVM follows the
/// host's page tables through its MMU notifier).
pub fn fill(
    r: &RestoreConfig,
    mem_mib: u64,
    base_file: File,
    plan: Receiver<RestorePlan>,
    shell: Option<GuestMemoryMmap>,
) -> Result<Filled, FillError> {
    let t = Instant::now();
    let copies = r.memory.copies();
    // Nothing to wait for if the main thread gave up (a refusal).
    let recv_plan = || plan.recv().map_err(|_| FillError::Abandoned);
    // (memory, plan, time mapping the base, time waiting for the plan)
    let (mem, plan, t_map, t_wait) = match shell {
        None => {
            let mem = if r.memory.uses_fault_handler() {
                super::create_for_fault_handler(mem_mib)?
            } else if copies.base {
                let ranges = super::data_ranges(&base_file)?;
                super::copy_snapshot(&base_file, mem_mib, &ranges)?
            } else {
                super::map_snapshot(&base_file, mem_mib)?
            };
            let t_map = t.elapsed();
            let plan = recv_plan()?;
            (mem, plan, t_map, t.elapsed() - t_map)
        }
        Some(mem) => {
            let plan = recv_plan()?;
            let t_wait = t.elapsed();
            if r.memory.uses_fault_handler() {
                super::no_huge_pages(&mem)?;
            } else if copies.base {
                super::copy_ranges(&mem, &base_file, &super::data_ranges(&base_file)?)?;
            } else {
                let all = [(0, mem_mib << 20)];
                super::overlay_ranges(&mem, &base_file, &all, usize::MAX)?;
            }
            (mem, plan, t.elapsed() - t_wait, t_wait)
        }
    };
    let t_plan = t.elapsed();
    let ws = if r.memory.uses_fault_handler() {
        // --load_ws with copies: those layers go in first, bottom up, so a
        // diff page lands over its base page; the fault handler only ever
        // sees pages that are still missing.
        if copies.base {
            super::copy_ranges(&mem, &base_file, &plan.base_ranges)?;
        }
        if copies.diffs {
            for (file, ranges) in &plan.diffs {
                super::copy_ranges(&mem, file, ranges)?;
            }
        }
        let mut layers = vec![(base_file, plan.base_ranges)];
        layers.extend(plan.diffs);
        let stack = Arc::new(LayerStack::new(layers));
        let (handler, record_into) = match &r.memory {
            RestoreMemory::RecordWorkingSet { into } => (
                FaultHandler::record(&mem, stack.clone())?,
                Some(into.clone()),
            ),
            _ => {
                let top = r.top();
                let set = ws::read(top, mem_mib << 20, &plan.identity)?;
                log::info!(
                    "working set: {} pages ({} KiB of data) loaded from {}",
                    set.pages(),
                    set.data_bytes() >> 10,
                    top.display()
                );
                let h = ws_loader::load(&mem, set, stack.clone())?;
                (h, None)
            }
        };
        Some(WsRuntime {
            handler,
            stack,
            identity: plan.identity,
            record_into,
        })
    } else {
        for (i, (file, ranges)) in plan.diffs.iter().enumerate() {
            if copies.diffs {
                super::copy_ranges(&mem, file, ranges)?;
                log::info!("diff layer {}: {} ranges copied", i + 1, ranges.len());
            } else {
                let o = super::overlay_ranges(&mem, file, ranges, MAX_LAYER_MAPPINGS)?;
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
    super::reset_dirty(&mem);
    Ok(Filled {
        mem,
        ws,
        timings: [t_map, t_wait, t_layers - t_plan],
    })
}
