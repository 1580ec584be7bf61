//! The working-set fault handler: resolves the missing-page faults of a
//! restored VM's anonymous guest memory (registered with userfaultfd, see
//! [`super::uffd`]) from the snapshot layers, on its own thread; while
//! recording (`--dump_ws`) it notes each page it placed, in first-touch
//! order. The first touch of a page — by a vCPU through KVM or by a VMM
//! thread, in user or kernel mode — waits in the kernel until the handler
//! has placed the page's content.
//!
//! A `MAP_PRIVATE` file mapping cannot be registered (EINVAL, DESIGN.md),
//! hence anonymous memory.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::uffd::{sys, Uffd, UffdError};
use super::{GuestMemoryMmap, PAGE_SIZE};
use crate::snapshot::layers::PageSource;
use crate::vmm::seccomp::{self, SeccompError, ThreadClass};

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("userfaultfd {op} failed: {source}")]
    Op { op: &'static str, source: io::Error },
    #[error("guest page fault at host address {0:#x}, which is not guest RAM")]
    FaultOutsideRam(u64),
    #[error("cannot read the guest page at RAM offset {ram_offset:#x} from the snapshot layers: {source}")]
    Source { ram_offset: u64, source: io::Error },
    #[error("cannot place guest memory at RAM offset {ram_offset:#x}: {source}")]
    Place { ram_offset: u64, source: io::Error },
    #[error("the working-set range {ram_offset:#x}+{len:#x} lies outside guest RAM")]
    OutsideRam { ram_offset: u64, len: u64 },
    #[error("cannot read the working set {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("cannot start the {0} thread: {1}")]
    Spawn(&'static str, io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
    #[error("the userfaultfd handler thread panicked")]
    HandlerPanicked,
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// What a zero page is copied from when it must be a private page.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// One region of guest RAM: where it is mapped and where it starts in the
/// RAM offset space (the regions concatenated in guest-address order).
#[derive(Debug, Clone, Copy)]
pub(super) struct HostRegion {
    host: usize,
    len: usize,
    ram_offset: u64,
}

pub(super) fn host_regions(mem: &GuestMemoryMmap) -> Result<Vec<HostRegion>, FaultError> {
    let mut ram_offset = 0;
    let mut out = Vec::new();
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| FaultError::Place {
                ram_offset,
                source: io::Error::other(e.to_string()),
            })?;
        let len = region.len() as usize;
        out.push(HostRegion {
            host: host as usize,
            len,
            ram_offset,
        });
        ram_offset += len as u64;
    }
    Ok(out)
}

fn ram_size(regions: &[HostRegion]) -> u64 {
    regions.iter().map(|r| r.len as u64).sum()
}

/// The RAM offset of the host address `host`, if it is guest RAM.
pub(super) fn ram_offset_of(regions: &[HostRegion], host: usize) -> Option<u64> {
    regions
        .iter()
        .find(|r| (r.host..r.host + r.len).contains(&host))
        .map(|r| r.ram_offset + (host - r.host) as u64)
}

/// Calls `f(host address, offset into the run, length)` for each part of
/// the RAM run `ram_offset..ram_offset + len` that lies in one region: a
/// run may cross from one region into the next, whose host addresses are
/// not adjacent. Fails, before calling `f`, if the run leaves guest RAM.
pub(super) fn for_each_span(
    regions: &[HostRegion],
    ram_offset: u64,
    len: u64,
    mut f: impl FnMut(usize, usize, usize) -> Result<(), FaultError>,
) -> Result<(), FaultError> {
    let end = ram_offset
        .checked_add(len)
        .filter(|&end| end <= ram_size(regions))
        .ok_or(FaultError::OutsideRam { ram_offset, len })?;
    for r in regions {
        let (lo, hi) = (
            ram_offset.max(r.ram_offset),
            end.min(r.ram_offset + r.len as u64),
        );
        if lo < hi {
            f(
                r.host + (lo - r.ram_offset) as usize,
                (lo - ram_offset) as usize,
                (hi - lo) as usize,
            )?;
        }
    }
    Ok(())
}

/// What a [`FaultHandler`] has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HandlerStats {
    /// Page faults the handler resolved (each placed one page).
    pub faults: u64,
    /// Page faults that found their page already placed by a racing
    /// placement (woken, not placed again).
    pub already_present: u64,
    /// Working-set pages placed by the loader or the prefetch thread.
    pub loaded: u64,
}

/// State shared by the handler thread, the prefetch thread and the owner.
pub(super) struct Shared {
    pub(super) uffd: Uffd,
    pub(super) regions: Vec<HostRegion>,
    pub(super) source: Arc<dyn PageSource>,
    /// The pages placed on faults, in order, while recording.
    pub(super) recording: Mutex<Option<Vec<u64>>>,
    pub(super) faults: AtomicU64,
    pub(super) already_present: AtomicU64,
    pub(super) loaded: AtomicU64,
}

impl Shared {
    /// Resolves one page fault at `addr` (`flags` from the fault message).
    fn serve_fault(&self, flags: u64, addr: u64, buf: &mut [u8]) -> Result<(), FaultError> {
        let host = addr as usize & !(PAGE_SIZE - 1);
        let ram_offset =
            ram_offset_of(&self.regions, host).ok_or(FaultError::FaultOutsideRam(addr))?;
        let held = self
            .source
            .read_page(ram_offset, buf)
            .map_err(|source| FaultError::Source { ram_offset, source })?;
        // A zero page read is mapped to the shared zero page; one about to
        // be written gets a private zeroed page now, sparing the guest a
        // second (copy-on-write) fault right after this one.
        let src = if held {
            Some(&buf[..])
        } else if flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0 {
            Some(&ZERO_PAGE[..])
        } else {
            None
        };
        // Placing the page wakes the faulting thread, so hold the lock
        // across placing and noting it: whoever saw the touch complete and
        // then stops recording (or reads the stats) waits for the note.
        let mut recording = self
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let placed = self
            .uffd
            .place(host, PAGE_SIZE, src)
            .map_err(|source| FaultError::Place { ram_offset, source })?;
        if placed == 0 {
            self.already_present.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        if let Some(pages) = recording.as_mut() {
            pages.push(ram_offset);
        }
        Ok(())
    }

    /// The handler thread: resolves faults until `stop` is signalled.
    fn serve(&self, stop: &EventFd) -> Result<(), FaultError> {
        let uffd_err = |op, e: Errno| FaultError::Op {
            op,
            source: e.into(),
        };
        let mut page = vec![0u8; PAGE_SIZE];
        let mut msgs = [0u8; sys::MSG_SIZE * 32];
        loop {
            let mut fds = [
                PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(uffd_err("poll", e)),
            }
            let stopping = fds[1].any().unwrap_or(false);
            // Drain every pending fault first, even when stopping: a thread
            // waiting on one would otherwise wait forever.
            loop {
                let n = match nix::unistd::read(&self.uffd, &mut msgs) {
                    Ok(n) => n,
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(uffd_err("read", e)),
                };
                for msg in msgs[..n].chunks_exact(sys::MSG_SIZE) {
                    // Only page faults arrive: no other event was asked for.
                    if msg[0] == sys::UFFD_EVENT_PAGEFAULT {
                        self.serve_fault(word(msg, 8), word(msg, 16), &mut page)?;
                    }
                }
            }
            if stopping {
                return Ok(());
            }
        }
    }
}

/// The native-endian `u64` at byte `at` of a fault message.
fn word(msg: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&msg[at..at + 8]);
    u64::from_ne_bytes(w)
}

/// Resolves the missing-page faults of a VM's anonymous guest memory from
/// a [`PageSource`], on its own thread, for as long as it lives; while
/// recording, it notes the RAM offset of each page in first-touch order.
///
/// Keep it alive while anything may touch the memory: once it is gone the
/// kernel resolves the remaining faults itself — with zero pages. If the
/// handler fails (the layers cannot be read), the faulting thread waits
/// for ever: [`FaultHandler::failure`] becomes readable, and the VM must be
/// killed, not resumed.
pub struct FaultHandler {
    pub(super) shared: Arc<Shared>,
    stop: Arc<EventFd>,
    failed: Arc<EventFd>,
    handler: Option<JoinHandle<Result<(), FaultError>>>,
    pub(super) prefetch: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl FaultHandler {
    /// Registers every region of `mem` — anonymous memory nothing has
    /// touched yet (touched pages never fault, so they go unrecorded) —
    /// and starts recording: [`FaultHandler::stop_recording`] returns the
    /// pages faulted in since.
    pub fn record(mem: &GuestMemoryMmap, source: Arc<dyn PageSource>) -> Result<Self, FaultError> {
        Self::start(host_regions(mem)?, source, true)
    }

    pub(super) fn start(
        regions: Vec<HostRegion>,
        source: Arc<dyn PageSource>,
        record: bool,
    ) -> Result<Self, FaultError> {
        let uffd = Uffd::open()?;
        for r in &regions {
            uffd.register(r.host, r.len)?;
        }
        let shared = Arc::new(Shared {
            uffd,
            regions,
            source,
            recording: Mutex::new(record.then(Vec::new)),
            faults: AtomicU64::new(0),
            already_present: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
        });
        let eventfd = || {
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(|e| FaultError::EventFd(e.into()))
        };
        let (stop, failed) = (eventfd()?, eventfd()?);
        let handler = {
            let (shared, stop, failed) = (shared.clone(), stop.clone(), failed.clone());
            std::thread::Builder::new()
                .name("uffd-handler".into())
                .spawn(move || {
                    let result = seccomp::install(ThreadClass::FaultHandler)
                        .map_err(FaultError::from)
                        .and_then(|()| shared.serve(&stop));
                    if let Err(e) = &result {
                        log::error!("guest memory fault handler stopped: {e}");
                        // The owner learns it from `failure`; nothing more
                        // can be done here if even the eventfd fails.
                        let _ = failed.write(1);
                    }
                    result
                })
                .map_err(|e| FaultError::Spawn("userfaultfd handler", e))?
        };
        Ok(Self {
            shared,
            stop,
            failed,
            handler: Some(handler),
            prefetch: None,
        })
    }

    /// Stops recording and returns the pages recorded, as RAM offsets in
    /// first-touch order (empty if not recording). Faults go on being
    /// served.
    pub fn stop_recording(&self) -> Vec<u64> {
        self.shared
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default()
    }

    /// What the handler and the loader have done so far, including every
    /// fault whose thread has been woken.
    pub fn stats(&self) -> HandlerStats {
        // The handler counts a fault under this lock (see `serve_fault`).
        drop(
            self.shared
                .recording
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        HandlerStats {
            faults: self.shared.faults.load(Ordering::Relaxed),
            already_present: self.shared.already_present.load(Ordering::Relaxed),
            loaded: self.shared.loaded.load(Ordering::Relaxed),
        }
    }

    /// Readable once the handler thread has failed (for an epoll loop).
    pub fn failure(&self) -> BorrowedFd<'_> {
        self.failed.as_fd()
    }

    /// Stops the threads and returns the final stats, or the error the
    /// handler thread failed with. Call it only once nothing touches the
    /// memory any more (see the type's documentation).
    pub fn shutdown(mut self) -> Result<HandlerStats, FaultError> {
        self.stop_threads()?;
        Ok(self.stats())
    }

    fn stop_threads(&mut self) -> Result<(), FaultError> {
        if let Some((cancel, prefetch)) = self.prefetch.take() {
            cancel.store(true, Ordering::Relaxed);
            // A panic in the prefetcher was reported by the panic hook and
            // cost only speed; the handler still serves every page.
            let _ = prefetch.join();
        }
        let Some(handler) = self.handler.take() else {
            return Ok(());
        };
        // If the write fails the join below would hang; a full or broken
        // eventfd cannot happen for a counter written once.
        let _ = self.stop.write(1);
        handler.join().map_err(|_| FaultError::HandlerPanicked)?
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        // Errors were logged by the thread as it failed.
        let _ = self.stop_threads();
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    use super::super::ws_loader;
    use super::*;
    use crate::snapshot::layers::test_util::{pattern, sparse_source};
    use crate::snapshot::layers::LayerStack;
    use crate::snapshot::ws::{self, WorkingSet, WsRange};
    use crate::vmm::memory;

    const PAGE: u64 = PAGE_SIZE as u64;

    /// Records `touch` (guest addresses, in order) on `mem_mib` MiB and
    /// writes the set into `dir`.
    fn record_set(dir: &Path, mem_mib: u64, source: Arc<LayerStack>, touch: &[u64]) -> WorkingSet {
        let mem = memory::create(mem_mib).unwrap();
        let handler = must_work(FaultHandler::record(&mem, source.clone()));
        for &a in touch {
            mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        }
        let pages = handler.stop_recording();
        ws::write(dir, &pages, source.as_ref(), mem_mib << 20, "stack-1").unwrap()
    }

    fn must_work<T>(r: Result<T, FaultError>) -> T {
        r.unwrap_or_else(|e| {
            panic!("userfaultfd must work on this host (DESIGN.md), and it does not: {e}")
        })
    }

    #[test]
    fn recorder_serves_vmm_thread_faults_in_first_touch_order() {
        let dir = TempDir::new().unwrap();
        let source = sparse_source(dir.as_path(), 4, &[(0x10000, 0x4000), (0x20_0000, PAGE)]);
        let mem = memory::create(4).unwrap();
        let handler = must_work(FaultHandler::record(&mem, source));
        // (guest address, write?) in touch order; guest address = RAM
        // offset below 3 GiB.
        let order = [
            (0x20_0008, false),
            (0x5000, false),
            (0x12010, true),
            (0x3f_f000, true),
            (0x10000, false),
        ];
        std::thread::scope(|s| {
            s.spawn(|| {
                for (addr, write) in order {
                    if write {
                        mem.write_obj(7u64, GuestAddress(addr)).unwrap();
                    } else {
                        mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
                    }
                }
                // A second touch of a page faults no more.
                mem.write_obj(8u64, GuestAddress(0x12018)).unwrap();
            });
        });
        let pages: Vec<u64> = order.iter().map(|&(a, _)| a & !(PAGE - 1)).collect();
        assert_eq!(handler.stop_recording(), pages);
        assert_eq!(handler.stats().faults, 5);

        // Contents: the source's, zero where it holds nothing, and the
        // writes made since.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(),
            pattern(0x20_0000)
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x10000)).unwrap(),
            pattern(0x10000)
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x12000)).unwrap(),
            pattern(0x12000)
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x12010)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x12018)).unwrap(), 8);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3f_f000)).unwrap(), 7);

        // After recording stops, faults are still served, just not noted.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x13000)).unwrap(),
            pattern(0x13000)
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x7000)).unwrap(), 0);
        assert_eq!(handler.stop_recording(), Vec::<u64>::new());
        assert_eq!(handler.shutdown().unwrap().faults, 7);
    }

    #[test]
    fn kernel_mode_faults_are_served() {
        let dir = TempDir::new().unwrap();
        let source = sparse_source(dir.as_path(), 4, &[(0, 0x10_0000)]);
        let mem = memory::create(4).unwrap();
        let handler = must_work(FaultHandler::record(&mem, source));

        // A device reading a disk into guest memory: read(2) stores into
        // the missing pages from kernel mode (copy_to_user).
        let disk = dir.as_path().join("disk");
        fs::write(&disk, vec![0x42u8; 3 * PAGE_SIZE]).unwrap();
        let mut disk = File::open(&disk).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x20_0000), &mut disk, 3 * PAGE_SIZE)
            .unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_2fff)).unwrap(), 0x42);

        let recorded = handler.stop_recording();
        assert_eq!(
            recorded,
            vec![0x20_0000, 0x20_1000, 0x20_2000],
            "{recorded:x?}"
        );
        assert_eq!(handler.shutdown().unwrap().faults, 3);
        // The disk really was read to its end.
        assert_eq!(disk.read(&mut [0u8; 1]).unwrap(), 0);
    }

    #[test]
    fn vcpu_faults_through_kvm_are_served() {
        let dir = TempDir::new().unwrap();
        let source = sparse_source(dir.as_path(), 4, &[(0x1000, 0x2000)]);
        // Real mode at 0x1000: mov al, [0x2000]; out 0x10, al; hlt.
        let memory = fs::OpenOptions::new()
            .write(true)
            .open(dir.as_path().join("memory"))
            .unwrap();
        memory
            .write_all_at(&[0xa0, 0x00, 0x20, 0xe6, 0x10, 0xf4], 0x1000)
            .unwrap();
        memory.write_all_at(&[0x77], 0x2000).unwrap();

        let mem = memory::create(4).unwrap();
        let handler = must_work(FaultHandler::record(&mem, source));
        let kvm =
            kvm_ioctls::Kvm::new().unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"));
        let vm = kvm.create_vm().unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        // SAFETY: `mem` is declared before `vm`, so it outlives the VM.
        unsafe {
            vm.set_user_memory_region(kvm_bindings::kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: 4 << 20,
                userspace_addr: host,
            })
        }
        .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        (sregs.cs.base, sregs.cs.selector) = (0, 0);
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        // The instruction fetch and the load both reach guest memory
        // through KVM (get_user_pages), from the vCPU thread.
        match vcpu.run().unwrap() {
            kvm_ioctls::VcpuExit::IoOut(0x10, data) => assert_eq!(data, [0x77]),
            exit => panic!("unexpected exit {exit:?}"),
        }
        assert_eq!(handler.stop_recording(), vec![0x1000, 0x2000]);
    }

    #[test]
    fn racing_faults_on_the_same_pages_are_served_once_each() {
        let dir = TempDir::new().unwrap();
        let source = sparse_source(dir.as_path(), 4, &[(0, 0x10_0000)]);
        let mem = memory::create(4).unwrap();
        let handler = must_work(FaultHandler::record(&mem, source));
        let pages: Vec<u64> = (0..0x20_0000).step_by(PAGE_SIZE).collect();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (mem, pages) = (&mem, &pages);
                s.spawn(move || {
                    // Every thread walks all pages, from a different start.
                    for i in 0..pages.len() {
                        let p = pages[(i + t as usize * 97) % pages.len()];
                        let want = if p < 0x10_0000 { pattern(p) } else { 0 };
                        assert_eq!(mem.read_obj::<u64>(GuestAddress(p)).unwrap(), want);
                    }
                });
            }
        });
        let mut recorded = handler.stop_recording();
        let stats = handler.shutdown().unwrap();
        assert_eq!(stats.faults, pages.len() as u64);
        recorded.sort_unstable();
        assert_eq!(recorded, pages);
    }

    #[test]
    fn a_failing_source_is_reported_and_fails_the_handler() {
        struct Broken;
        impl PageSource for Broken {
            fn read_page(&self, _: u64, _: &mut [u8]) -> io::Result<bool> {
                Err(io::Error::other("disk gone"))
            }
        }
        let mem = Arc::new(memory::create(4).unwrap());
        let handler = must_work(FaultHandler::record(&mem, Arc::new(Broken)));
        let (tx, rx) = mpsc::channel();
        let toucher = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                // Waits until the handler is gone, then gets a zero page.
                tx.send(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap())
                    .unwrap();
            })
        };
        let mut fds = [PollFd::new(handler.failure(), PollFlags::POLLIN)];
        assert_eq!(nix::poll::poll(&mut fds, 5000u16).unwrap(), 1);
        assert!(rx.try_recv().is_err(), "the faulting thread must wait");
        let err = handler.shutdown().unwrap_err();
        assert!(
            matches!(
                err,
                FaultError::Source {
                    ram_offset: 0x1000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        toucher.join().unwrap();
    }

    #[test]
    fn the_loaded_set_gives_the_recorded_contents() {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path();
        // 4 GiB: two regions, RAM offset 3 GiB is guest address 4 GiB, so
        // the recorded run around it crosses from one mapping into the next.
        let gib = 1u64 << 30;
        let data = [(3 * gib - 0x2000, 0x4000), (0x10000, 0x10000)];
        let source = sparse_source(d, 4096, &data);
        let touch = [
            3 * gib - 0x2000,
            3 * gib - 0x1000,
            4 * gib,
            4 * gib + 0x1000,
            0x5000,
            0x10000,
            0x11000,
        ];
        let ws = record_set(d, 4096, source.clone(), &touch);
        assert_eq!(
            ws.ranges()[0],
            WsRange {
                ram_offset: 3 * gib - 0x2000,
                len: 0x4000,
                zero: false
            }
        );
        let expect = |mem: &GuestMemoryMmap| {
            for (a, ram) in [
                (3 * gib - 0x2000, 3 * gib - 0x2000),
                (4 * gib + 0x1000, 3 * gib + 0x1000),
                (0x11000, 0x11000),
                (0x1f000, 0x1f000),
            ] {
                assert_eq!(mem.read_obj::<u64>(GuestAddress(a)).unwrap(), pattern(ram));
            }
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 0);
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x6000)).unwrap(), 0);
        };
        let mem = memory::create(4096).unwrap();
        let set = ws::read(d, 4 << 30, "stack-1").unwrap();
        let handler = must_work(ws_loader::load(&mem, set, source.clone()));
        expect(&mem);
        let stats = handler.shutdown().unwrap();
        // `expect` touched six pages, two of them (0x1f000, 0x6000)
        // outside the set: the handler served those, and any page of the
        // set the racing prefetcher had not placed yet (shutting down
        // stops it where it is).
        let placed = stats.faults + stats.loaded;
        assert!((6..=touch.len() as u64 + 2).contains(&placed), "{stats:?}");
    }
}
