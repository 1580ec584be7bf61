//! The jail every firerunner that singlevm and multivm start runs in (on by
//! default as root; `--no_jail` turns it off): its own uid and gid, new
//! mount, pid, ipc and uts namespaces, a root holding only what the VM
//! needs, rlimits and a cgroup. See the README's Security section.
//!
//! The controller side is here: a [`Slot`] (a uid from the configured range,
//! held with a lock file for the VM's life; the uid also names the jail
//! directory and the cgroup), the command line of the `jailer` binary, and
//! [`finish`], what is done when a jailed firerunner has ended. The jailer
//! itself (jailer.rs) sets the jail up and starts firerunner in it.
//!
//! Controllers run the jailer with `--detach`: firerunner becomes the
//! controller's own child and the jailer exits at once, so that no process
//! of the jailer's stays beside each VM (its memory would be counted per
//! VM). The controller then waits for firerunner ([`detached_pid`]) and
//! calls [`finish`] itself.
//!
//! Layout: `<base>/slots/<uid>.lock` (the locks), `<base>/<uid>/root` (the
//! mount point of the jail's root, empty outside the jail's mount
//! namespace), `<base>/<uid>/staging` (the writable directories made for
//! the VM's output, one path a line, so that a leftover is found),
//! `<base>/<uid>/output` (where that output goes when the VM has written
//! it: an [`Output`] in JSON), `<base>/<uid>/pid` (a detached
//! firerunner's pid) and, for a shell, `<base>/<uid>/inbox`; the cgroup is
//! `snapvm/<uid>`.
//!
//! A shell (`firerunner shell`) learns which snapshot it runs only when it
//! is told to restore, long after its jail was made. Its inbox is a
//! shared mount on the host whose copy in the jail (`/inbox`) is a slave:
//! [`stage_restore`] bind-mounts the layers and disks under it on the host
//! (read-only), they appear in the jail at once, and nothing the jail
//! mounts ever reaches the host. [`remove`] unmounts the inbox before it
//! removes anything, so that no file is removed through a bind mount.

pub mod cgroup;
pub mod jailer;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::control::RestoreRequest;
use crate::snapshot::{dir, ws};
use cgroup::Cgroup;

/// First uid (and gid) of the VMs' range when none is configured.
pub const DEFAULT_UID_BASE: u32 = 900_000;
/// How many VMs can be jailed at once by default: more than one host runs
/// (4096 stopped the density benchmark at 4096 idle VMs, memory and pids
/// to spare).
pub const DEFAULT_UID_COUNT: u32 = 65_536;
/// Where jail directories are made by default.
pub const DEFAULT_JAIL_DIR: &str = "/run/snapvm/jail";
/// The file listing a jail's staging directories.
const STAGING_LIST: &str = "staging";
/// The file recording where the VM's output goes ([`Output`]).
const OUTPUT_RECORD: &str = "output";
/// The file holding a detached firerunner's pid.
const PID_FILE: &str = "pid";
/// A shell's inbox: where its controller mounts what it restores.
const INBOX: &str = "inbox";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot create the jail directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("all {0} jail uids are in use (raise --jail_uid_count)")]
    Exhausted(u32),
    #[error("cannot list the libraries of {path}: {reason}")]
    Libraries { path: PathBuf, reason: String },
    #[error("cannot hand {path} to the VM's uid: {source}")]
    Chown { path: PathBuf, source: nix::Error },
    #[error("the jail's record {path} is unreadable: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error("cannot hand over the VM's snapshot: {0}")]
    Snapshot(#[from] dir::DirError),
    #[error("cannot hand over the VM's working set: {0}")]
    WorkingSet(#[from] ws::WsError),
    #[error(
        "{path} is not readable by the VM's uid {uid} (mode {mode:o}, owner {owner}): a jailed VM \
         opens its files as that uid; make it readable by others (chmod o+r{x}) or run without \
         the jail (--no_jail; multivm: `jail: false`)",
        x = if *dir { "x" } else { "" }
    )]
    Unreadable {
        path: PathBuf,
        uid: u32,
        mode: u32,
        owner: u32,
        dir: bool,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot show {path} to the jailed shell: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error(
        "a jailed shell cannot record a working set (its layers are read-only in its jail): \
         record it with a VM of its own"
    )]
    ShellDumpWs,
}

/// What a jailed VM writes outside its jail (in a staging directory next
/// to where it belongs) and where it goes once written.
#[derive(Debug, Serialize, Deserialize)]
pub enum Output {
    /// `--dump_dir`: the snapshot `staging/<name>` becomes `target`.
    Snapshot { staging: PathBuf, target: PathBuf },
    /// `--dump_ws`: the working set in `staging` goes into `dir`.
    WorkingSet { staging: PathBuf, dir: PathBuf },
}

impl Output {
    /// Records `self` in the jail at `jail_dir` for [`finish`].
    pub fn record(&self, jail_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string(self).map_err(std::io::Error::other)?;
        fs::write(jail_dir.join(OUTPUT_RECORD), text)
    }

    /// Hands the output over if the VM finished writing it: a snapshot
    /// only after a clean exit, a working set whenever its index exists.
    fn deliver(&self, status: ExitStatus) -> Result<(), JailError> {
        match self {
            Output::Snapshot { staging, target } if status.code() == Some(0) => {
                let written = staging.join(target.file_name().unwrap_or_default());
                if written.is_dir() {
                    dir::publish(&written, target)?;
                }
            }
            Output::WorkingSet { staging, dir } if staging.join(ws::WS_INDEX_FILE).exists() => {
                ws::publish(staging, dir)?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn record_error(path: &Path, reason: impl ToString) -> JailError {
    JailError::Record {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// After the jailed firerunner of the jail at `jail_dir` ended with
/// `status`: reports a kill by the cgroup's memory limit, hands over the
/// VM's output ([`Output`]) and removes the jail. The jail is removed
/// also when the hand-over fails; its error is returned.
pub fn finish(jail_dir: &Path, status: ExitStatus) -> Result<(), JailError> {
    let name = jail_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if status.signal() == Some(libc::SIGKILL) {
        if let Ok(cg) = Cgroup::named(name) {
            if cg.oom_kills() > 0 {
                log::error!(
                    "firerunner was killed by its cgroup's memory limit ({} MiB)",
                    cg.limits().map_or(0, |l| l.memory_bytes >> 20)
                );
            }
        }
    }
    let path = jail_dir.join(OUTPUT_RECORD);
    let delivered = match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<Output>(&text)
            .map_err(|e| record_error(&path, e))
            .and_then(|o| o.deliver(status)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(record_error(&path, e)),
    };
    remove(jail_dir);
    delivered
}

/// Fails unless `uid` (whose gid is the same number) may read `path` and,
/// for a directory (a snapshot layer), list it and read every file in it:
/// inside the jail the VM opens them as that uid, and a refusal there
/// would only name the in-jail path. Judged by the mode bits (ACLs are not
/// consulted).
pub fn check_readable(path: &Path, uid: u32) -> Result<(), JailError> {
    let check = |path: &Path, meta: &fs::Metadata| {
        let dir = meta.is_dir();
        let need = if dir { 0o5 } else { 0o4 };
        let shift = if meta.uid() == uid {
            6
        } else if meta.gid() == uid {
            3
        } else {
            0
        };
        if (meta.mode() >> shift) & need == need {
            return Ok(());
        }
        Err(JailError::Unreadable {
            path: path.to_owned(),
            uid,
            mode: meta.mode() & 0o7777,
            owner: meta.uid(),
            dir,
        })
    };
    let meta = fs::metadata(path).map_err(io("cannot bind", path))?;
    check(path, &meta)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io("cannot list", path))? {
            let entry = entry.map_err(io("cannot list", path))?;
            let meta = entry.metadata().map_err(io("cannot stat", &entry.path()))?;
            if meta.is_file() {
                check(&entry.path(), &meta)?;
            }
        }
    }
    Ok(())
}

/// Makes `r`'s files (rootfs, appfs, layers) visible to the shell jailed
/// at `jail_dir` as uid `uid`, read-only under its `/inbox`, and returns
/// `r` with their in-jail paths. Refuses what that uid cannot read, and a
/// working set to record (it would be written into a layer, read-only in
/// the jail).
pub fn stage_restore(
    jail_dir: &Path,
    uid: u32,
    r: &RestoreRequest,
) -> Result<RestoreRequest, JailError> {
    if r.dump_ws.is_some() {
        return Err(JailError::ShellDumpWs);
    }
    // A directory of its own for each restore asked (a refused one may be
    // followed by another).
    let inbox = jail_dir.join(INBOX);
    let n = fs::read_dir(&inbox)
        .map_err(io("cannot list the shell's inbox", &inbox))?
        .count();
    let sub = n.to_string();
    let dir = inbox.join(&sub);
    fs::create_dir(&dir).map_err(io("cannot create", &dir))?;
    let stage = |host: &Path, name: &str| -> Result<PathBuf, JailError> {
        check_readable(host, uid)?;
        let at = dir.join(name);
        if host.is_dir() {
            fs::create_dir(&at).map_err(io("cannot create", &at))?;
        } else {
            File::create_new(&at).map_err(io("cannot create", &at))?;
        }
        let fail = |source| JailError::Mount {
            path: host.to_owned(),
            source,
        };
        use nix::mount::{mount, MsFlags};
        mount(
            Some(host),
            &at,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(fail)?;
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        mount(None::<&str>, &at, None::<&str>, flags, None::<&str>).map_err(fail)?;
        Ok(Path::new("/").join(INBOX).join(&sub).join(name))
    };
    let mut staged = r.clone();
    staged.rootfs = stage(&r.rootfs, "rootfs")?;
    if let Some(a) = &r.appfs {
        staged.appfs = Some(stage(a, "appfs")?);
    }
    staged.layers = r
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| stage(l, &format!("layer-{i}")))
        .collect::<Result<_, _>>()?;
    Ok(staged)
}

/// Records `pid` as the detached firerunner of the jail at `jail_dir`.
pub fn record_pid(jail_dir: &Path, pid: Pid) -> std::io::Result<()> {
    fs::write(jail_dir.join(PID_FILE), pid.to_string())
}

/// The pid of the firerunner a `jailer --detach` started for the jail at
/// `jail_dir`: a child of the caller (read after the jailer exited 0).
pub fn detached_pid(jail_dir: &Path) -> Result<Pid, JailError> {
    let path = jail_dir.join(PID_FILE);
    let text = fs::read_to_string(&path).map_err(|e| record_error(&path, e))?;
    let pid = text.trim().parse().map_err(|e| record_error(&path, e))?;
    Ok(Pid::from_raw(pid))
}

/// How controllers jail their VMs.
#[derive(Clone, Debug)]
pub struct JailOptions {
    /// The jailer binary.
    pub jailer: PathBuf,
    /// Where jail directories are made.
    pub base: PathBuf,
    pub uid_base: u32,
    pub uid_count: u32,
    /// MiB allowed on top of guest memory in the VM's cgroup: VMM
    /// overhead plus KVM's kernel memory (what multivm's budget counts).
    pub vm_overhead_mib: u64,
}

/// A jail slot: uid and gid `uid_base + n`, the jail directory
/// `<base>/<uid>` and the cgroup `snapvm/<uid>`, held until dropped. Taking
/// one removes what a previous holder left (a killed jailer); dropping
/// one removes the jail's directory and cgroup, killing what still runs
/// there.
#[derive(Debug)]
pub struct Slot {
    uid: u32,
    base: PathBuf,
    _lock: Flock<File>,
}

impl Slot {
    /// Takes a free slot of `opts`' range.
    pub fn acquire(opts: &JailOptions) -> Result<Self, JailError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let locks = opts.base.join("slots");
        fs::create_dir_all(&locks).map_err(|source| JailError::Dir {
            path: locks.clone(),
            source,
        })?;
        // Start where this process left off, spread by pid, so that
        // controllers rarely probe slots another one holds.
        let start = NEXT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(std::process::id().wrapping_mul(7919));
        for i in 0..opts.uid_count {
            let uid = opts
                .uid_base
                .saturating_add(start.wrapping_add(i) % opts.uid_count);
            if let Some(slot) = Self::try_take(opts, uid)? {
                return Ok(slot);
            }
        }
        Err(JailError::Exhausted(opts.uid_count))
    }

    /// Takes slot `uid` if no one holds it, removing what a previous
    /// holder left (a killed controller's jail and network namespace).
    fn try_take(opts: &JailOptions, uid: u32) -> Result<Option<Self>, JailError> {
        let path = opts.base.join("slots").join(format!("{uid}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| JailError::Dir {
                path: path.clone(),
                source,
            })?;
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            return Ok(None);
        };
        let slot = Slot {
            uid,
            base: opts.base.clone(),
            _lock: lock,
        };
        // A leftover keeps its directory (the jailer removes it last), so
        // checking for it is cheap.
        if slot.dir().exists() {
            slot.remove_jail();
        }
        crate::network::remove(uid);
        Ok(Some(slot))
    }

    /// Removes the network namespaces of `opts`' slots that no one holds:
    /// what controllers killed with their VMs left (a controller calls it
    /// at start; each slot's leftovers also go when it is next taken).
    pub fn sweep_networks(opts: &JailOptions) {
        let range = opts.uid_base..opts.uid_base.saturating_add(opts.uid_count);
        for uid in crate::network::named(range) {
            let _ = fs::create_dir_all(opts.base.join("slots"));
            if let Err(e) = Self::try_take(opts, uid) {
                log::warn!("cannot check slot {uid} for a leftover network: {e}");
            }
        }
    }

    /// The VM's uid, also its gid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The jail directory.
    pub fn dir(&self) -> PathBuf {
        self.base.join(self.uid.to_string())
    }

    /// Gives the VM's uid `path` (a directory or socket of the controller's
    /// own runtime directory that the VM must write or connect to).
    pub fn hand_over(&self, path: &Path) -> Result<(), JailError> {
        let id = Some(nix::unistd::Uid::from_raw(self.uid));
        let gid = Some(nix::unistd::Gid::from_raw(self.uid));
        nix::unistd::chown(path, id, gid).map_err(|source| JailError::Chown {
            path: path.to_owned(),
            source,
        })
    }

    /// Removes the jail's cgroup (killing what runs in it), its staging
    /// directories and its directory.
    fn remove_jail(&self) {
        remove(&self.dir());
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.remove_jail();
    }
}

/// Removes the jail at `dir`: its cgroup (after killing what runs there),
/// the staging directories it lists and the directory, in that order.
/// What is not there is skipped. A shell's inbox is unmounted (with all
/// that was mounted under it) first; if that fails, the directory stays.
pub fn remove(dir: &Path) {
    let inbox = dir.join(INBOX);
    match nix::mount::umount2(&inbox, nix::mount::MntFlags::MNT_DETACH) {
        // Not a mount point, or no inbox at all.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            log::error!(
                "cannot unmount {}: {e}; the jail {} is left in place",
                inbox.display(),
                dir.display()
            );
            return;
        }
    }
    if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
        match Cgroup::named(name) {
            Ok(cg) => cg.remove(),
            Err(e) => log::warn!("cannot remove the jail's cgroup: {e}"),
        }
    }
    let staging = fs::read_to_string(dir.join(STAGING_LIST)).unwrap_or_default();
    for s in staging.lines().filter(|l| !l.is_empty()) {
        remove_tree(Path::new(s));
    }
    remove_tree(dir);
}

/// Removes the directory tree at `path`; missing is fine.
fn remove_tree(path: &Path) {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            log::warn!("cannot remove {}: {e}", path.display())
        }
        _ => {}
    }
}

/// The shared libraries `binary` loads, as its dynamic loader resolves
/// them, and the loader itself: what must be in a jail to exec it. None
/// for a static binary. The loader runs as a process of its own (a few
/// ms), so its answer is kept in `cache_dir`, named after the binary's
/// device, inode, size and modification time.
pub fn libraries(binary: &Path, cache_dir: &Path) -> Result<Vec<PathBuf>, JailError> {
    let fail = |reason: String| JailError::Libraries {
        path: binary.to_owned(),
        reason,
    };
    let m = fs::metadata(binary).map_err(|e| fail(e.to_string()))?;
    let cache = cache_dir.join(format!(
        "libraries-{}-{}-{}-{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ));
    if let Ok(text) = fs::read_to_string(&cache) {
        return Ok(text.lines().map(PathBuf::from).collect());
    }
    let libs = ask_loader(binary)?;
    let text: String = libs.iter().map(|l| format!("{}\n", l.display())).collect();
    let tmp = cache.with_extension(format!("tmp-{}", std::process::id()));
    // A cache that cannot be written is only slower.
    if fs::write(&tmp, text)
        .and_then(|()| fs::rename(&tmp, &cache))
        .is_err()
    {
        let _ = fs::remove_file(&tmp);
    }
    Ok(libs)
}

fn ask_loader(binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    let fail = |reason: String| JailError::Libraries {
        path: binary.to_owned(),
        reason,
    };
    // The ELF and program headers, and the interpreter's name, lie at the
    // start of the file.
    let mut head = Vec::new();
    File::open(binary)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(|e| fail(e.to_string()))?;
    let Some(interp) = elf_interpreter(&head) else {
        return Ok(Vec::new());
    };
    let out = Command::new(&interp)
        .arg("--list")
        .arg(binary)
        .env_clear()
        .output()
        .map_err(|e| fail(format!("{}: {e}", interp.display())))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let mut libs = vec![interp];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)"
        if let Some((_, rest)) = line.split_once("=> ") {
            if let Some(path) = rest.split(" (").next().filter(|p| p.starts_with('/')) {
                libs.push(PathBuf::from(path));
            }
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// The PT_INTERP path of a 64-bit little-endian ELF file, if it has one.
fn elf_interpreter(elf: &[u8]) -> Option<PathBuf> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    // ELF magic, ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    (0..phnum).find_map(|i| {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? != PT_INTERP {
            return None;
        }
        let off = usize::try_from(u64_at(ph + 8)?).ok()?;
        let len = usize::try_from(u64_at(ph + 32)?).ok()?;
        let path = elf.get(off..off + len)?.split(|&b| b == 0).next()?;
        Some(PathBuf::from(std::str::from_utf8(path).ok()?))
    })
}

/// The jailer's command line for `slot` (detached: see the top), firerunner `firerunner` with
/// `args` (its own command line, paths as the controller sees them) and
/// `libs` ([`libraries`] of firerunner).
pub fn jailer_args(
    slot: &Slot,
    opts: &JailOptions,
    libs: &[PathBuf],
    firerunner: &Path,
    args: Vec<OsString>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--uid".into(),
        slot.uid().to_string().into(),
        "--jail_dir".into(),
        slot.dir().into(),
        "--vm_overhead".into(),
        opts.vm_overhead_mib.to_string().into(),
    ];
    for l in libs {
        a.push("--lib".into());
        a.push(l.into());
    }
    a.push("--detach".into());
    a.push("--".into());
    a.push(firerunner.into());
    a.extend(args);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binarys_loader_and_libc_are_found() {
        let exe = std::env::current_exe().unwrap();
        let cache = std::env::temp_dir().join(format!("snapvm-libs-{}", std::process::id()));
        fs::create_dir_all(&cache).unwrap();
        let libs = libraries(&exe, &cache).unwrap();
        // Asked again, the cache answers the same.
        assert_eq!(libraries(&exe, &cache).unwrap(), libs);
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 1);
        fs::remove_dir_all(&cache).unwrap();
        let names: Vec<String> = libs
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.starts_with("ld-linux")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("libc.so")), "{names:?}");
        assert!(
            libs.iter().all(|p| p.is_absolute() && p.exists()),
            "{libs:?}"
        );
    }

    #[test]
    fn non_elf_files_have_no_interpreter() {
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(elf_interpreter(b"\x7fELF\x02\x01"), None);
    }
}
