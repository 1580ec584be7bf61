//! Guest RAM: one mapping per region of the layout, each with a dirty
//! bitmap that records the VMM's own writes into guest memory.
//!
//! Booted VMs get anonymous memory. A restored VM maps each region of the
//! snapshot's `memory` file `MAP_PRIVATE` (lazy: pages come in on first
//! touch, guest writes stay private to the process) or, with
//! `--copy_base`, copies the file's data ranges into anonymous memory
//! up front. The memory file is the RAM regions concatenated in
//! guest-address order: region i sits at the sum of the sizes before it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use super::layout;

pub mod fault_handler;
pub(crate) mod restore;
pub(crate) mod uffd;
pub mod ws_loader;
pub use restore::WsRuntime;

/// Guest memory as every part of the VMM sees it. The bitmap tracks pages
/// written by the VMM (device DMA); KVM's dirty log tracks the guest's.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Page granularity of dirty tracking and of snapshot memory files.
pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be at least 2 MiB and a multiple of 1 MiB, got {0} MiB")]
    BadSize(u64),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot map guest memory from the snapshot memory file: {0}")]
    Map(String),
    #[error("cannot read the snapshot memory file: {0}")]
    Read(std::io::Error),
    #[error("cannot write the snapshot memory file: {0}")]
    Write(std::io::Error),
    #[error("cannot query which guest pages are resident: {0}")]
    Mincore(std::io::Error),
    #[error("the snapshot's page range {start:#x}+{len:#x} lies outside guest RAM")]
    RangeOutside { start: u64, len: u64 },
    #[error("cannot keep guest memory in small pages (madvise MADV_NOHUGEPAGE): {0}")]
    NoHugePages(std::io::Error),
}

/// The RAM regions for `mem_mib` MiB as (guest address, size, file offset).
pub fn regions(mem_mib: u64) -> Result<Vec<(u64, u64, u64)>, MemoryError> {
    // Below 2 MiB there is no room for the boot structures and a kernel.
    if !(2..=(1 << 20)).contains(&mem_mib) {
        return Err(MemoryError::BadSize(mem_mib));
    }
    let mut offset = 0;
    Ok(layout::ram_regions(mem_mib << 20)
        .into_iter()
        .map(|(start, size)| {
            let r = (start, size, offset);
            offset += size;
            r
        })
        .collect())
}

fn bitmap(size: usize) -> AtomicBitmap {
    AtomicBitmap::new(
        size,
        std::num::NonZeroUsize::new(PAGE_SIZE).expect("nonzero"),
    )
}

/// Allocates `mem_mib` MiB of anonymous guest RAM split around the MMIO hole.
pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions: Vec<(GuestAddress, usize)> = regions(mem_mib)?
        .into_iter()
        .map(|(start, size, _)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Allocate {
        mib: mem_mib,
        source,
    })
}

/// Anonymous guest RAM that a userfaultfd handler fills, in small pages
/// only. With transparent huge pages on ("always", as in Debian's kernel),
/// the first write to any page of a 2 MiB extent (a copied layer) would
/// make all 512 present, zero-filled, and the others would never reach the
/// handler that must fill them from the snapshot: the guest would read
/// zeros where its memory was.
pub fn create_for_fault_handler(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = create(mem_mib)?;
    no_huge_pages(&mem)?;
    Ok(mem)
}

/// Makes anonymous guest memory that no one has touched yet fit for a
/// userfaultfd handler (see [`create_for_fault_handler`]).
pub fn no_huge_pages(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for region in mem.iter() {
        // SAFETY: the range is exactly one anonymous mapping that `mem`
        // owns; MADV_NOHUGEPAGE only changes how later faults are backed,
        // never the contents or the mapping itself.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        if rc != 0 {
            return Err(MemoryError::NoHugePages(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Lazy restore: each region maps its part of `file` copy-on-write
/// (`MAP_PRIVATE`); the file is never written. `file` must be at least as
/// long as guest RAM (checked by the caller), or touching the tail faults.
pub fn map_snapshot(file: &File, mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let shared = std::sync::Arc::new(file.try_clone().map_err(MemoryError::Read)?);
    let mut out = Vec::new();
    for (start, size, offset) in regions(mem_mib)? {
        let size = size as usize;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, bitmap(size))
            .with_file_offset(FileOffset::from_arc(shared.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Map("region overflows the address space".into()))?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Eager restore (`--copy_base`): anonymous RAM with the file's data
/// ranges read into it (see [`copy_ranges`]). Holes stay untouched (zero).
pub fn copy_snapshot(
    file: &File,
    mem_mib: u64,
    ranges: &[(u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = create(mem_mib)?;
    copy_ranges(&mem, file, ranges)?;
    Ok(mem)
}

/// Calls `f(region, offset in region, file offset, length)` for the part
/// of each of `ranges` (`(RAM offset, length)`) inside each region; fails
/// if a range reaches outside RAM.
fn for_each_part(
    mem: &GuestMemoryMmap,
    ranges: &[(u64, u64)],
    mut f: impl FnMut(&GuestRegionMmap, u64, u64, u64) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    for &(offset, len) in ranges {
        let outside = || MemoryError::RangeOutside { start: offset, len };
        let end = offset.checked_add(len).ok_or_else(outside)?;
        // A range may span regions; handle the part inside each.
        let mut covered = 0;
        let mut roff = 0;
        for region in mem.iter() {
            let size = region.len();
            let (lo, hi) = (offset.max(roff), end.min(roff + size));
            if lo < hi {
                covered += hi - lo;
                f(region, lo - roff, lo, hi - lo)?;
            }
            roff += size;
        }
        if covered != len {
            return Err(outside());
        }
    }
    Ok(())
}

/// Reads `ranges` (`(RAM offset, length)`, page aligned) of `file` — a
/// snapshot memory file, whose offsets are RAM offsets — into guest
/// memory with `pread`, straight into place. Used before the VM runs.
pub fn copy_ranges(
    mem: &GuestMemoryMmap,
    file: &File,
    ranges: &[(u64, u64)],
) -> Result<(), MemoryError> {
    for_each_part(mem, ranges, |region, at, file_offset, len| {
        let host = region
            .get_host_address(MemoryRegionAddress(at))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        // SAFETY: `host..host + len` lies inside this region's live
        // mapping (for_each_part clips to the region), which nothing else
        // references yet: the VM has not been given the memory and no
        // vCPU or device exists.
        let dst = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
        file.read_exact_at(dst, file_offset)
            .map_err(MemoryError::Read)
    })
}

/// Maps `ranges` (`(RAM offset, length)`, page aligned) of a diff layer's
/// memory `file` over guest memory, copy-on-write (`MAP_FIXED |
/// MAP_PRIVATE`): lazy like the base mapping, each page read on first
/// touch. Each range costs a mapping (a VMA), so beyond the first
/// `max_mappings` parts the rest are copied instead ([`copy_ranges`]).
/// Used before the memory is registered with KVM.
pub fn overlay_ranges(
    mem: &GuestMemoryMmap,
    file: &File,
    ranges: &[(u64, u64)],
    max_mappings: usize,
) -> Result<OverlayStats, MemoryError> {
    let mut stats = OverlayStats::default();
    for_each_part(mem, ranges, |region, at, file_offset, len| {
        if stats.mapped >= max_mappings {
            stats.copied += 1;
            stats.copied_bytes += len;
            return copy_ranges(mem, file, &[(file_offset, len)]);
        }
        let host = region
            .get_host_address(MemoryRegionAddress(at))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        // SAFETY: MAP_FIXED replaces pages `host..host + len`, which lie
        // inside this region's own mapping (for_each_part clips to the
        // region) and which nothing references yet: the memory is not
        // registered with KVM and no vCPU or device exists. The new
        // mapping is private, so the file is never written; it is
        // unmapped with the region's mapping when `mem` is dropped.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Map(format!(
                "cannot map the layer range {file_offset:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        stats.mapped += 1;
        stats.mapped_bytes += len;
        Ok(())
    })?;
    Ok(stats)
}

/// What [`overlay_ranges`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct OverlayStats {
    pub mapped: usize,
    pub mapped_bytes: u64,
    pub copied: usize,
    pub copied_bytes: u64,
}

/// The data ranges of a sparse file, `(offset, length)` rounded out to
/// whole pages (`SEEK_DATA`/`SEEK_HOLE`; a file system without holes
/// reports the whole file).
pub fn data_ranges(file: &File) -> Result<Vec<(u64, u64)>, MemoryError> {
    use nix::unistd::{lseek, Whence};
    let len = file.metadata().map_err(MemoryError::Read)?.len() as i64;
    let page = PAGE_SIZE as i64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0i64;
    while pos < len {
        let start = match lseek(file, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(MemoryError::Read(e.into())),
        };
        let end = lseek(file, start, Whence::SeekHole)
            .map_err(|e| MemoryError::Read(e.into()))?
            .min(len);
        let (lo, hi) = (start / page * page, (end + page - 1) / page * page);
        match out.last_mut() {
            Some((o, l)) if *o + *l >= lo as u64 => *l = hi as u64 - *o,
            _ => out.push((lo as u64, (hi - lo) as u64)),
        }
        pos = end;
    }
    Ok(out)
}

/// Total bytes of guest RAM.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// What [`dump`] wrote.
#[derive(Debug, Default, Clone)]
pub struct DumpStats {
    /// Pages looked at (the selected ones).
    pub pages_scanned: u64,
    /// Pages written (non-zero).
    pub pages_written: u64,
    /// The ranges the layer holds as (RAM offset, length), ascending,
    /// merged: what goes into the memory table.
    pub ranges: Vec<(u64, u64)>,
}

/// Which pages [`dump`] writes.
pub enum Selection {
    /// A full snapshot: every page the kernel reports resident (`mincore`:
    /// a page neither the guest nor the VMM touched is not, and is zero).
    /// The layer holds the non-zero ones; zero pages stay holes.
    Resident,
    /// A diff snapshot: the pages set in one dirty bitmap per region (bit
    /// i of word i / 64 = page i, the KVM dirty-log layout). The layer
    /// holds all of them, zero ones as holes in the file, because a page
    /// zeroed since the parent must hide the parent's content.
    Dirty(Vec<Vec<u64>>),
}

/// Which pages of a mapping are resident, one bool per page.
fn resident(host: *mut u8, len: usize) -> Result<Vec<bool>, MemoryError> {
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE)];
    // SAFETY: `host..host+len` is one live page-aligned mapping (a guest
    // region); mincore only writes `vec`, which has one byte per page.
    let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(MemoryError::Mincore(std::io::Error::last_os_error()));
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

/// Appends `(at, len)` to ascending `ranges`, merging with the last one
/// when adjacent.
fn push_range(ranges: &mut Vec<(u64, u64)>, at: u64, len: u64) {
    match ranges.last_mut() {
        Some((o, l)) if *o + *l == at => *l += len,
        _ => ranges.push((at, len)),
    }
}

/// Writes the selected guest pages into `file` (already sized to guest
/// RAM, so everything not written stays a hole) at their RAM offsets,
/// non-zero pages only; runs of adjacent pages go out in one `pwrite`.
///
/// The caller must have paused everything that writes guest memory (vCPUs
/// and the device event loop).
pub fn dump(
    mem: &GuestMemoryMmap,
    file: &File,
    select: &Selection,
) -> Result<DumpStats, MemoryError> {
    let mut stats = DumpStats::default();
    let mut file_offset = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let pages = len / PAGE_SIZE;
        let selected: Vec<bool> = match select {
            Selection::Resident => resident(host, len)?,
            Selection::Dirty(maps) => {
                let words = maps.get(index).map_or(&[][..], Vec::as_slice);
                (0..pages)
                    .map(|p| words.get(p / 64).is_some_and(|w| w >> (p % 64) & 1 != 0))
                    .collect()
            }
        };
        let keep_zero = matches!(select, Selection::Dirty(_));
        // SAFETY: the region's mapping is live for as long as `mem`, and
        // the caller guarantees nothing writes guest memory while we read
        // it (vCPUs and devices are paused), so a shared slice is sound.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut run: Option<(usize, usize)> = None; // (first page, pages)
        let flush = |run: &mut Option<(usize, usize)>, stats: &mut DumpStats| {
            if let Some((first, n)) = run.take() {
                let data = &bytes[first * PAGE_SIZE..(first + n) * PAGE_SIZE];
                let at = file_offset + (first * PAGE_SIZE) as u64;
                file.write_all_at(data, at).map_err(MemoryError::Write)?;
                stats.pages_written += n as u64;
                if !keep_zero {
                    push_range(&mut stats.ranges, at, data.len() as u64);
                }
            }
            Ok::<(), MemoryError>(())
        };
        for (page, &sel) in selected.iter().enumerate() {
            if sel {
                stats.pages_scanned += 1;
                if keep_zero {
                    let at = file_offset + (page * PAGE_SIZE) as u64;
                    push_range(&mut stats.ranges, at, PAGE_SIZE as u64);
                }
            }
            let nonzero = sel && !is_zero(&bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]);
            match (&mut run, nonzero) {
                (Some((first, n)), true) if *first + *n == page => *n += 1,
                (_, true) => {
                    flush(&mut run, &mut stats)?;
                    run = Some((page, 1));
                }
                (_, false) => flush(&mut run, &mut stats)?,
            }
        }
        flush(&mut run, &mut stats)?;
        file_offset += len as u64;
    }
    Ok(stats)
}

/// The VMM's own writes are tracked in each region's mapping's bitmap
/// (vm-memory marks it on every write through the guest memory API).
fn vmm_bitmap(region: &GuestRegionMmap) -> &AtomicBitmap {
    vm_memory::MmapRegion::bitmap(region)
}

/// Clears the record of the VMM's own writes (where a diff's tracking
/// starts).
pub fn reset_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        vmm_bitmap(region).reset();
    }
}

/// Adds the VMM's own writes since [`reset_dirty`] to `maps`, one dirty
/// bitmap per region in the KVM dirty-log layout (which the vm-memory
/// bitmap shares: bit i of word i / 64 is page i).
pub fn add_vmm_dirty(mem: &GuestMemoryMmap, maps: &mut [Vec<u64>]) {
    for (region, words) in mem.iter().zip(maps.iter_mut()) {
        let ours = vmm_bitmap(region).get_and_reset();
        if words.len() < ours.len() {
            words.resize(ours.len(), 0);
        }
        for (w, o) in words.iter_mut().zip(ours) {
            *w |= o;
        }
    }
}

/// Writes all of guest RAM, regions concatenated, to `path` (a test aid:
/// what a diff stack must rebuild byte for byte).
#[cfg(feature = "test-hooks")]
pub fn dump_all(mem: &GuestMemoryMmap, path: &std::path::Path) -> Result<(), MemoryError> {
    let file = File::create(path).map_err(MemoryError::Write)?;
    let mut at = 0u64;
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        // SAFETY: as in `dump`: a live mapping, nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, region.len() as usize) };
        file.write_all_at(bytes, at).map_err(MemoryError::Write)?;
        at += region.len();
    }
    file.sync_all().map_err(MemoryError::Write)
}

/// Whether a page is all zero (word at a time).
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits
        // the slice at alignment boundaries.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_are_concatenated_in_the_file() {
        assert_eq!(regions(128).unwrap(), vec![(0, 128 << 20, 0)]);
        let r = regions(4096).unwrap();
        assert_eq!(r[1], (4 << 30, 1 << 30, 3 << 30));
        assert!(regions(1).is_err());
    }

    #[test]
    fn fault_handler_memory_never_gets_huge_pages() {
        // Whatever the host's THP setting, the kernel must not back this
        // memory with huge pages (see create_for_fault_handler): its
        // mapping carries VM_NOHUGEPAGE, "nh" in smaps' VmFlags.
        let advised = create_for_fault_handler(8).unwrap();
        let flags = smaps_flags(advised.iter().next().unwrap().as_ptr() as usize);
        assert!(flags.split_whitespace().any(|f| f == "nh"), "{flags}");
        let plain = create(8).unwrap();
        let flags = smaps_flags(plain.iter().next().unwrap().as_ptr() as usize);
        assert!(!flags.split_whitespace().any(|f| f == "nh"), "{flags}");
    }

    /// The VmFlags line of the mapping at `start` in /proc/self/smaps.
    fn smaps_flags(start: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{start:x}-");
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&header))
            .find(|l| l.starts_with("VmFlags"))
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn dump_writes_only_nonzero_pages_and_both_restores_read_them_back() {
        let mem = create(4).unwrap();
        mem.write_obj(0xdead_beefu64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x2fff)).unwrap();
        mem.write_obj(7u8, GuestAddress(0x30_0000)).unwrap();
        // Touched but zero: resident, scanned, not written.
        mem.write_obj(0u64, GuestAddress(0x5000)).unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        let stats = dump(&mem, &file, &Selection::Resident).unwrap();
        assert_eq!(stats.pages_written, 3);
        assert_eq!(stats.ranges, vec![(0x1000, 0x2000), (0x30_0000, 0x1000)]);
        drop(file);

        let file = File::open(&path).unwrap();
        for m in [
            map_snapshot(&file, 4).unwrap(),
            copy_snapshot(&file, 4, &stats.ranges).unwrap(),
        ] {
            assert_eq!(
                m.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
                0xdead_beef
            );
            assert_eq!(m.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 1);
            assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 7);
            assert_eq!(m.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0);
            // Writes stay private to the process.
            m.write_obj(9u8, GuestAddress(0x1000)).unwrap();
        }
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(b[0], 0xef);

        // The file system knows where the data is (at most rounded out to
        // its block size).
        let data = data_ranges(&file).unwrap();
        let held: u64 = data.iter().map(|r| r.1).sum();
        assert!((3 * 4096..=64 * 4096).contains(&held), "{data:x?}");
        for (off, len) in &stats.ranges {
            assert!(
                data.iter().any(|(o, l)| o <= off && off + len <= o + l),
                "{data:x?}"
            );
        }
        assert!(copy_snapshot(&file, 4, &[(4 << 20, 4096)]).is_err());
    }

    #[test]
    fn a_diff_layer_holds_the_dirty_pages_and_stacks_on_its_base() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let base_path = dir.as_path().join("base");
        let base = create(4).unwrap();
        for page in 0..6u64 {
            base.write_obj(0x1000 + page, GuestAddress(page * 0x1000))
                .unwrap();
        }
        let f = File::create(&base_path).unwrap();
        f.set_len(4 << 20).unwrap();
        dump(&base, &f, &Selection::Resident).unwrap();
        drop(f);
        let base_file = File::open(&base_path).unwrap();

        // The restored VM rewrites page 1, zeroes page 2 and writes page
        // 0x300 (a hole in the base); the VMM's own write lands on page 4.
        let vm = map_snapshot(&base_file, 4).unwrap();
        reset_dirty(&vm);
        let mut kvm_log = vec![vec![0u64; (4 << 20) / PAGE_SIZE / 64]];
        for (page, value) in [(1u64, 0xaau64), (2, 0), (0x300, 0xbb)] {
            // SAFETY: a test: the page is inside the live 4 MiB mapping
            // and nothing else uses it; a raw write stands for a guest
            // write, which the VMM's bitmap does not see.
            unsafe {
                let host = vm.get_host_address(GuestAddress(page * 0x1000)).unwrap();
                std::ptr::write_volatile(host.cast::<u64>(), value);
            }
            kvm_log[0][page as usize / 64] |= 1 << (page % 64);
        }
        vm.write_obj(0xccu64, GuestAddress(0x4000)).unwrap();
        add_vmm_dirty(&vm, &mut kvm_log);

        let diff_path = dir.as_path().join("diff");
        let f = File::create(&diff_path).unwrap();
        f.set_len(4 << 20).unwrap();
        let stats = dump(&vm, &f, &Selection::Dirty(kvm_log)).unwrap();
        drop(f);
        // The zeroed page is held (a hole in the file), the others written.
        assert_eq!(
            stats.ranges,
            vec![(0x1000, 0x2000), (0x4000, 0x1000), (0x30_0000, 0x1000)]
        );
        assert_eq!(stats.pages_written, 3);

        let diff_file = File::open(&diff_path).unwrap();
        for limit in [usize::MAX, 1] {
            let m = map_snapshot(&base_file, 4).unwrap();
            let o = overlay_ranges(&m, &diff_file, &stats.ranges, limit).unwrap();
            assert_eq!(o.mapped + o.copied, 3);
            assert_eq!(o.mapped, limit.min(3));
            let read = |page: u64| m.read_obj::<u64>(GuestAddress(page * 0x1000)).unwrap();
            assert_eq!(
                [
                    read(0),
                    read(1),
                    read(2),
                    read(3),
                    read(4),
                    read(5),
                    read(0x300)
                ],
                [0x1000, 0xaa, 0, 0x1003, 0xcc, 0x1005, 0xbb]
            );
        }
    }
}
