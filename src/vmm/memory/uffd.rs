//! A userfaultfd: the kernel's handle for serving a mapping's missing-page
//! faults from user space, the part the working-set fault handler uses
//! (open, register anonymous memory, place pages, wake waiters).

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
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
}

/// The userfaultfd uAPI (`<linux/userfaultfd.h>`), the part used here.
/// Written out because the `userfaultfd` crate generates its bindings with
/// bindgen at build time, which needs libclang on every build machine.
pub(crate) mod sys {
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
pub struct Uffd(OwnedFd);

impl Uffd {
    /// Opens a userfaultfd for kernel-mode faults as well as user-mode ones:
    /// KVM faults guest pages in with get_user_pages and the VMM's device
    /// threads with copy_to_user, and both must reach the handler.
    pub fn open() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes one flags argument and returns a new
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as RawFd
        } else {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EPERM) {
                return Err(UffdError::Unavailable(err));
            }
            // Unprivileged callers may still get one from /dev/userfaultfd
            // (Linux 6.1+) if they may open it.
            Self::open_device(flags).map_err(|_| UffdError::Unavailable(err))?
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
            return Err(UffdError::Uffd {
                op: "API handshake",
                source: io::Error::last_os_error(),
            });
        }
        if api.ioctls & (1 << sys::BIT_REGISTER) == 0 {
            return Err(UffdError::Unsupported("register memory"));
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
    pub fn register(&self, host: usize, len: usize) -> Result<(), UffdError> {
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
            return Err(UffdError::Register(io::Error::last_os_error()));
        }
        for (bit, what) in [
            (sys::BIT_COPY, "copy pages"),
            (sys::BIT_ZEROPAGE, "map zero pages"),
            (sys::BIT_WAKE, "wake faulting threads"),
        ] {
            if reg.ioctls & (1 << bit) == 0 {
                return Err(UffdError::Unsupported(what));
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
    pub fn place(&self, dst: usize, len: usize, src: Option<&[u8]>) -> io::Result<u64> {
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
    pub fn wake(&self, host: usize) -> io::Result<()> {
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

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(sys::UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(sys::UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(sys::UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(sys::UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(sys::UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(sys::USERFAULTFD_IOC_NEW(), 0xaa00);
    }
}
