//! Guest RAM: anonymous mappings, one per region of the layout, each with a
//! dirty bitmap that records the VMM's own writes into guest memory.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryRegion};

use super::layout;

/// Guest memory as every part of the VMM sees it. The bitmap tracks pages
/// written by the VMM (device DMA); KVM's dirty log tracks the guest's.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Page granularity of dirty tracking.
pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be at least 1 MiB and a multiple of 1 MiB, got {0} MiB")]
    BadSize(u64),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Allocates `mem_mib` MiB of anonymous guest RAM split around the MMIO hole.
pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    // Below 2 MiB there is no room for the boot structures and a kernel.
    if !(2..=(1 << 20)).contains(&mem_mib) {
        return Err(MemoryError::BadSize(mem_mib));
    }
    let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_mib << 20)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Allocate {
        mib: mem_mib,
        source,
    })
}

/// Total bytes of guest RAM.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryBackend;
    mem.iter().map(|r| r.len()).sum()
}
