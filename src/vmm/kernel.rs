//! Kernel image loading (ELF vmlinux or bzImage) and the command line.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use super::memory::GuestMemoryMmap;

/// Offset of the 64-bit entry point (`startup_64`) in a bzImage's
/// protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "kernel {path} is neither an ELF vmlinux nor a bzImage (ELF: {elf}; bzImage: {bzimage})"
    )]
    UnknownFormat {
        path: String,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("kernel {path} could not be loaded: truncated, or too large for the guest memory ({source})")]
    TooLarge {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error(
        "kernel command line is {len} bytes; the boot protocol allows at most {max} (plus the NUL)"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line has a character outside printable ASCII: {0:?}")]
    CmdlineChar(char),
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the command line into guest memory: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
}

/// Where the loaded kernel starts executing.
pub struct LoadedKernel {
    pub entry: u64,
    pub setup_header: Option<setup_header>,
}

fn is_too_large(e: &linux_loader::loader::Error) -> bool {
    use linux_loader::loader::{bzimage, elf, Error};
    matches!(
        e,
        Error::MemoryOverflow
            | Error::Elf(elf::Error::ReadKernelImage)
            | Error::Bzimage(bzimage::Error::ReadBzImageCompressedKernel)
    )
}

/// Loads `path` as an ELF vmlinux, or failing that as a bzImage, at 1 MiB.
pub fn load(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, KernelError> {
    let shown = path.display().to_string();
    let open = || {
        File::open(path).map_err(|source| KernelError::Open {
            path: shown.clone(),
            source,
        })
    };
    let elf = match Elf::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                setup_header: None,
            })
        }
        Err(e) => e,
    };
    let bzimage = match BzImage::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                setup_header: r.setup_header,
            })
        }
        Err(e) => e,
    };
    let looks_elf = matches!(
        elf,
        linux_loader::loader::Error::Elf(ref x) if !matches!(x, linux_loader::loader::elf::Error::InvalidElfMagicNumber)
    );
    if looks_elf && is_too_large(&elf) {
        return Err(KernelError::TooLarge {
            path: shown,
            source: elf,
        });
    }
    if !looks_elf && is_too_large(&bzimage) {
        return Err(KernelError::TooLarge {
            path: shown,
            source: bzimage,
        });
    }
    Err(KernelError::UnknownFormat {
        path: shown,
        elf,
        bzimage,
    })
}

/// Builds the guest command line: the user's arguments with `extra`
/// (device announcements) appended to the kernel's part (before any `--`),
/// checked against the boot protocol's limit.
pub fn cmdline(args: &str, extra: &[String]) -> Result<Cmdline, KernelError> {
    if let Some(bad) = args.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(KernelError::CmdlineChar(bad));
    }
    let max = CMDLINE_MAX_SIZE - 1;
    let len = args.trim().len() + extra.iter().map(|e| e.len() + 1).sum::<usize>();
    if len > max {
        return Err(KernelError::CmdlineTooLong { len, max });
    }
    let mut cmdline = Cmdline::try_from(args, CMDLINE_MAX_SIZE).map_err(KernelError::Cmdline)?;
    for e in extra {
        cmdline.insert_str(e).map_err(KernelError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line at its fixed address; returns (address, size
/// including the NUL).
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
) -> Result<(u64, usize), KernelError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(KernelError::CmdlineWrite)?;
    let len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .map_err(KernelError::Cmdline)?;
    Ok((CMDLINE_START, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_appends_devices_and_enforces_the_limit() {
        let c = cmdline(
            "console=ttyS0  ",
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        let c = cmdline("a -- init", &["dev=1".into()]).unwrap();
        assert_eq!(c.as_cstring().unwrap().to_str().unwrap(), "a dev=1 -- init");
        assert!(matches!(
            cmdline("a\tb", &[]),
            Err(KernelError::CmdlineChar('\t'))
        ));
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            cmdline(&long, &[]),
            Err(KernelError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let mem = crate::vmm::memory::create(16).unwrap();
        let dir = std::env::temp_dir().join(format!("snapvm-kernel-test-{}", std::process::id()));
        std::fs::write(&dir, b"this is not a kernel").unwrap();
        let r = load(&mem, &dir);
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(r, Err(KernelError::UnknownFormat { .. })));
        assert!(matches!(
            load(&mem, Path::new("/nonexistent/vmlinux")),
            Err(KernelError::Open { .. })
        ));
    }
}
