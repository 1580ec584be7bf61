//! The rootfs identity a snapshot records, and its check at restore.
//!
//! A snapshot holds the guest's page cache and file-system state of its
//! rootfs, so restoring it over another image would corrupt the guest. The
//! identity is the size, the modification time, an XXH64 of sampled blocks
//! and an XXH64 of the whole content (computed when the snapshot is made).
//!
//! At restore the size and the sampled hash (65 blocks of 4 KiB, well under
//! a millisecond) are always checked. The full content hash — ~20 ms for a
//! 64 MiB image from the page cache, longer from disk, which would dominate
//! a restore — is checked only when the file is not provably the same one:
//! another inode or device (a copy) or another modification time (a
//! rewrite). The same file, unmodified, that still matches in size and in
//! every sampled block is taken as the same image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use super::format::DiskIdentity;
use super::hash::{xxh64_reader, Xxh64};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot read the rootfs {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start the rootfs hashing thread: {0}")]
    Thread(std::io::Error),
    #[error("rootfs hashing thread: {0}")]
    Confine(String),
    #[error(
        "--rootfs {path} is not the image the snapshot was taken with ({what}); restore with \
         the snapshot's rootfs ({recorded})"
    )]
    Mismatch {
        path: String,
        what: String,
        recorded: String,
    },
}

/// Blocks sampled for the quick hash, spread evenly, plus the last one.
const SAMPLES: u64 = 64;
const SAMPLE_BLOCK: usize = 4096;

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// (device, inode) of the file.
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// XXH64 over the sampled blocks (and their offsets).
fn sample_hash(file: &File, size: u64) -> std::io::Result<u64> {
    let mut h = Xxh64::new();
    let mut block = vec![0u8; SAMPLE_BLOCK];
    let blocks = size.div_ceil(SAMPLE_BLOCK as u64);
    let mut offsets: Vec<u64> = (0..SAMPLES)
        .map(|i| i * blocks / SAMPLES * SAMPLE_BLOCK as u64)
        .collect();
    offsets.push(blocks.saturating_sub(1) * SAMPLE_BLOCK as u64);
    offsets.dedup();
    for off in offsets {
        if off >= size {
            continue;
        }
        let n = (size - off).min(SAMPLE_BLOCK as u64) as usize;
        file.read_exact_at(&mut block[..n], off)?;
        h.update(&off.to_le_bytes());
        h.update(&block[..n]);
    }
    Ok(h.finish())
}

/// The identity of the image at `path` (reads all of it).
pub fn identify(path: &Path) -> Result<DiskIdentity, DiskError> {
    let (file, meta) = open(path)?;
    identify_open(path, &file, &meta)
}

/// The image at `path`, opened, and its metadata.
fn open(path: &Path) -> Result<(File, std::fs::Metadata), DiskError> {
    let err = |source| DiskError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    Ok((file, meta))
}

/// [`identify`] of the image at `path`, already open as `file`.
fn identify_open(
    path: &Path,
    file: &File,
    meta: &std::fs::Metadata,
) -> Result<DiskIdentity, DiskError> {
    let err = |source| DiskError::Read {
        path: path.display().to_string(),
        source,
    };
    let size = meta.len();
    let sample = sample_hash(file, size).map_err(err)?;
    let t = Instant::now();
    let content = xxh64_reader(file).map_err(err)?;
    log::debug!(
        "rootfs {} ({size} bytes) hashed in {} us",
        path.display(),
        t.elapsed().as_micros()
    );
    Ok(DiskIdentity {
        path: path.to_owned(),
        size,
        mtime_ns: mtime_ns(meta),
        file_id: file_id(meta),
        sample_hash: format!("{sample:016x}"),
        content_hash: format!("{content:016x}"),
    })
}

/// An identity computed in the background (while the guest boots towards
/// its snapshot point), so hashing the rootfs is not part of the snapshot's
/// create time; or, for a restored VM, the one its restore verified.
pub struct IdentityJob {
    path: std::path::PathBuf,
    pending: std::sync::Mutex<Option<Pending>>,
}

enum Pending {
    Hashing(std::thread::JoinHandle<Result<DiskIdentity, DiskError>>),
    Known(DiskIdentity),
}

impl IdentityJob {
    /// Opens `path` and starts hashing it on its own thread, which first
    /// calls `confine` (the thread's seccomp filter: it only reads the
    /// open file from then on).
    pub fn start<E: std::fmt::Display>(
        path: &Path,
        confine: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) -> Result<Self, DiskError> {
        let (file, meta) = open(path)?;
        let p = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("rootfs-hash".into())
            .spawn(move || {
                confine().map_err(|e| DiskError::Confine(e.to_string()))?;
                identify_open(&p, &file, &meta)
            })
            .map_err(DiskError::Thread)?;
        Ok(Self {
            path: path.to_owned(),
            pending: std::sync::Mutex::new(Some(Pending::Hashing(thread))),
        })
    }

    /// An identity already established (by [`verify`] at restore).
    pub fn known(id: DiskIdentity) -> Self {
        Self {
            path: id.path.clone(),
            pending: std::sync::Mutex::new(Some(Pending::Known(id))),
        }
    }

    /// The identity, once: waits for the hash, and hashes again if the
    /// file changed (size, mtime, inode) since it was taken.
    pub fn finish(&self) -> Result<DiskIdentity, DiskError> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let id = match pending {
            Some(Pending::Known(id)) => id,
            Some(Pending::Hashing(h)) => match h.join() {
                Ok(result) => result?,
                // The thread died: hash here.
                Err(_) => return identify(&self.path),
            },
            // Already taken: hash here.
            None => return identify(&self.path),
        };
        let meta = std::fs::metadata(&self.path).map_err(|source| DiskError::Read {
            path: self.path.display().to_string(),
            source,
        })?;
        if meta.len() == id.size && mtime_ns(&meta) == id.mtime_ns && file_id(&meta) == id.file_id {
            Ok(id)
        } else {
            identify(&self.path)
        }
    }
}

/// Checks that the image at `path` is the one `id` describes; returns its
/// identity as it is now (this path and file, the same content).
pub fn verify(path: &Path, id: &DiskIdentity) -> Result<DiskIdentity, DiskError> {
    let err = |source| DiskError::Read {
        path: path.display().to_string(),
        source,
    };
    let mismatch = |what: String| DiskError::Mismatch {
        path: path.display().to_string(),
        what,
        recorded: format!(
            "{}, {} bytes, content hash {}",
            id.path.display(),
            id.size,
            id.content_hash
        ),
    };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if meta.len() != id.size {
        return Err(mismatch(format!(
            "{} bytes, the snapshot's rootfs had {}",
            meta.len(),
            id.size
        )));
    }
    if format!("{:016x}", sample_hash(&file, id.size).map_err(err)?) != id.sample_hash {
        return Err(mismatch("its content differs".into()));
    }
    let now = DiskIdentity {
        path: path.to_owned(),
        mtime_ns: mtime_ns(&meta),
        file_id: file_id(&meta),
        ..id.clone()
    };
    if now.mtime_ns == id.mtime_ns && now.file_id == id.file_id {
        return Ok(now);
    }
    let t = Instant::now();
    let content = format!("{:016x}", xxh64_reader(&file).map_err(err)?);
    log::info!(
        "rootfs {} was modified or copied since the snapshot: checked its content hash in {} us",
        path.display(),
        t.elapsed().as_micros()
    );
    if content != id.content_hash {
        return Err(mismatch("its content differs".into()));
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_catches_size_content_and_copies() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let a = dir.as_path().join("a.img");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&a, &data).unwrap();
        let id = identify(&a).unwrap();
        verify(&a, &id).unwrap();

        // A copy (new mtime) passes on its content hash.
        let b = dir.as_path().join("b.img");
        std::fs::write(&b, &data).unwrap();
        verify(&b, &id).unwrap();

        // One byte changed between the samples: caught by the full hash.
        let mut changed = data.clone();
        changed[12345] ^= 1;
        std::fs::write(&b, &changed).unwrap();
        let e = verify(&b, &id).unwrap_err();
        assert!(e.to_string().contains("content differs"), "{e}");

        // Another size.
        std::fs::write(&b, &data[..4096]).unwrap();
        let e = verify(&b, &id).unwrap_err();
        assert!(e.to_string().contains("4096 bytes"), "{e}");

        // The background job gives the same identity, and notices a change.
        let job = IdentityJob::start(&a, || Ok::<(), String>(())).unwrap();
        assert_eq!(job.finish().unwrap(), id);
        let job = IdentityJob::start(&b, || Ok::<(), String>(())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&b, &data).unwrap();
        assert_eq!(job.finish().unwrap().content_hash, id.content_hash);

        // A tiny image works too.
        std::fs::write(&b, b"x").unwrap();
        let tiny = identify(&b).unwrap();
        verify(&b, &tiny).unwrap();
    }
}
