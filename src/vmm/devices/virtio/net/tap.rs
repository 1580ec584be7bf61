//! The host end of a virtio-net device: a TAP interface opened through
//! `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte
//! virtio-net header (`TUNSETVNETHDRSZ`, the virtio 1.x header size), non
//! blocking, so a full or idle TAP never holds the event loop.
//!
//! No offloads are enabled (`TUNSETOFFLOAD` is never called): the kernel
//! then hands us frames with complete checksums and accepts only plain
//! frames from us.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the virtio-net header (virtio 1.x, 5.1.6: `virtio_net_hdr`
/// with `num_buffers`), on the TAP and in guest buffers alike.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "TAP name {0:?} is invalid: it must be 1 to {max} bytes, without '/', NUL, spaces or ':'",
        max = libc::IFNAMSIZ - 1
    )]
    Name(String),
    #[error("cannot open /dev/net/tun (is the tun module loaded?): {0}")]
    OpenTun(std::io::Error),
    #[error(
        "cannot attach to TAP {name}: {source} (it must be a TAP created with \
         `ip tuntap add {name} mode tap vnet_hdr` that this user may open, and not in use)"
    )]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("--tap_fd {fd}: {what}")]
    BadFd { fd: RawFd, what: String },
    #[error("cannot set the virtio-net header size of TAP {name}: {source}")]
    VnetHdr {
        name: String,
        source: std::io::Error,
    },
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks an interface name as the kernel's `dev_valid_name` does.
fn check_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(TapError::Name(name.to_owned()));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

impl Tap {
    /// Attaches to the TAP interface `name` (created if absent and the
    /// caller may; an existing one must have been made with `vnet_hdr`,
    /// or one that was not is reconfigured by the kernel when allowed).
    pub fn open(name: &str) -> Result<Self, TapError> {
        let ifr_name = check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // SAFETY: an all-zero `ifreq` is a valid value (a C struct of
        // integers and byte arrays).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name;
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `ifr` is,
        // and lives across the call; `file` is an open /dev/net/tun fd.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Self::with_vnet_hdr(file, name.to_owned())
    }

    /// Takes over the inherited descriptor `fd`, which must be attached to
    /// a TAP with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (a controller opened
    /// it, in a network namespace of the VM's own). It is made non
    /// blocking and close-on-exec.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        let bad = |what: String| TapError::BadFd { fd, what };
        // SAFETY: F_GETFD only reads the flags of `fd`, if open.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad("not an open descriptor".into()));
        }
        // SAFETY: `fd` is open (checked above) and was handed to this
        // process for the network card alone: nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: an all-zero `ifreq` is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one `ifreq`, which `ifr` is; on
        // anything but a TAP/TUN descriptor it fails and writes nothing.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(bad(format!("not an attached TAP descriptor ({e})")));
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & want != want {
            return Err(bad(format!(
                "the TAP was opened with flags {flags:#x}, not IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
            )));
        }
        let name: String = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        for (cmd, arg) in [
            (libc::F_SETFL, libc::O_RDWR | libc::O_NONBLOCK),
            (libc::F_SETFD, libc::FD_CLOEXEC),
        ] {
            // SAFETY: F_SETFL and F_SETFD only change the flags of `fd`.
            if unsafe { libc::fcntl(fd, cmd, arg) } < 0 {
                let e = std::io::Error::last_os_error();
                return Err(bad(format!("cannot set its flags: {e}")));
            }
        }
        Self::with_vnet_hdr(file, name)
    }

    /// Sets the 12-byte header size on `file`, attached to TAP `name`.
    fn with_vnet_hdr(file: File, name: String) -> Result<Self, TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, which `size` is; `file`
        // is attached to a TAP.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(TapError::VnetHdr {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (virtio-net header first) into `buf`; a frame
    /// longer than `buf` is truncated by the kernel. `WouldBlock` when
    /// none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (virtio-net header first). `WouldBlock` when the
    /// interface's queue is full.
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}
