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
/// ranges (`(file offset, length)`, page aligned) read into it with
/// `pread`, straight into guest memory. Holes stay untouched (zero).
pub fn copy_snapshot(
    file: &File,
    mem_mib: u64,
    ranges: &[(u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = create(mem_mib)?;
    let layout = regions(mem_mib)?;
    for &(offset, len) in ranges {
        let outside = || MemoryError::RangeOutside { start: offset, len };
        let end = offset.checked_add(len).ok_or_else(outside)?;
        // A range may span regions; copy the part inside each.
        let mut covered = 0;
        for ((_, size, roff), region) in layout.iter().zip(mem.iter()) {
            let (lo, hi) = (offset.max(*roff), end.min(roff + size));
            if lo >= hi {
                continue;
            }
            covered += hi - lo;
            let host = region
                .get_host_address(MemoryRegionAddress(lo - roff))
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            // SAFETY: `host..host + (hi - lo)` lies inside this region's
            // live anonymous mapping (checked against the region bounds
            // above), which nothing else references yet: the VM has not
            // been given the memory and no vCPU or device exists.
            let dst = unsafe { std::slice::from_raw_parts_mut(host, (hi - lo) as usize) };
            file.read_exact_at(dst, lo).map_err(MemoryError::Read)?;
        }
        if covered != len {
            return Err(outside());
        }
    }
    Ok(mem)
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
    /// Pages looked at (resident or known to hold data).
    pub pages_scanned: u64,
    /// Pages written (non-zero).
    pub pages_written: u64,
    /// Written ranges as (file offset, length), ascending, merged.
    pub ranges: Vec<(u64, u64)>,
}

/// Which pages of a mapping are resident, one bool per page.
fn resident(host: *mut u8, len: usize) -> Result<Vec<u8>, MemoryError> {
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE)];
    // SAFETY: `host..host+len` is one live page-aligned mapping (a guest
    // region); mincore only writes `vec`, which has one byte per page.
    let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(MemoryError::Mincore(std::io::Error::last_os_error()));
    }
    Ok(vec)
}

/// Writes every non-zero guest page into `file` (already sized to guest
/// RAM, so everything not written stays a hole) at its offset in the
/// concatenation of the regions.
///
/// Candidates are the pages the kernel reports resident (`mincore`: a page
/// the guest or the VMM never touched is not) plus `known` — file-offset
/// ranges that may hold data without being resident, such as the pages of
/// a lazily mapped snapshot this VM was restored from. Each candidate is
/// checked for all-zero and skipped if it is. Runs of adjacent pages go out
/// in one `pwrite`.
///
/// The caller must have paused everything that writes guest memory (vCPUs
/// and the device event loop).
pub fn dump(
    mem: &GuestMemoryMmap,
    file: &File,
    known: &[(u64, u64)],
) -> Result<DumpStats, MemoryError> {
    let mut stats = DumpStats::default();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let mut candidate = resident(host, len)?;
        let pages = candidate.len() as u64;
        for &(off, l) in known {
            let lo = off.max(file_offset);
            let hi = (off + l).min(file_offset + len as u64);
            if lo < hi {
                let first = (lo - file_offset) / PAGE_SIZE as u64;
                let last = (hi - file_offset).div_ceil(PAGE_SIZE as u64);
                for c in &mut candidate[first as usize..last.min(pages) as usize] {
                    *c |= 1;
                }
            }
        }
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
                match stats.ranges.last_mut() {
                    Some((o, l)) if *o + *l == at => *l += data.len() as u64,
                    _ => stats.ranges.push((at, data.len() as u64)),
                }
            }
            Ok::<(), MemoryError>(())
        };
        for (page, &c) in candidate.iter().enumerate() {
            let nonzero = c & 1 != 0 && {
                stats.pages_scanned += 1;
                !is_zero(&bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE])
            };
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
        let stats = dump(&mem, &file, &[]).unwrap();
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

        // A lazily mapped VM dumps the pages of its base it never touched.
        let lazy = map_snapshot(&file, 4).unwrap();
        let out = File::create(dir.as_path().join("again")).unwrap();
        out.set_len(4 << 20).unwrap();
        let again = dump(&lazy, &out, &stats.ranges).unwrap();
        assert_eq!(again.ranges, stats.ranges);
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
}
