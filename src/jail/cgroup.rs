//! A jailed VM's cgroup: a memory limit, a pids limit and a CPU weight,
//! in whichever hierarchy actually has those controllers.
//!
//! cgroup v2 is used when the v2 hierarchy offers `memory`, `pids` and
//! `cpu` in the controller's own cgroup (`cgroup.controllers`); otherwise
//! each controller's v1 hierarchy. Hybrid hosts mount v2 beside v1 with no
//! controllers in it, which is why the mount alone decides nothing. A VM's
//! cgroup is `<own cgroup>/snapvm/<name>` in each hierarchy used, so the
//! limits the controller itself runs under still hold for its VMs.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers a VM's cgroup needs.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// The child of the controller's cgroup that holds the VMs' cgroups.
const PARENT: &str = "snapvm";
/// How long removing a cgroup waits for its killed processes to go.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup hierarchy offers the memory, pids and cpu controllers ({0}); mount cgroup2 \
         with them enabled (or their v1 hierarchies), or run with --no_jail"
    )]
    NoControllers(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot create the cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a VM may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// cgroup v2 scale (default 100); v1 `cpu.shares` get 1024/100 of it.
    pub cpu_weight: u64,
}

/// Which hierarchy holds the controllers, and the controller's own cgroup
/// directory in each one used.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hierarchy {
    V2(PathBuf),
    /// One directory per entry of [`CONTROLLERS`], in that order.
    V1(Vec<PathBuf>),
}

/// One mount of /proc/self/mountinfo: where, its root, type, options.
struct Mount {
    point: PathBuf,
    root: String,
    fstype: String,
    options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: unescape(l.get(3)?),
                point: PathBuf::from(unescape(l.get(4)?)),
                fstype: (*r.first()?).to_string(),
                options: (*r.get(2)?).to_string(),
            })
        })
        .collect()
}

/// `mount`'s directory for the cgroup `path` (as /proc/self/cgroup names
/// it, relative to the mount's root).
fn dir_in(mount: &Mount, path: &str) -> PathBuf {
    let rel = path
        .strip_prefix(mount.root.as_str())
        .unwrap_or(path)
        .trim_start_matches('/');
    mount.point.join(rel)
}

/// Picks the hierarchy from /proc/self/mountinfo and /proc/self/cgroup.
fn choose(
    mountinfo: &str,
    own: &str,
    controllers_of: impl Fn(&Path) -> String,
) -> Result<Hierarchy, String> {
    let mounts = mounts(mountinfo);
    let mut found = Vec::new();
    if let (Some(m), Some(path)) = (
        mounts.iter().find(|m| m.fstype == "cgroup2"),
        own.lines().find_map(|l| l.strip_prefix("0::")),
    ) {
        let dir = dir_in(m, path);
        let offered = controllers_of(&dir);
        let offered: Vec<&str> = offered.split_whitespace().collect();
        if CONTROLLERS.iter().all(|c| offered.contains(c)) {
            return Ok(Hierarchy::V2(dir));
        }
        found.push(format!("v2 at {} offers {offered:?}", dir.display()));
    }
    let mut dirs = Vec::new();
    for c in CONTROLLERS {
        let mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == c));
        let path = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, list, path) = (f.next()?, f.next()?, f.next()?);
            list.split(',').any(|x| x == c).then_some(path)
        });
        match (mount, path) {
            (Some(m), Some(p)) => dirs.push(dir_in(m, p)),
            _ => found.push(format!("no v1 {c} hierarchy")),
        }
    }
    if dirs.len() == CONTROLLERS.len() {
        return Ok(Hierarchy::V1(dirs));
    }
    Err(found.join("; "))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(CgroupError::Create {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn hierarchy() -> Result<Hierarchy, CgroupError> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let own = read(Path::new("/proc/self/cgroup"))?;
    choose(&mountinfo, &own, |dir| {
        fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default()
    })
    .map_err(CgroupError::NoControllers)
}

/// A VM's cgroup: one directory (v2) or one per controller (v1).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Cgroup {
    /// The cgroup `name` of this process's hierarchy (it may not exist).
    pub fn named(name: &str) -> Result<Self, CgroupError> {
        Ok(match hierarchy()? {
            Hierarchy::V2(own) => Cgroup {
                dirs: vec![own.join(PARENT).join(name)],
                v2: true,
            },
            Hierarchy::V1(own) => Cgroup {
                dirs: own.iter().map(|d| d.join(PARENT).join(name)).collect(),
                v2: false,
            },
        })
    }

    /// Creates the cgroup `name` with `limits` (a leftover of that name is
    /// removed first).
    pub fn create(name: &str, limits: &Limits) -> Result<Self, CgroupError> {
        let cg = Self::named(name)?;
        cg.remove();
        let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        for dir in &cg.dirs {
            let parent = dir.parent().unwrap_or(dir);
            mkdir(parent)?;
            if cg.v2 {
                // Controllers reach a child only through every ancestor's
                // subtree_control (v2's "no internal processes" rule lets
                // the root, or a cgroup without processes, do this).
                for d in [parent.parent().unwrap_or(parent), parent] {
                    write(&d.join("cgroup.subtree_control"), &enable)?;
                }
            }
            mkdir(dir)?;
        }
        let memory = limits.memory_bytes.to_string();
        let pids = limits.pids.to_string();
        if cg.v2 {
            let dir = &cg.dirs[0];
            write(&dir.join("memory.max"), &memory)?;
            // Guest memory swapped out would escape the limit's intent.
            if dir.join("memory.swap.max").exists() {
                write(&dir.join("memory.swap.max"), "0")?;
            }
            write(&dir.join("pids.max"), &pids)?;
            write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
        } else {
            write(&cg.dirs[0].join("memory.limit_in_bytes"), &memory)?;
            // Memory + swap no more than memory: no swapping past the limit.
            let memsw = cg.dirs[0].join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &memory)?;
            }
            write(&cg.dirs[1].join("pids.max"), &pids)?;
            let shares = limits.cpu_weight * 1024 / 100;
            write(&cg.dirs[2].join("cpu.shares"), &shares.to_string())?;
        }
        Ok(cg)
    }

    /// Moves the calling process, which must be single-threaded, into the
    /// cgroup.
    pub fn join(&self) -> Result<(), CgroupError> {
        // "0" is the writer itself, whatever its pid namespace. v1's
        // `tasks` moves that one thread, which for a single-threaded
        // process is all of it, without the global threadgroup lock whose
        // write side waits an RCU grace period (measured here: 0.1 ms
        // against 5-13 ms for `cgroup.procs`).
        let file = if self.v2 { "cgroup.procs" } else { "tasks" };
        self.dirs.iter().try_for_each(|d| write(&d.join(file), "0"))
    }

    /// The limits in force, read back (cpu weight on v2's scale).
    pub fn limits(&self) -> Result<Limits, CgroupError> {
        let number = |dir: &Path, file: &str| {
            let path = dir.join(file);
            let text = read(&path)?;
            text.trim().parse::<u64>().map_err(|_| CgroupError::Read {
                path,
                source: std::io::Error::other(format!("not a number: {text:?}")),
            })
        };
        Ok(if self.v2 {
            let dir = &self.dirs[0];
            Limits {
                memory_bytes: number(dir, "memory.max")?,
                pids: number(dir, "pids.max")?,
                cpu_weight: number(dir, "cpu.weight")?,
            }
        } else {
            Limits {
                memory_bytes: number(&self.dirs[0], "memory.limit_in_bytes")?,
                pids: number(&self.dirs[1], "pids.max")?,
                cpu_weight: number(&self.dirs[2], "cpu.shares")? * 100 / 1024,
            }
        })
    }

    /// How many processes the memory limit's OOM killer has killed here.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(self.dirs[0].join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends SIGKILL to every process in the cgroup.
    pub fn kill(&self) {
        for dir in &self.dirs {
            let procs = fs::read_to_string(dir.join("cgroup.procs"));
            for pid in procs.unwrap_or_default().split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                }
            }
        }
    }

    /// Kills whatever still runs in the cgroup and removes it; a cgroup
    /// that does not exist is fine.
    pub fn remove(&self) {
        for dir in &self.dirs {
            let deadline = Instant::now() + REMOVE_WAIT;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        log::warn!("cannot remove the cgroup {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => {
                        self.kill();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
28 25 0:26 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
29 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
    const OWN: &str = "8:pids:/\n4:memory:/api/x\n1:cpu:/\n0::/\n";

    #[test]
    fn a_v2_mount_without_controllers_falls_back_to_v1() {
        let h = choose(HYBRID, OWN, |_| String::new()).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1(vec![
                PathBuf::from("/sys/fs/cgroup/memory/api/x"),
                PathBuf::from("/sys/fs/cgroup/pids/"),
                PathBuf::from("/sys/fs/cgroup/cpu/"),
            ])
        );
    }

    #[test]
    fn v2_wins_when_it_offers_every_controller() {
        let all = |_: &Path| "cpuset cpu io memory pids".to_string();
        let h = choose(HYBRID, OWN, all).unwrap();
        assert_eq!(h, Hierarchy::V2(PathBuf::from("/sys/fs/cgroup/unified/")));
        let some = |_: &Path| "memory pids".to_string();
        assert!(matches!(choose(HYBRID, OWN, some), Ok(Hierarchy::V1(_))));
        let v2_only = "29 1 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let err = choose(v2_only, "0::/\n", some).unwrap_err();
        assert!(err.contains("offers [\"memory\", \"pids\"]"), "{err}");
        assert!(err.contains("no v1 cpu hierarchy"), "{err}");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain\"), r"/plain\");
    }
}
