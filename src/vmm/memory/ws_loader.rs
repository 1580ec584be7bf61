//! Loading a working set (`--load_ws`): the set is read from `ws` with
//! large sequential reads and placed into the VM's anonymous memory with
//! UFFDIO_COPY by a prefetch thread that races the VM; a page the VM
//! touches first is served by the fault handler, as is every page outside
//! the set. (Measured against the alternatives in `examples/ws_load.rs`:
//! fastest to the first response in `scripts/bench.sh`'s ladder.)

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::fault_handler::{
    for_each_span, host_regions, ram_offset_of, FaultError, FaultHandler, HostRegion, Shared,
};
use super::GuestMemoryMmap;
use crate::snapshot::layers::PageSource;
use crate::snapshot::ws::WorkingSet;
use crate::vmm::seccomp::{self, ThreadClass};

/// Bytes read from `ws` per `pread`. Large enough that the read calls cost
/// nothing next to the copying, small enough that the staging buffer stays
/// in the CPU cache between the read and the copy into guest memory.
const CHUNK: usize = 512 << 10;

/// Reads the working set's runs from `ws` in file order, `CHUNK` bytes
/// per `pread`, and hands each part that lies in one region to
/// `put(host address, length, data)` (`None` for a zero run). Stops early,
/// without error, once `cancel` is set.
fn walk(
    ws: &WorkingSet,
    regions: &[HostRegion],
    cancel: &AtomicBool,
    mut put: impl FnMut(usize, usize, Option<&[u8]>) -> Result<(), FaultError>,
) -> Result<(), FaultError> {
    let (file, path) = ws.data_file();
    let mut buf = vec![0u8; CHUNK.min(ws.data_bytes() as usize)];
    // `buf` holds `ws[buf_start..buf_end]`; `pos` is the next byte to use.
    let (mut pos, mut buf_start, mut buf_end) = (0u64, 0u64, 0u64);
    for r in ws.ranges() {
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        if r.zero {
            for_each_span(regions, r.ram_offset, r.len, |host, _, len| {
                put(host, len, None)
            })?;
            continue;
        }
        let mut done = 0u64;
        while done < r.len {
            if cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            if pos == buf_end {
                let want = (buf.len() as u64).min(ws.data_bytes() - pos) as usize;
                file.read_exact_at(&mut buf[..want], pos)
                    .map_err(|source| FaultError::Read {
                        path: path.to_owned(),
                        source,
                    })?;
                (buf_start, buf_end) = (pos, pos + want as u64);
            }
            let n = (r.len - done).min(buf_end - pos);
            let data = &buf[(pos - buf_start) as usize..(pos - buf_start + n) as usize];
            for_each_span(regions, r.ram_offset + done, n, |host, at, len| {
                put(host, len, Some(&data[at..at + len]))
            })?;
            done += n;
            pos += n;
        }
    }
    Ok(())
}

/// Places the working set with UFFDIO_COPY, one call per contiguous run
/// (as far as it lies in one chunk of `ws`). Zero runs are copied from
/// zeros too, not mapped to the zero page: the guest touched them while
/// recording, and a write to the zero page would fault again.
fn place_all(shared: &Shared, ws: &WorkingSet, cancel: &AtomicBool) -> Result<(), FaultError> {
    let zeros = vec![0u8; CHUNK];
    let place = |host: usize, src: &[u8]| {
        let pages = shared
            .uffd
            .place(host, src.len(), Some(src))
            .map_err(|source| FaultError::Place {
                ram_offset: ram_offset_of(&shared.regions, host).unwrap_or_default(),
                source,
            })?;
        shared.loaded.fetch_add(pages, Ordering::Relaxed);
        Ok(())
    };
    walk(ws, &shared.regions, cancel, |host, len, data| match data {
        Some(data) => place(host, data),
        None => (0..len)
            .step_by(zeros.len())
            .try_for_each(|at| place(host + at, &zeros[..zeros.len().min(len - at)])),
    })
}

/// `--load_ws` on anonymous memory: starts placing the working set `ws`
/// in `mem` — anonymous guest RAM not given to a VM or device yet — on a
/// prefetch thread, and returns the handler that serves every page the
/// VM touches before it is placed, and every other page, from `source`.
/// Pages already present (layers the caller copied in first) are left as
/// they are.
pub fn load(
    mem: &GuestMemoryMmap,
    ws: WorkingSet,
    source: Arc<dyn PageSource>,
) -> Result<FaultHandler, FaultError> {
    let regions = host_regions(mem)?;
    // Start reading the whole of `ws` now: the disk works on later chunks
    // while earlier ones are placed.
    let (file, path) = ws.data_file();
    if let Err(e) = nix::fcntl::posix_fadvise(
        file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    ) {
        log::debug!("readahead of {} not started: {e}", path.display());
    }
    let mut handler = FaultHandler::start(regions, source, false)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let (shared, stop) = (handler.shared.clone(), cancel.clone());
    let thread = std::thread::Builder::new()
        .name("ws-prefetch".into())
        .spawn(move || {
            // A prefetch that cannot be confined does not run: the fault
            // handler serves every page instead.
            if let Err(e) = seccomp::install(ThreadClass::Prefetch) {
                log::warn!("working-set prefetch not started: {e}");
                return;
            }
            let t = std::time::Instant::now();
            // A failed prefetch costs only speed: the fault handler
            // serves whatever it did not place.
            match place_all(&shared, &ws, &stop) {
                Ok(()) => log::info!(
                    "working set prefetched: {} pages in {} us, {} faults served meanwhile",
                    ws.pages(),
                    t.elapsed().as_micros(),
                    shared.faults.load(Ordering::Relaxed)
                ),
                Err(e) => log::warn!("working-set prefetch stopped: {e}"),
            }
        })
        .map_err(|e| FaultError::Spawn("working-set prefetch", e))?;
    handler.prefetch = Some((cancel, thread));
    Ok(handler)
}
