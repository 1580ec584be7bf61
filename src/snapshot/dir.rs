//! Crash-safe snapshot directories.
//!
//! A snapshot is written into `<dir>.tmp-<pid>` beside its final place;
//! every file is fsynced, then the directory, then it is renamed to
//! `<dir>` and the parent directory is fsynced. A reader never sees a half
//! snapshot under `<dir>`: before the rename there is none (or the previous
//! one), after it the complete new one. An existing `<dir>` is swapped out
//! atomically (`renameat2(RENAME_EXCHANGE)`) and then removed.
//!
//! A writer killed half way leaves its `.tmp-<pid>` directory behind; the
//! next writer of the same snapshot removes such leftovers when their
//! process is gone. The state file is written last, so a leftover never
//! holds a state file without its complete memory file.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("--dump_dir {path}: {ancestor} is not a directory")]
    NoParent { path: PathBuf, ancestor: PathBuf },
    #[error("--dump_dir {0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot write the snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks, before any work, that a snapshot can be written at `target`:
/// it is a directory or absent, and its nearest existing ancestor is a
/// writable directory (missing parents are created when the snapshot is
/// written, as `--dump_dir S/diff/hello` in the SnapFaaS workflow needs).
pub fn check_target(target: &Path) -> Result<(), DirError> {
    if target.exists() && !target.is_dir() {
        return Err(DirError::NotADirectory(target.to_owned()));
    }
    let mut ancestor = parent_of(target);
    while !ancestor.exists() {
        ancestor = parent_of(&ancestor);
    }
    if !ancestor.is_dir() {
        return Err(DirError::NoParent {
            path: target.to_owned(),
            ancestor,
        });
    }
    nix::unistd::access(&ancestor, nix::unistd::AccessFlags::W_OK).map_err(|e| DirError::Io {
        path: ancestor.clone(),
        source: e.into(),
    })?;
    Ok(())
}

fn parent_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn tmp_name(target: &Path, pid: u32) -> PathBuf {
    let mut name: OsString = target.as_os_str().to_owned();
    name.push(format!(".tmp-{pid}"));
    PathBuf::from(name)
}

/// Removes `<target>.tmp-<pid>` directories whose writer is gone.
fn remove_stale(target: &Path) {
    let (Some(name), parent) = (target.file_name(), parent_of(target)) else {
        return;
    };
    let mut prefix = name.as_bytes().to_vec();
    prefix.extend_from_slice(b".tmp-");
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let Some(pid) = n.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let Some(pid) = std::str::from_utf8(pid)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            log::info!(
                "removing {} left by a snapshot writer that died",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn fsync_dir(path: &Path) -> Result<(), DirError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(path))
}

/// A snapshot directory being written.
pub struct SnapshotDir {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl SnapshotDir {
    /// Starts writing the snapshot that will appear at `target`.
    pub fn create(target: &Path) -> Result<Self, DirError> {
        check_target(target)?;
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        remove_stale(target);
        let tmp = tmp_name(target, std::process::id());
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(Self {
            target: target.to_owned(),
            tmp,
            committed: false,
        })
    }

    /// Where file `name` is being written.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Creates file `name`, sized `len` (a sparse file: all holes).
    pub fn create_sparse(&self, name: &str, len: u64) -> Result<File, DirError> {
        let path = self.path(name);
        let f = File::create(&path).map_err(io(&path))?;
        f.set_len(len).map_err(io(&path))?;
        Ok(f)
    }

    /// Writes file `name` with `bytes` and fsyncs it.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), DirError> {
        let path = self.path(name);
        let mut f = File::create(&path).map_err(io(&path))?;
        f.write_all(bytes).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))
    }

    /// Makes the snapshot visible at its final path, durably. Files must be
    /// fsynced already ([`SnapshotDir::write_file`] does; sync files from
    /// [`SnapshotDir::create_sparse`] yourself).
    pub fn commit(mut self) -> Result<PathBuf, DirError> {
        // Whether it failed before or after the rename, what is left at
        // the temporary name (nothing, or the replaced snapshot) goes.
        publish(&self.tmp, &self.target)?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

/// Moves the complete snapshot directory `dir` (fsynced files) to `target`
/// on the same file system, durably and atomically: an existing snapshot
/// there is swapped out (`renameat2(RENAME_EXCHANGE)`) and removed. How
/// [`SnapshotDir::commit`] makes a snapshot visible, and how the jailer
/// moves one a jailed VM wrote into its staging directory.
pub fn publish(dir: &Path, target: &Path) -> Result<(), DirError> {
    fsync_dir(dir)?;
    if target.exists() {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            dir,
            nix::fcntl::AT_FDCWD,
            target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| DirError::Io {
            path: target.to_owned(),
            source: e.into(),
        })?;
        // The old snapshot now sits at `dir`.
        if let Err(e) = std::fs::remove_dir_all(dir) {
            log::warn!("cannot remove the replaced snapshot {}: {e}", dir.display());
        }
    } else {
        std::fs::rename(dir, target).map_err(io(target))?;
    }
    fsync_dir(&parent_of(target))
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_creates_or_replaces_and_failure_leaves_nothing() {
        let base = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let target = base.as_path().join("snap");
        let d = SnapshotDir::create(&target).unwrap();
        d.write_file("a", b"one").unwrap();
        assert!(!target.exists());
        d.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"one");

        // Replacing swaps the whole directory.
        let d = SnapshotDir::create(&target).unwrap();
        d.write_file("b", b"two").unwrap();
        d.commit().unwrap();
        assert!(!target.join("a").exists());
        assert_eq!(std::fs::read(target.join("b")).unwrap(), b"two");

        // Dropped without commit: gone, the old one untouched.
        let d = SnapshotDir::create(&target).unwrap();
        d.write_file("c", b"three").unwrap();
        drop(d);
        let names: Vec<_> = std::fs::read_dir(base.as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("snap")]);

        // A dead writer's leftovers are removed by the next writer.
        let stale = tmp_name(&target, 999_999_999);
        std::fs::create_dir(&stale).unwrap();
        let d = SnapshotDir::create(&target).unwrap();
        assert!(!stale.exists());
        drop(d);

        // Missing parents are fine, and made when the snapshot is written.
        let deep = base.as_path().join("no/such/dir");
        check_target(&deep).unwrap();
        SnapshotDir::create(&deep).unwrap().commit().unwrap();
        assert!(deep.is_dir());
        std::fs::write(base.as_path().join("file"), b"").unwrap();
        assert!(check_target(&base.as_path().join("file")).is_err());
        assert!(check_target(&base.as_path().join("file/below")).is_err());
    }
}
