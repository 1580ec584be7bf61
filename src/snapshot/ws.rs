//! Working sets (REAP): the guest pages one request touches, recorded in
//! first-touch order by a `--dump_ws` run and loaded eagerly by a
//! `--load_ws` restore, so that the restored VM does not take one page
//! fault per page of its working set.
//!
//! Recording: the `--dump_ws` restore gives the VM anonymous memory and
//! registers it with userfaultfd in MISSING mode (a `MAP_PRIVATE` file
//! mapping cannot be registered: EINVAL, DESIGN.md). The first touch of a
//! page — by a vCPU through KVM or by a VMM thread, in user or kernel mode —
//! then waits in the kernel until the [`FaultHandler`] thread has placed the
//! page's content, read from the snapshot layers ([`PageSource`]); the
//! handler notes each page it placed, in order.
//!
//! Files (DESIGN.md, "Snapshot directory"): `ws.json` lists the recorded
//! pages as ranges in first-touch order, each either data — its bytes are
//! the next ones in `ws` — or zero (no layer holds it, or it is all zero),
//! which takes no room in `ws`; it also names the layer stack it was
//! recorded on. `ws` holds the data ranges' bytes back to back. Both are
//! written crash-safely, `ws.json` last, by [`write()`]; [`read()`] checks
//! them.
//!
//! Loading, two mechanisms (`examples/ws_load.rs` measures them; a
//! `--load_ws` restore uses [`AnonLoad::Prefetch`], fastest to the first
//! response in `scripts/bench.sh`'s ladder):
//! - [`load_anonymous`]: anonymous memory; the working set is read from
//!   `ws` with large sequential reads and placed before the VM runs, or by
//!   a prefetch thread racing it; every other page is served on first touch
//!   by the fault handler, from the layers.
//! - [`populate`]: the layers' `MAP_PRIVATE` mapping, prefaulted over the
//!   working-set ranges in address order (`MADV_POPULATE_WRITE`/`_READ`).

use std::ffi::c_void;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::MmapAdvise;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::envelope::{self, Kind, Refusal};
use crate::vmm::memory::{GuestMemoryMmap, PAGE_SIZE};

/// Name of the working-set data file in a snapshot directory.
pub const WS_FILE: &str = "ws";
/// Name of the working-set index in a snapshot directory.
pub const WS_INDEX_FILE: &str = "ws.json";
/// The `format` member of `ws.json`.
const FORMAT: &str = "snapvm-ws";
/// The `ws.json` version this snapvm writes and reads.
const VERSION: u32 = 1;

/// Bytes read from `ws` per `pread`. Large enough that the read calls cost
/// nothing next to the copying, small enough that the staging buffer stays
/// in the CPU cache between the read and the copy into guest memory.
const CHUNK: usize = 512 << 10;

/// What a zero page is copied from when it must be a private page.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Where guest pages come from at restore: the stack of snapshot layers.
pub trait PageSource: Send + Sync {
    /// Fills `buf` (one page) with the content of RAM offset `ram_offset` (page aligned).
    /// Returns Ok(false), leaving `buf` alone, for a page no layer holds (a zero page).
    fn read_page(&self, ram_offset: u64, buf: &mut [u8]) -> std::io::Result<bool>;
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error(
        "userfaultfd is not available to this process ({0}); it needs a kernel built with \
         CONFIG_USERFAULTFD and either root, CAP_SYS_PTRACE, sysctl \
         vm.unprivileged_userfaultfd=1 or read-write access to /dev/userfaultfd"
    )]
    Unavailable(io::Error),
    #[error("userfaultfd {op} failed: {source}")]
    Uffd { op: &'static str, source: io::Error },
    #[error("this kernel's userfaultfd cannot {0} on anonymous memory")]
    Unsupported(&'static str),
    #[error(
        "cannot register guest memory with userfaultfd: {0} (only anonymous memory can be \
         registered, not a MAP_PRIVATE file mapping)"
    )]
    Register(io::Error),
    #[error("guest page fault at host address {0:#x}, which is not guest RAM")]
    FaultOutsideRam(u64),
    #[error("cannot read the guest page at RAM offset {ram_offset:#x} from the snapshot layers: {source}")]
    Source { ram_offset: u64, source: io::Error },
    #[error("cannot place guest memory at RAM offset {ram_offset:#x}: {source}")]
    Place { ram_offset: u64, source: io::Error },
    #[error(
        "cannot prefault guest RAM {ram_offset:#x}+{len:#x}: {source} \
         (MADV_POPULATE_READ/WRITE need Linux 5.14 or later)"
    )]
    Populate {
        ram_offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("the working-set range {ram_offset:#x}+{len:#x} lies outside guest RAM")]
    OutsideRam { ram_offset: u64, len: u64 },
    #[error("cannot start the {0} thread: {1}")]
    Spawn(&'static str, io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
    #[error("the userfaultfd handler thread panicked")]
    HandlerPanicked,
    #[error("{0} holds no working set (no ws.json): record one with --dump_ws")]
    Missing(PathBuf),
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is truncated or corrupt ({reason}): record the working set again with --dump_ws"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} was written by a newer snapvm (working-set format version {found}; this snapvm \
         reads version {VERSION}): upgrade snapvm or record the working set again"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error(
        "{path} belongs to another snapshot (recorded on the layer stack {found}, this restore \
         uses {expected}): record the working set again with --dump_ws"
    )]
    Stale {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} was recorded for {found} bytes of guest RAM, this VM has {expected}")]
    RamSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("cannot write a working set from this page list: {0}")]
    BadPages(String),
    #[error("cannot encode ws.json: {0}")]
    Encode(serde_json::Error),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> WsError + '_ {
    move |source| WsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The userfaultfd uAPI (`<linux/userfaultfd.h>`), the part used here.
/// Written out because the `userfaultfd` crate generates its bindings with
/// bindgen at build time, which needs libclang on every build machine.
mod sys {
    #![allow(non_camel_case_types)]

    const UFFDIO: u32 = 0xAA;
    pub const UFFD_API: u64 = 0xAA;
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
    /// Size of `struct uffd_msg`; a read returns whole messages.
    pub const MSG_SIZE: usize = 32;
    /// Bit numbers of the ioctls in `uffdio_api.ioctls`/`uffdio_register.ioctls`.
    pub const BIT_REGISTER: u32 = 0x00;
    pub const BIT_WAKE: u32 = 0x02;
    pub const BIT_COPY: u32 = 0x03;
    pub const BIT_ZEROPAGE: u32 = 0x04;

    #[repr(C)]
    pub struct uffdio_api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    pub struct uffdio_range {
        pub start: u64,
        pub len: u64,
    }

    #[repr(C)]
    pub struct uffdio_register {
        pub range: uffdio_range,
        pub mode: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    pub struct uffdio_copy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }

    #[repr(C)]
    pub struct uffdio_zeropage {
        pub range: uffdio_range,
        pub mode: u64,
        pub zeropage: i64,
    }

    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, uffdio_api);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, BIT_REGISTER, uffdio_register);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, BIT_WAKE, uffdio_range);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, BIT_COPY, uffdio_copy);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, BIT_ZEROPAGE, uffdio_zeropage);
    vmm_sys_util::ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
}

/// A userfaultfd file descriptor.
struct Uffd(OwnedFd);

impl Uffd {
    /// Opens a userfaultfd for kernel-mode faults as well as user-mode ones:
    /// KVM faults guest pages in with get_user_pages and the VMM's device
    /// threads with copy_to_user, and both must reach the handler.
    fn open() -> Result<Self, WsError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes one flags argument and returns a new
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as RawFd
        } else {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EPERM) {
                return Err(WsError::Unavailable(err));
            }
            // Unprivileged callers may still get one from /dev/userfaultfd
            // (Linux 6.1+) if they may open it.
            Self::open_device(flags).map_err(|_| WsError::Unavailable(err))?
        };
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let uffd = Uffd(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = sys::uffdio_api {
            api: sys::UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`,
        // which `api` is and which outlives the call.
        let rc = unsafe { ioctl_with_mut_ref(&uffd.0, sys::UFFDIO_API(), &mut api) };
        if rc < 0 {
            return Err(WsError::Uffd {
                op: "API handshake",
                source: io::Error::last_os_error(),
            });
        }
        if api.ioctls & (1 << sys::BIT_REGISTER) == 0 {
            return Err(WsError::Unsupported("register memory"));
        }
        Ok(uffd)
    }

    fn open_device(flags: i32) -> io::Result<RawFd> {
        let dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a
        // new descriptor or -1; it touches no memory of ours.
        let fd = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(&dev, sys::USERFAULTFD_IOC_NEW(), flags as u64)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Registers `host..host + len` (one anonymous mapping) for MISSING
    /// faults and checks that pages can be copied and zeroed into it.
    fn register(&self, host: usize, len: usize) -> Result<(), WsError> {
        let mut reg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: host as u64,
                len: len as u64,
            },
            mode: sys::UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one
        // `uffdio_register`, which `reg` is; registering changes no memory
        // contents, only who resolves the range's missing-page faults.
        let rc = unsafe { ioctl_with_mut_ref(&self.0, sys::UFFDIO_REGISTER(), &mut reg) };
        if rc < 0 {
            return Err(WsError::Register(io::Error::last_os_error()));
        }
        for (bit, what) in [
            (sys::BIT_COPY, "copy pages"),
            (sys::BIT_ZEROPAGE, "map zero pages"),
            (sys::BIT_WAKE, "wake faulting threads"),
        ] {
            if reg.ioctls & (1 << bit) == 0 {
                return Err(WsError::Unsupported(what));
            }
        }
        Ok(())
    }

    /// One UFFDIO_COPY (`src` to `dst`) or, without `src`, one
    /// UFFDIO_ZEROPAGE of `len` bytes. Returns the bytes placed (the kernel
    /// may stop early) and the error, if the call failed.
    fn fill_once(&self, dst: usize, len: usize, src: Option<&[u8]>) -> (i64, Option<io::Error>) {
        let (rc, placed) = match src {
            Some(src) => {
                let mut arg = sys::uffdio_copy {
                    dst: dst as u64,
                    src: src.as_ptr() as u64,
                    len: len as u64,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which the
                // borrowed slice holds (`place`, the only caller, checks),
                // writes `arg`, and fills only pages of a registered range
                // that are still missing (it fails with EEXIST rather than
                // overwrite one), which no Rust reference can point into.
                let rc = unsafe { ioctl_with_mut_ref(&self.0, sys::UFFDIO_COPY(), &mut arg) };
                (rc, arg.copy)
            }
            None => {
                let mut arg = sys::uffdio_zeropage {
                    range: sys::uffdio_range {
                        start: dst as u64,
                        len: len as u64,
                    },
                    mode: 0,
                    zeropage: 0,
                };
                // SAFETY: as for UFFDIO_COPY, without a source: it writes
                // `arg` and maps the zero page at missing pages only.
                let rc = unsafe { ioctl_with_mut_ref(&self.0, sys::UFFDIO_ZEROPAGE(), &mut arg) };
                (rc, arg.zeropage)
            }
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        (placed, err)
    }

    /// Places `len` bytes at `dst` (page aligned, registered): a copy of
    /// `src`, or zero pages when `src` is None, and wakes the threads
    /// waiting on them. Returns the pages placed: fewer than `len` covers
    /// if some were present already.
    fn place(&self, dst: usize, len: usize, src: Option<&[u8]>) -> io::Result<u64> {
        if src.is_some_and(|s| s.len() < len) {
            return Err(io::Error::other("userfaultfd copy source too short"));
        }
        let mut pages = 0;
        let mut done = 0;
        while done < len {
            let (placed, err) = self.fill_once(dst + done, len - done, src.map(|s| &s[done..]));
            // The kernel reports progress even when it stops early with
            // EAGAIN; whatever it placed is done, and woken.
            if placed > 0 {
                done += placed as usize;
                pages += placed as u64 / PAGE_SIZE as u64;
                continue;
            }
            let Some(err) = err else {
                // Success with nothing placed would loop forever.
                return Err(io::Error::other("userfaultfd placed no page"));
            };
            match err.raw_os_error() {
                // The address space is changing under us (EAGAIN) or a
                // fatal signal is pending (EINTR): nothing was placed, so
                // try again.
                Some(libc::EAGAIN) | Some(libc::EINTR) => std::thread::yield_now(),
                // The first page is present already: a racing placement
                // (two threads faulting on one page, or the prefetcher and
                // the handler) won. That placement woke its own waiters,
                // but one that queued its fault after the wake would wait
                // forever, so wake the page again and go on past it.
                Some(libc::EEXIST) => {
                    self.wake(dst + done)?;
                    done += PAGE_SIZE;
                }
                _ => return Err(err),
            }
        }
        Ok(pages)
    }

    /// Wakes the threads waiting on the page at `host`.
    fn wake(&self, host: usize) -> io::Result<()> {
        let range = sys::uffdio_range {
            start: host as u64,
            len: PAGE_SIZE as u64,
        };
        // SAFETY: UFFDIO_WAKE reads exactly one `uffdio_range`, which
        // `range` is; waking changes no memory.
        let rc = unsafe { ioctl_with_ref(&self.0, sys::UFFDIO_WAKE(), &range) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One region of guest RAM: where it is mapped and where it starts in the
/// RAM offset space (the regions concatenated in guest-address order).
#[derive(Debug, Clone, Copy)]
struct HostRegion {
    host: usize,
    len: usize,
    ram_offset: u64,
}

fn host_regions(mem: &GuestMemoryMmap) -> Result<Vec<HostRegion>, WsError> {
    let mut ram_offset = 0;
    let mut out = Vec::new();
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| WsError::Place {
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
fn ram_offset_of(regions: &[HostRegion], host: usize) -> Option<u64> {
    regions
        .iter()
        .find(|r| (r.host..r.host + r.len).contains(&host))
        .map(|r| r.ram_offset + (host - r.host) as u64)
}

/// Calls `f(host address, offset into the run, length)` for each part of
/// the RAM run `ram_offset..ram_offset + len` that lies in one region: a
/// run may cross from one region into the next, whose host addresses are
/// not adjacent. Fails, before calling `f`, if the run leaves guest RAM.
fn for_each_span(
    regions: &[HostRegion],
    ram_offset: u64,
    len: u64,
    mut f: impl FnMut(usize, usize, usize) -> Result<(), WsError>,
) -> Result<(), WsError> {
    let end = ram_offset
        .checked_add(len)
        .filter(|&end| end <= ram_size(regions))
        .ok_or(WsError::OutsideRam { ram_offset, len })?;
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
struct Shared {
    uffd: Uffd,
    regions: Vec<HostRegion>,
    source: Arc<dyn PageSource>,
    /// The pages placed on faults, in order, while recording.
    recording: Mutex<Option<Vec<u64>>>,
    faults: AtomicU64,
    already_present: AtomicU64,
    loaded: AtomicU64,
}

impl Shared {
    /// Resolves one page fault at `addr` (`flags` from the fault message).
    fn serve_fault(&self, flags: u64, addr: u64, buf: &mut [u8]) -> Result<(), WsError> {
        let host = addr as usize & !(PAGE_SIZE - 1);
        let ram_offset =
            ram_offset_of(&self.regions, host).ok_or(WsError::FaultOutsideRam(addr))?;
        let held = self
            .source
            .read_page(ram_offset, buf)
            .map_err(|source| WsError::Source { ram_offset, source })?;
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
            .map_err(|source| WsError::Place { ram_offset, source })?;
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
    fn serve(&self, stop: &EventFd) -> Result<(), WsError> {
        let uffd_err = |op, e: Errno| WsError::Uffd {
            op,
            source: e.into(),
        };
        let mut page = vec![0u8; PAGE_SIZE];
        let mut msgs = [0u8; sys::MSG_SIZE * 32];
        loop {
            let mut fds = [
                PollFd::new(self.uffd.0.as_fd(), PollFlags::POLLIN),
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
                let n = match nix::unistd::read(&self.uffd.0, &mut msgs) {
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
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    failed: Arc<EventFd>,
    handler: Option<JoinHandle<Result<(), WsError>>>,
    prefetch: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl FaultHandler {
    /// Registers every region of `mem` — anonymous memory nothing has
    /// touched yet (touched pages never fault, so they go unrecorded) —
    /// and starts recording: [`FaultHandler::stop_recording`] returns the
    /// pages faulted in since.
    pub fn record(mem: &GuestMemoryMmap, source: Arc<dyn PageSource>) -> Result<Self, WsError> {
        Self::start(host_regions(mem)?, source, true)
    }

    fn start(
        regions: Vec<HostRegion>,
        source: Arc<dyn PageSource>,
        record: bool,
    ) -> Result<Self, WsError> {
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
                .map_err(|e| WsError::EventFd(e.into()))
        };
        let (stop, failed) = (eventfd()?, eventfd()?);
        let handler = {
            let (shared, stop, failed) = (shared.clone(), stop.clone(), failed.clone());
            std::thread::Builder::new()
                .name("uffd-handler".into())
                .spawn(move || {
                    let result = shared.serve(&stop);
                    if let Err(e) = &result {
                        log::error!("guest memory fault handler stopped: {e}");
                        // The owner learns it from `failure`; nothing more
                        // can be done here if even the eventfd fails.
                        let _ = failed.write(1);
                    }
                    result
                })
                .map_err(|e| WsError::Spawn("userfaultfd handler", e))?
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
    pub fn shutdown(mut self) -> Result<HandlerStats, WsError> {
        self.stop_threads()?;
        Ok(self.stats())
    }

    fn stop_threads(&mut self) -> Result<(), WsError> {
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
        handler.join().map_err(|_| WsError::HandlerPanicked)?
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        // Errors were logged by the thread as it failed.
        let _ = self.stop_threads();
    }
}

/// One run of the working set: `len` bytes of guest RAM from RAM offset
/// `ram_offset`, both page aligned. A data run's bytes are the next `len`
/// bytes of `ws`; a zero run takes no room there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsRange {
    pub ram_offset: u64,
    pub len: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
}

/// The body of `ws.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    /// Names the layer stack the set was recorded on.
    identity: String,
    ram_size: u64,
    pages: u64,
    /// Size of `ws`: the data runs' total length.
    data_bytes: u64,
    /// In first-touch order, which is also `ws`'s order.
    ranges: Vec<WsRange>,
}

/// `ws.json` as an envelope.
const KIND: Kind = Kind {
    format: FORMAT,
    version: VERSION,
    member: "ws",
};

/// A checked working set, ready to load.
#[derive(Debug)]
pub struct WorkingSet {
    ranges: Vec<WsRange>,
    pages: u64,
    data_bytes: u64,
    /// `ws`, opened while the index was read, so both are of one write.
    file: File,
    path: PathBuf,
}

impl WorkingSet {
    /// The runs in first-touch order.
    pub fn ranges(&self) -> &[WsRange] {
        &self.ranges
    }

    /// Pages in the set.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of `ws` (the pages that are not zero).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }
}

/// Takes `dir`'s lock (shared for readers, exclusive for the writer), so a
/// reader never pairs one writer's `ws.json` with another's `ws`.
fn lock_dir(dir: &Path, how: FlockArg) -> Result<Flock<File>, WsError> {
    let file = File::open(dir).map_err(io_at(dir))?;
    Flock::lock(file, how).map_err(|(_, e)| WsError::Io {
        path: dir.to_owned(),
        source: e.into(),
    })
}

fn fsync_dir(dir: &Path) -> Result<(), WsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Writes `ws` and `ws.json` into the snapshot layer directory `dir`: the
/// contents of `pages` (RAM offsets in first-touch order, as
/// [`FaultHandler::stop_recording`] returns them) read from `source` — the
/// layers as they were at restore, not the memory the request has since
/// changed — recorded on the layer stack `identity` with `ram_size` bytes
/// of RAM. Crash-safe: a reader finds the complete new set, the complete
/// old one, or none. Returns the set as [`read`] sees it.
pub fn write(
    dir: &Path,
    pages: &[u64],
    source: &dyn PageSource,
    ram_size: u64,
    identity: &str,
) -> Result<WorkingSet, WsError> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    if let Some(p) = sorted
        .iter()
        .find(|&&p| p % PAGE_SIZE as u64 != 0 || p >= ram_size)
    {
        return Err(WsError::BadPages(format!(
            "{p:#x} is not a page of {ram_size:#x} bytes of RAM"
        )));
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(WsError::BadPages(format!("{:#x} is listed twice", w[0])));
    }

    let lock = lock_dir(dir, FlockArg::LockExclusive)?;
    let index_path = dir.join(WS_INDEX_FILE);
    // The old index goes first, durably: until the new one lands there is
    // none, so a crash half way never leaves an index describing the wrong
    // `ws`.
    match fs::remove_file(&index_path) {
        Ok(()) => fsync_dir(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&index_path)(e)),
    }

    let ws_path = dir.join(WS_FILE);
    let ws_tmp = dir.join(format!("{WS_FILE}.tmp"));
    let file = File::create(&ws_tmp).map_err(io_at(&ws_tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut ranges: Vec<WsRange> = Vec::new();
    let mut data_bytes = 0;
    let mut page = vec![0u8; PAGE_SIZE];
    for &ram_offset in pages {
        let held = source
            .read_page(ram_offset, &mut page)
            .map_err(|source| WsError::Source { ram_offset, source })?;
        let zero = !held || page.iter().all(|&b| b == 0);
        if !zero {
            out.write_all(&page).map_err(io_at(&ws_tmp))?;
            data_bytes += PAGE_SIZE as u64;
        }
        match ranges.last_mut() {
            Some(r) if r.zero == zero && r.ram_offset + r.len == ram_offset => {
                r.len += PAGE_SIZE as u64
            }
            _ => ranges.push(WsRange {
                ram_offset,
                len: PAGE_SIZE as u64,
                zero,
            }),
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| io_at(&ws_tmp)(e.into_error()))?;
    file.sync_all().map_err(io_at(&ws_tmp))?;
    fs::rename(&ws_tmp, &ws_path).map_err(io_at(&ws_path))?;

    let index = Index {
        identity: identity.to_owned(),
        ram_size,
        pages: pages.len() as u64,
        data_bytes,
        ranges,
    };
    let body = serde_json::to_string(&index).map_err(WsError::Encode)?;
    let text = envelope::seal(&KIND, VERSION, &body);
    let index_tmp = dir.join(format!("{WS_INDEX_FILE}.tmp"));
    File::create(&index_tmp)
        .and_then(|mut f| {
            f.write_all(&text)?;
            f.sync_all()
        })
        .map_err(io_at(&index_tmp))?;
    fs::rename(&index_tmp, &index_path).map_err(io_at(&index_path))?;
    fsync_dir(dir)?;
    drop(lock);
    read(dir, ram_size, identity)
}

/// Reads and checks the working set in the snapshot layer directory `dir`
/// for a VM with `ram_size` bytes of RAM restored from the layer stack
/// `identity`: the index's format, version and checksum, that it was
/// recorded on this stack and RAM size, that its ranges are page aligned,
/// inside RAM and disjoint, and that `ws` has the size it describes.
pub fn read(dir: &Path, ram_size: u64, identity: &str) -> Result<WorkingSet, WsError> {
    let _lock = lock_dir(dir, FlockArg::LockShared)?;
    let path = dir.join(WS_INDEX_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(WsError::Missing(dir.to_owned()))
        }
        Err(e) => return Err(io_at(&path)(e)),
    };
    let corrupt = |reason: String| WsError::Corrupt {
        path: path.clone(),
        reason,
    };
    let body = match envelope::open(&KIND, &bytes) {
        Ok((_, body)) => body,
        Err(Refusal::Newer(found)) => return Err(WsError::Newer { path, found }),
        Err(Refusal::Malformed(reason)) => return Err(corrupt(reason)),
        Err(Refusal::OtherFormat(found)) => return Err(corrupt(format!("format {found:?}"))),
        Err(Refusal::Older(found)) => return Err(corrupt(format!("unknown version {found}"))),
        Err(Refusal::Checksum) => {
            return Err(corrupt("its checksum does not match its content".into()))
        }
    };
    let index: Index = serde_json::from_str(body).map_err(|e| corrupt(e.to_string()))?;
    if index.identity != identity {
        return Err(WsError::Stale {
            path,
            found: index.identity,
            expected: identity.to_owned(),
        });
    }
    if index.ram_size != ram_size {
        return Err(WsError::RamSize {
            path,
            found: index.ram_size,
            expected: ram_size,
        });
    }

    let page = PAGE_SIZE as u64;
    let (mut total, mut data) = (0u64, 0u64);
    for r in &index.ranges {
        if r.ram_offset % page != 0 || r.len % page != 0 || r.len == 0 {
            return Err(corrupt(format!(
                "range {:#x}+{:#x} is not whole pages",
                r.ram_offset, r.len
            )));
        }
        if r.ram_offset.checked_add(r.len).is_none_or(|e| e > ram_size) {
            return Err(corrupt(format!(
                "range {:#x}+{:#x} lies outside guest RAM",
                r.ram_offset, r.len
            )));
        }
        total += r.len;
        if !r.zero {
            data += r.len;
        }
    }
    let mut by_address: Vec<(u64, u64)> =
        index.ranges.iter().map(|r| (r.ram_offset, r.len)).collect();
    by_address.sort_unstable();
    if let Some(w) = by_address.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(corrupt(format!("ranges overlap at {:#x}", w[1].0)));
    }
    if total != index.pages * page || data != index.data_bytes {
        return Err(corrupt("its page counts do not add up".into()));
    }

    let ws_path = dir.join(WS_FILE);
    let file = File::open(&ws_path).map_err(io_at(&ws_path))?;
    let len = file.metadata().map_err(io_at(&ws_path))?.len();
    if len != data {
        return Err(WsError::Corrupt {
            path: ws_path,
            reason: format!("it holds {len} bytes, {WS_INDEX_FILE} describes {data}"),
        });
    }
    Ok(WorkingSet {
        ranges: index.ranges,
        pages: index.pages,
        data_bytes: data,
        file,
        path: ws_path,
    })
}

/// Reads the working set's runs from `ws` in file order, `CHUNK` bytes
/// per `pread`, and hands each part that lies in one region to
/// `put(host address, length, data)` (`None` for a zero run). Stops early,
/// without error, once `cancel` is set.
fn walk(
    ws: &WorkingSet,
    regions: &[HostRegion],
    cancel: &AtomicBool,
    mut put: impl FnMut(usize, usize, Option<&[u8]>) -> Result<(), WsError>,
) -> Result<(), WsError> {
    let mut buf = vec![0u8; CHUNK.min(ws.data_bytes as usize)];
    // `buf` holds `ws[buf_start..buf_end]`; `pos` is the next byte to use.
    let (mut pos, mut buf_start, mut buf_end) = (0u64, 0u64, 0u64);
    for r in &ws.ranges {
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
                let want = (buf.len() as u64).min(ws.data_bytes - pos) as usize;
                ws.file
                    .read_exact_at(&mut buf[..want], pos)
                    .map_err(io_at(&ws.path))?;
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
fn place_all(shared: &Shared, ws: &WorkingSet, cancel: &AtomicBool) -> Result<(), WsError> {
    let zeros = vec![0u8; CHUNK];
    let place = |host: usize, src: &[u8]| {
        let pages = shared
            .uffd
            .place(host, src.len(), Some(src))
            .map_err(|source| WsError::Place {
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

/// Copies the working set into `regions` with plain stores, before any
/// fault handling: zero runs are faulted in with `MADV_POPULATE_WRITE`.
fn copy_all(regions: &[HostRegion], ws: &WorkingSet) -> Result<u64, WsError> {
    let mut pages = 0;
    walk(ws, regions, &AtomicBool::new(false), |host, len, data| {
        match data {
            Some(d) => {
                // SAFETY: `host..host + len` lies inside one region of the
                // guest memory (`for_each_span`), which the caller of
                // `load_anonymous` guarantees nothing else uses yet; `d` is
                // `len` bytes of the separate staging buffer.
                unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), host as *mut u8, len) }
            }
            None => madvise(host, len, MmapAdvise::MADV_POPULATE_WRITE).map_err(|e| {
                WsError::Populate {
                    ram_offset: ram_offset_of(regions, host).unwrap_or_default(),
                    len: len as u64,
                    source: e.into(),
                }
            })?,
        }
        pages += (len / PAGE_SIZE) as u64;
        Ok(())
    })?;
    Ok(pages)
}

/// How [`load_anonymous`] places the working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnonLoad {
    /// Copy it in with plain stores, then register userfaultfd for the
    /// rest.
    Copy,
    /// Register userfaultfd, then place it with UFFDIO_COPY, one call per
    /// contiguous run; returns once it is in.
    UffdCopy,
    /// As `UffdCopy`, on a thread that races the VM: returns at once, and
    /// a page the VM touches first is served by the fault handler.
    Prefetch,
}

/// `--load_ws` on anonymous memory: places the working set `ws` in `mem` —
/// anonymous guest RAM not given to a VM or device yet — and returns the
/// handler that serves every other page from `source` on first touch.
/// Pages already present (layers the caller copied in first) are left as
/// they are.
pub fn load_anonymous(
    mem: &GuestMemoryMmap,
    ws: WorkingSet,
    source: Arc<dyn PageSource>,
    how: AnonLoad,
) -> Result<FaultHandler, WsError> {
    let regions = host_regions(mem)?;
    // Start reading the whole of `ws` now: the disk works on later chunks
    // while earlier ones are copied.
    if let Err(e) = nix::fcntl::posix_fadvise(
        &ws.file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    ) {
        log::debug!("readahead of {} not started: {e}", ws.path.display());
    }
    match how {
        AnonLoad::Copy => {
            let pages = copy_all(&regions, &ws)?;
            let handler = FaultHandler::start(regions, source, false)?;
            handler.shared.loaded.store(pages, Ordering::Relaxed);
            Ok(handler)
        }
        AnonLoad::UffdCopy => {
            let handler = FaultHandler::start(regions, source, false)?;
            place_all(&handler.shared, &ws, &AtomicBool::new(false))?;
            Ok(handler)
        }
        AnonLoad::Prefetch => {
            let mut handler = FaultHandler::start(regions, source, false)?;
            let cancel = Arc::new(AtomicBool::new(false));
            let (shared, stop) = (handler.shared.clone(), cancel.clone());
            let thread = std::thread::Builder::new()
                .name("ws-prefetch".into())
                .spawn(move || {
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
                .map_err(|e| WsError::Spawn("working-set prefetch", e))?;
            handler.prefetch = Some((cancel, thread));
            Ok(handler)
        }
    }
}

/// How [`populate`] prefaults a file mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// `MADV_POPULATE_READ`: maps the page-cache pages; the guest's first
    /// write to each still faults (copy-on-write).
    Read,
    /// `MADV_POPULATE_WRITE`: makes each page a private copy now.
    Write,
}

fn madvise(host: usize, len: usize, advice: MmapAdvise) -> Result<(), Errno> {
    let addr = NonNull::new(host as *mut c_void).ok_or(Errno::EINVAL)?;
    loop {
        // SAFETY: `host..host + len` lies inside a live region of guest
        // memory, and neither readahead nor prefaulting changes memory
        // contents or mappings (a populate-write makes a private copy of
        // the same bytes).
        match unsafe { nix::sys::mman::madvise(addr, len, advice) } {
            // Interrupted by a signal: what is populated stays so.
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}

/// `--load_ws` on the layers' `MAP_PRIVATE` mapping (`mem`, from
/// `memory::map_snapshot`): prefaults the working-set `ranges` in address
/// order, so the file is read front to back.
pub fn populate(mem: &GuestMemoryMmap, ranges: &[WsRange], how: Populate) -> Result<(), WsError> {
    let regions = host_regions(mem)?;
    let mut sorted: Vec<(u64, u64)> = ranges.iter().map(|r| (r.ram_offset, r.len)).collect();
    sorted.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (off, len) in sorted {
        match merged.last_mut() {
            Some((o, l)) if *o + *l >= off => *l = (*l).max(off + len - *o),
            _ => merged.push((off, len)),
        }
    }
    // Queue the reads of every range first (readahead of exactly the
    // working set, asynchronous), then wait for them page by page: faults
    // alone would read one range at a time, each with a read-around window
    // of file data the set does not need. Measured: half the cold time.
    let advise = |advice| {
        merged.iter().try_for_each(|&(ram_offset, len)| {
            for_each_span(&regions, ram_offset, len, |host, _, n| {
                madvise(host, n, advice).map_err(|e| WsError::Populate {
                    ram_offset,
                    len,
                    source: e.into(),
                })
            })
        })
    };
    advise(MmapAdvise::MADV_WILLNEED)?;
    advise(match how {
        Populate::Read => MmapAdvise::MADV_POPULATE_READ,
        Populate::Write => MmapAdvise::MADV_POPULATE_WRITE,
    })
}

/// The memory of a stack of snapshot layers as a [`PageSource`]: each
/// layer is a memory file (pages at their RAM offsets) and the ranges it
/// holds; the top-most layer holding a page supplies it, a page no layer
/// holds is zero.
pub struct LayerStack {
    /// Bottom first; each layer's ranges `(RAM offset, length)` sorted and
    /// disjoint.
    layers: Vec<(File, Vec<(u64, u64)>)>,
}

impl LayerStack {
    /// `layers`, bottom first: each a memory file and the ranges it holds
    /// (a diff layer's from its memory table; a base's may also be the
    /// file's data ranges, as `memory::data_ranges` finds them).
    pub fn new(mut layers: Vec<(File, Vec<(u64, u64)>)>) -> Self {
        for (_, ranges) in &mut layers {
            ranges.sort_unstable();
        }
        Self { layers }
    }
}

impl PageSource for LayerStack {
    fn read_page(&self, ram_offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        for (file, ranges) in self.layers.iter().rev() {
            let i = ranges.partition_point(|&(o, l)| o + l <= ram_offset);
            if ranges.get(i).is_some_and(|&(o, _)| o <= ram_offset) {
                file.read_exact_at(buf, ram_offset)?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::vmm::memory;

    const PAGE: u64 = PAGE_SIZE as u64;

    /// The first word of the source page at `ram_offset`: names the page.
    fn pattern(ram_offset: u64) -> u64 {
        (ram_offset | 1) ^ 0x5a5a_0000_0000_0000
    }

    /// A sparse memory file of `mem_mib` MiB whose `data` ranges hold
    /// pages marked with [`pattern`].
    fn sparse_source(dir: &Path, mem_mib: u64, data: &[(u64, u64)]) -> Arc<LayerStack> {
        let path = dir.join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(mem_mib << 20).unwrap();
        let mut page = vec![0xa5u8; PAGE_SIZE];
        for &(off, len) in data {
            for p in (off..off + len).step_by(PAGE_SIZE) {
                page[..8].copy_from_slice(&pattern(p).to_ne_bytes());
                file.write_all_at(&page, p).unwrap();
            }
        }
        Arc::new(LayerStack::new(vec![(
            File::open(&path).unwrap(),
            data.to_vec(),
        )]))
    }

    fn must_work<T>(r: Result<T, WsError>) -> T {
        r.unwrap_or_else(|e| {
            panic!("userfaultfd must work on this host (DESIGN.md), and it does not: {e}")
        })
    }

    /// Whether the page at `addr` is mapped, and whether it is a page of
    /// a file (a page-cache page) rather than a private anonymous one
    /// (`/proc/self/pagemap`, bits 63 and 61).
    fn mapped(mem: &GuestMemoryMmap, addr: u64) -> (bool, bool) {
        let host = mem.get_host_address(GuestAddress(addr)).unwrap() as u64;
        let mut entry = [0u8; 8];
        File::open("/proc/self/pagemap")
            .unwrap()
            .read_exact_at(&mut entry, host / PAGE * 8)
            .unwrap();
        let entry = u64::from_ne_bytes(entry);
        (entry >> 63 == 1, entry >> 61 & 1 == 1)
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(sys::UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(sys::UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(sys::UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(sys::UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(sys::UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(sys::USERFAULTFD_IOC_NEW(), 0xaa00);
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
                WsError::Source {
                    ram_offset: 0x1000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        toucher.join().unwrap();
    }

    /// Records `touch` (guest addresses, in order) on `mem_mib` MiB and
    /// writes the set into `dir`.
    fn record_set(dir: &Path, mem_mib: u64, source: Arc<LayerStack>, touch: &[u64]) -> WorkingSet {
        let mem = memory::create(mem_mib).unwrap();
        let handler = must_work(FaultHandler::record(&mem, source.clone()));
        for &a in touch {
            mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        }
        let pages = handler.stop_recording();
        write(dir, &pages, source.as_ref(), mem_mib << 20, "stack-1").unwrap()
    }

    #[test]
    fn write_keeps_first_touch_order_and_read_gives_it_back() {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path();
        let source = sparse_source(d, 4, &[(0x10000, 0x8000), (0x30_0000, 0x2000)]);
        // Three pages of data, two zero pages, then data again, adjacent
        // in RAM to the first run but later in time.
        let touch = [
            0x11000, 0x12000, 0x13000, 0x1000, 0x2000, 0x30_1000, 0x14000,
        ];
        let ws = record_set(d, 4, source, &touch);
        assert_eq!(
            ws.ranges(),
            &[
                WsRange {
                    ram_offset: 0x11000,
                    len: 0x3000,
                    zero: false
                },
                WsRange {
                    ram_offset: 0x1000,
                    len: 0x2000,
                    zero: true
                },
                WsRange {
                    ram_offset: 0x30_1000,
                    len: 0x1000,
                    zero: false
                },
                WsRange {
                    ram_offset: 0x14000,
                    len: 0x1000,
                    zero: false
                },
            ]
        );
        assert_eq!((ws.pages(), ws.data_bytes()), (7, 5 * PAGE));
        let bytes = fs::read(d.join(WS_FILE)).unwrap();
        let firsts: Vec<u64> = bytes.chunks_exact(PAGE_SIZE).map(|p| word(p, 0)).collect();
        let want: Vec<u64> = [0x11000, 0x12000, 0x13000, 0x30_1000, 0x14000]
            .into_iter()
            .map(pattern)
            .collect();
        assert_eq!(firsts, want);
        let again = read(d, 4 << 20, "stack-1").unwrap();
        assert_eq!(again.ranges(), ws.ranges());
        let names: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");

        // A new recording replaces the old one.
        let source = Arc::new(LayerStack::new(vec![(
            File::open(d.join("memory")).unwrap(),
            vec![],
        )]));
        let ws = record_set(d, 4, source, &[0x5000]);
        assert_eq!(ws.data_bytes(), 0);
        assert_eq!(fs::metadata(d.join(WS_FILE)).unwrap().len(), 0);

        let none = Arc::new(LayerStack::new(vec![(
            File::open(d.join("memory")).unwrap(),
            vec![],
        )]));
        for bad in [&[0x1000, 0x1000][..], &[0x1001], &[4 << 20]] {
            let err = write(d, bad, none.as_ref(), 4 << 20, "s").unwrap_err();
            assert!(matches!(err, WsError::BadPages(_)), "{err}");
        }
    }

    /// `ws.json` text around `body`, with a correct checksum.
    fn seal(version: u32, body: &serde_json::Value) -> String {
        let text = envelope::seal(&KIND, version, &body.to_string());
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn read_refuses_missing_mismatched_and_corrupt_sets() {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path();
        let err = |r: Result<WorkingSet, WsError>| r.unwrap_err();
        assert!(matches!(err(read(d, 4 << 20, "s")), WsError::Missing(_)));

        let source = sparse_source(d, 4, &[(0, 0x10_0000)]);
        record_set(d, 4, source, &[0x1000, 0x2000, 0x8000]);
        let index = fs::read_to_string(d.join(WS_INDEX_FILE)).unwrap();
        assert!(matches!(
            err(read(d, 4 << 20, "stack-2")),
            WsError::Stale { .. }
        ));
        assert!(matches!(
            err(read(d, 8 << 20, "stack-1")),
            WsError::RamSize { .. }
        ));

        let corrupt = |text: &str| {
            fs::write(d.join(WS_INDEX_FILE), text).unwrap();
            let e = err(read(d, 4 << 20, "stack-1"));
            assert!(matches!(e, WsError::Corrupt { .. }), "{text}: {e}");
            e.to_string()
        };
        corrupt(&index[..index.len() / 2]);
        let msg = corrupt(&index.replacen("8192", "8193", 1));
        assert!(msg.contains("checksum"), "{msg}");
        let body: serde_json::Value =
            serde_json::from_str::<serde_json::Value>(&index).unwrap()["ws"].clone();
        let with_ranges = |ranges: serde_json::Value, pages: u64, data: u64| {
            let mut b = body.clone();
            b["ranges"] = ranges;
            b["pages"] = pages.into();
            b["data_bytes"] = data.into();
            seal(VERSION, &b)
        };
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x3ff000, "len": 0x2000}]),
            2,
            0x2000,
        ));
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x800, "len": 0x1000}]),
            1,
            0x1000,
        ));
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x1000, "len": 0x2000}, {"ram_offset": 0x2000, "len": 0x1000}]),
            3,
            0x3000,
        ));
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x1000, "len": 0x1000}]),
            2,
            0x1000,
        ));

        fs::write(d.join(WS_INDEX_FILE), seal(VERSION + 1, &body)).unwrap();
        assert!(matches!(
            err(read(d, 4 << 20, "stack-1")),
            WsError::Newer { .. }
        ));

        // A truncated `ws` under an intact index.
        fs::write(d.join(WS_INDEX_FILE), &index).unwrap();
        read(d, 4 << 20, "stack-1").unwrap();
        let ws = fs::OpenOptions::new()
            .write(true)
            .open(d.join(WS_FILE))
            .unwrap();
        ws.set_len(PAGE).unwrap();
        let e = err(read(d, 4 << 20, "stack-1"));
        assert!(e.to_string().contains("describes"), "{e}");
    }

    #[test]
    fn every_load_mechanism_gives_the_recorded_contents() {
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
        for how in [AnonLoad::Copy, AnonLoad::UffdCopy, AnonLoad::Prefetch] {
            let mem = memory::create(4096).unwrap();
            let ws = read(d, 4 << 30, "stack-1").unwrap();
            let handler = must_work(load_anonymous(&mem, ws, source.clone(), how));
            if how != AnonLoad::Prefetch {
                for &a in &touch {
                    assert_eq!(mapped(&mem, a), (true, false), "{how:?} {a:#x}");
                }
                assert_eq!(handler.stats().loaded, touch.len() as u64, "{how:?}");
                assert_eq!(mapped(&mem, 0x6000), (false, false), "{how:?}");
            }
            expect(&mem);
            let stats = handler.shutdown().unwrap();
            // `expect` touched six pages, two of them (0x1f000, 0x6000)
            // outside the set: the handler served those, and any page of
            // the set the racing prefetcher had not placed yet (shutting
            // down stops it where it is).
            let placed = stats.faults + stats.loaded;
            if how == AnonLoad::Prefetch {
                assert!((6..=touch.len() as u64 + 2).contains(&placed), "{stats:?}");
            } else {
                assert_eq!(stats.faults, 2, "{how:?} {stats:?}");
            }
        }

        // The file mapping, prefaulted.
        let file = File::open(d.join("memory")).unwrap();
        let ws = read(d, 4 << 30, "stack-1").unwrap();
        for how in [Populate::Read, Populate::Write] {
            let mem = memory::map_snapshot(&file, 4096).unwrap();
            populate(&mem, ws.ranges(), how).unwrap();
            for &a in &touch {
                // Read-populated pages are the file's own; write-populated
                // ones private copies.
                assert_eq!(
                    mapped(&mem, a),
                    (true, how == Populate::Read),
                    "{how:?} {a:#x}"
                );
            }
            // (A read fault also maps the cached pages around it.)
            if how == Populate::Write {
                assert_eq!(mapped(&mem, 0x6000), (false, false));
            }
            expect(&mem);
        }
    }
}
