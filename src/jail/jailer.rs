//! The jailer: sets up one VM's jail and starts firerunner in it, then
//! waits for it, forwards termination signals, hands over what the VM
//! wrote, removes the jail and exits as firerunner did ([`super::finish`]).
//! With `--detach` (how controllers run it) it leaves all that to its
//! caller: firerunner becomes the caller's child and the jailer exits 0
//! once it has started, so that no jailer process stays beside each VM.
//!
//! `jailer --uid U --jail_dir DIR --vm_overhead MIB [--lib PATH]...
//! [--detach] -- FIRERUNNER ARGS...`, run as root by a controller
//! (src/launcher.rs), single-threaded, so forking is safe:
//!
//! 1. In the jailer: the output staging directories, the console file, and
//!    the cgroup `snapvm/<DIR's name>` with the limits; then a child in a
//!    new pid namespace (with `--detach`, a child of the jailer's parent).
//! 2. In the child (pid 1 of that namespace): join the cgroup; new mount,
//!    ipc and uts namespaces; a tmpfs root at `DIR/root` holding only
//!    bind mounts of what the VM needs (read-only but for its output and
//!    vsock directories) and `/dev/kvm` and `/dev/userfaultfd` made with
//!    mknod for the VM's uid; `pivot_root` into it; only the fds passed on
//!    purpose (0, 1 = the console, 2, the control channel); rlimits; the
//!    VM's uid and gid with no capabilities and no new privileges; an
//!    environment of `RUST_LOG` alone; exec `/firerunner` with its paths
//!    translated into the jail.
//!
//! In-jail layout: `/firerunner`, its libraries at their own paths,
//! `/kernel` (boot), `/cpu_template`, `/rootfs`, `/appfs`, `/layers/<i>`
//! (the snapshot layers, bottom first), `/out` (the staging directory of
//! `--dump_dir` or `--dump_ws` output), `/snapshots` (`--snapshot_dir`,
//! given to the VM's uid: it writes on-demand snapshots there itself),
//! `/vsock` (the controller's runtime
//! directory holding the vsock sockets), `/dev/kvm`, `/dev/userfaultfd`.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::time::Instant;

use clap::Parser;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{clone, unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, signal, SigHandler, SigSet, Signal};
use nix::sys::stat::{mknod, umask, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, chown, Gid, Pid, Uid};

use super::cgroup::{Cgroup, CgroupError, Limits};
use super::{JailError, Output, STAGING_LIST};
use crate::cli::{FirerunnerArgs, ShellArgs};
use crate::control::{Channel, Event};
use crate::launcher::TAP_FD;

/// Exit code of a jail that could not be set up (firerunner's for a
/// start-up failure).
const EXIT_SETUP: u8 = 1;
/// Open files a jailed firerunner may have.
const NOFILE: u64 = 2048;
/// Bytes a jailed firerunner may write to one file beyond guest memory
/// (its snapshot memory file and working set are at most guest memory).
const FSIZE_SLACK: u64 = 64 << 20;
/// Processes (threads) a jailed firerunner may have beyond one per vCPU.
const PIDS_SLACK: u64 = 16;
/// The staging directory's name in the directory it delivers into.
const STAGING_PREFIX: &str = ".snapvm-jail-";
/// Stack of the child that becomes firerunner (until its exec).
const CHILD_STACK: usize = 1 << 20;
/// The signals forwarded to firerunner: those it stops on (its signalfd's).
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

#[derive(Parser, Debug)]
#[command(name = "jailer", version, about = "Run firerunner in a jail")]
pub struct JailerArgs {
    /// The VM's uid, also its gid.
    #[arg(long)]
    pub uid: u32,
    /// The jail directory; its name also names the cgroup.
    #[arg(long = "jail_dir")]
    pub jail_dir: PathBuf,
    /// MiB the cgroup allows on top of the guest's memory.
    #[arg(long = "vm_overhead")]
    pub vm_overhead: u64,
    /// A shared library firerunner loads (bind-mounted at its own path).
    #[arg(long = "lib")]
    pub libs: Vec<PathBuf>,
    /// Make firerunner a child of the jailer's caller and exit 0 once it
    /// runs (its pid is in DIR/pid): the caller then waits for it and
    /// calls `jail::finish`. Without it firerunner dies with the jailer;
    /// with it, with its control channel.
    #[arg(long)]
    pub detach: bool,
    /// firerunner and its arguments.
    #[arg(last = true, required = true)]
    pub firerunner: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    #[error("the jailer must run as root")]
    NotRoot,
    #[error("bad firerunner arguments: {0}")]
    Args(clap::Error),
    #[error(
        "a jailed firerunner needs --vsock_uds: its default lies in /tmp, which a jail has not"
    )]
    NoVsockPath,
    #[error(
        "a jailed firerunner cannot open a TAP by name (--tap/--network): the controller opens it \
         and passes it as --tap_fd {TAP_FD}"
    )]
    TapInJail,
    #[error("a jailed firerunner takes its TAP on fd {TAP_FD} only, not --tap_fd {0}")]
    TapFd(i32),
    #[error("{0} has no file name to stage it under")]
    NoFileName(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: {1}")]
    Sys(String, nix::Error),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Jail(#[from] JailError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailerError + 'a {
    move |source| JailerError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailerError {
    let what = what.into();
    move |e| JailerError::Sys(what, e)
}

/// A bind mount into the jail.
struct Bind {
    host: PathBuf,
    /// Absolute path inside the jail.
    jail: PathBuf,
    writable: bool,
    exec: bool,
    /// A slave of the host's mount: mounts made under it on the host later
    /// appear in the jail (a shell's inbox). Every other bind is private.
    receives: bool,
}

/// The jail of one VM, ready to be entered.
struct Jail {
    uid: u32,
    /// Host path of the jail's root (the mount point of its tmpfs).
    root: PathBuf,
    binds: Vec<Bind>,
    /// Device nodes to make: in-jail path, host device to copy.
    devices: Vec<(&'static str, &'static str)>,
    /// firerunner's command line inside the jail.
    argv: Vec<CString>,
    console: Option<File>,
    cgroup: Cgroup,
    fsize: u64,
    /// `--detach`: no parent-death signal (the parent is the caller).
    detach: bool,
    /// firerunner has `--tap_fd` ([`TAP_FD`]): keep it open.
    tap: bool,
}

fn cstring(s: &OsStr) -> CString {
    // Command-line arguments never hold a NUL byte.
    CString::new(s.as_bytes()).unwrap_or_default()
}

/// A fresh staging directory for the VM's output in `dir` (created if
/// missing): owned by the VM's uid, recorded in the jail's list.
fn staging(dir: &Path, jail_dir: &Path, uid: u32) -> Result<PathBuf, JailerError> {
    let name = jail_dir.file_name().unwrap_or_default().to_string_lossy();
    fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let dir = std::path::absolute(dir).map_err(io("cannot resolve", dir))?;
    let staging = dir.join(format!("{STAGING_PREFIX}{name}"));
    let list = jail_dir.join(STAGING_LIST);
    fs::write(&list, format!("{}\n", staging.display())).map_err(io("cannot write", &list))?;
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).map_err(io("cannot create", &staging))?;
    chown(&staging, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
        .map_err(sys(format!("cannot chown {}", staging.display())))?;
    Ok(staging)
}

/// firerunner's command line as the jailer reads it.
pub enum Parsed {
    Vm(Box<FirerunnerArgs>),
    Shell(ShellArgs),
}

impl Parsed {
    /// Parses `argv` (firerunner's, program name first).
    fn parse(argv: &[OsString]) -> Result<Self, clap::Error> {
        if argv.get(1).is_some_and(|a| a == "shell") {
            ShellArgs::try_parse_from(&argv[1..]).map(Parsed::Shell)
        } else {
            FirerunnerArgs::try_parse_from(argv).map(|f| Parsed::Vm(Box::new(f)))
        }
    }

    fn control_fd(&self) -> Option<RawFd> {
        match self {
            Parsed::Vm(f) => f.control_fd,
            Parsed::Shell(s) => Some(s.control_fd),
        }
    }
}

fn ro(host: &Path, jail: &str) -> Bind {
    Bind {
        host: host.to_owned(),
        jail: PathBuf::from(jail),
        writable: false,
        exec: false,
        receives: false,
    }
}

/// `--snapshot_dir`: snapshots on demand are written in place (the VM
/// renames each into the directory itself), so the directory becomes the
/// VM's, at `/snapshots`.
fn snapshot_dir(d: &Path, uid: u32, binds: &mut Vec<Bind>) -> Result<PathBuf, JailerError> {
    chown(d, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)))
        .map_err(sys(format!("cannot give {} to the VM", d.display())))?;
    binds.push(Bind {
        writable: true,
        ..ro(d, "/snapshots")
    });
    Ok(PathBuf::from("/snapshots"))
}

/// A shell's inbox (see the module doc of src/jail/mod.rs): `DIR/inbox`
/// bind-mounted onto itself as a shared mount of a peer group of its own,
/// so that what the controller mounts under it later appears under the
/// jail's `/inbox`, a slave copy (it never propagates back).
fn inbox(jail_dir: &Path, binds: &mut Vec<Bind>) -> Result<(), JailerError> {
    let inbox = jail_dir.join(super::INBOX);
    fs::create_dir_all(&inbox).map_err(io("cannot create", &inbox))?;
    let what = || format!("cannot make {} a shared mount", inbox.display());
    mount(
        Some(&inbox),
        &inbox,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(what()))?;
    for flag in [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
        mount(None::<&str>, &inbox, None::<&str>, flag, None::<&str>).map_err(sys(what()))?;
    }
    binds.push(Bind {
        receives: true,
        ..ro(&inbox, "/inbox")
    });
    Ok(())
}

/// Refuses what the VM's uid could not read among `binds`' read-only
/// sources, before anything is made or given to the VM.
fn check_all(binds: &[Bind], uid: u32) -> Result<(), JailerError> {
    for b in binds.iter().filter(|b| !b.writable) {
        super::check_readable(&b.host, uid)?;
    }
    Ok(())
}

/// The directory of the vsock sockets `uds`, at `/vsock`; returns the
/// in-jail path of `uds`.
fn vsock(uds: &Path, binds: &mut Vec<Bind>) -> Result<PathBuf, JailerError> {
    let name = uds
        .file_name()
        .ok_or_else(|| JailerError::NoFileName(uds.to_owned()))?;
    binds.push(Bind {
        writable: true,
        ..ro(uds.parent().unwrap_or(Path::new(".")), "/vsock")
    });
    Ok(Path::new("/vsock").join(name))
}

impl Jail {
    /// A VM's own files (kernel, disks, layers, CPU template) at their
    /// in-jail paths, checked readable, then its output directories (see
    /// the layout in the module doc); rewrites `fr` to the in-jail paths.
    /// Returns whether the VM writes up to its memory's size of files.
    fn plan_vm(
        args: &JailerArgs,
        fr: &mut FirerunnerArgs,
        binds: &mut Vec<Bind>,
    ) -> Result<bool, JailerError> {
        let (uid, jail_dir) = (args.uid, &args.jail_dir);
        let vm = &mut fr.vm;
        let layers = vm.layers();
        if layers.is_empty() {
            binds.push(ro(&vm.kernel, "/kernel"));
        }
        // Not read when restoring, but firerunner wants one.
        vm.kernel = PathBuf::from("/kernel");
        binds.push(ro(&vm.rootfs, "/rootfs"));
        vm.rootfs = PathBuf::from("/rootfs");
        if let Some(a) = &vm.appfs {
            binds.push(ro(a, "/appfs"));
            vm.appfs = Some(PathBuf::from("/appfs"));
        }
        if let Some(t) = &vm.cpu_template {
            binds.push(ro(t, "/cpu_template"));
            vm.cpu_template = Some(PathBuf::from("/cpu_template"));
        }
        let mut in_jail = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let jail = format!("/layers/{i}");
            binds.push(ro(l, &jail));
            in_jail.push(jail);
        }
        if !layers.is_empty() {
            vm.load_dir = Some(in_jail.join(","));
            vm.diff_dirs = None;
        }
        check_all(binds, uid)?;
        let out = |staging: &Path| Bind {
            writable: true,
            ..ro(staging, "/out")
        };
        let mut output = None;
        if let Some(target) = vm.dump_dir.clone() {
            let name = target
                .file_name()
                .ok_or_else(|| JailerError::NoFileName(target.clone()))?
                .to_owned();
            let parent = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let staging = staging(parent, jail_dir, uid)?;
            binds.push(out(&staging));
            vm.dump_dir = Some(Path::new("/out").join(name));
            output = Some(Output::Snapshot {
                staging,
                target: std::path::absolute(&target).map_err(io("cannot resolve", &target))?,
            });
        }
        if let Some(d) = &vm.dump_ws {
            let dir = match d.as_str() {
                "" => layers.last().cloned().unwrap_or_default(),
                d => PathBuf::from(d),
            };
            let staging = staging(&dir, jail_dir, uid)?;
            binds.push(out(&staging));
            vm.dump_ws = Some("/out".to_string());
            output = Some(Output::WorkingSet { staging, dir });
        }
        if let Some(o) = &output {
            let record = jail_dir.join(super::OUTPUT_RECORD);
            o.record(jail_dir).map_err(io("cannot write", &record))?;
        }
        let on_demand = vm.snapshot_dir.take();
        if let Some(d) = &on_demand {
            vm.snapshot_dir = Some(snapshot_dir(d, uid, binds)?);
        }
        Ok(output.is_some() || on_demand.is_some())
    }

    /// Plans the jail for `args` and makes what lies outside it: the jail
    /// directory, the staging directory (a shell's inbox), the console
    /// file and the cgroup.
    fn prepare(args: &JailerArgs, parsed: &Parsed) -> Result<Self, JailerError> {
        let uid = args.uid;
        let jail_dir = &args.jail_dir;
        let root = jail_dir.join("root");
        fs::create_dir_all(&root).map_err(io("cannot create", &root))?;
        let mut binds = vec![Bind {
            exec: true,
            ..ro(Path::new(&args.firerunner[0]), "/firerunner")
        }];
        binds.extend(args.libs.iter().map(|lib| Bind {
            exec: true,
            ..ro(lib, &lib.to_string_lossy())
        }));
        let mut argv = vec![cstring(OsStr::new("/firerunner"))];
        // (guest memory, vCPUs, whether the VM writes up to its memory's
        // size of files, console)
        let (mem, vcpus, writes, console) = match parsed {
            Parsed::Vm(fr) => {
                let mut fr = fr.as_ref().clone();
                let writes = Self::plan_vm(args, &mut fr, &mut binds)?;
                let (uds, console) = (fr.vsock_uds.take(), fr.console.take());
                let mem = fr.vm.mem_size << 20;
                let vcpus = fr.vm.vcpu_count;
                let uds = uds.ok_or(JailerError::NoVsockPath)?;
                fr.vsock_uds = Some(vsock(&uds, &mut binds)?);
                argv.extend(fr.to_args().iter().map(|a| cstring(a)));
                (mem, vcpus, writes, console)
            }
            Parsed::Shell(sa) => {
                let mut sa = sa.clone();
                check_all(&binds, uid)?;
                if let Some(d) = sa.snapshot_dir.take() {
                    sa.snapshot_dir = Some(snapshot_dir(&d, uid, &mut binds)?);
                }
                inbox(jail_dir, &mut binds)?;
                let (uds, console) = (sa.vsock_uds.take(), sa.console.take());
                let uds = uds.ok_or(JailerError::NoVsockPath)?;
                sa.vsock_uds = Some(vsock(&uds, &mut binds)?);
                argv.push(cstring(OsStr::new("shell")));
                argv.extend(sa.to_args().iter().map(|a| cstring(a)));
                let writes = sa.snapshot_dir.is_some();
                (sa.mem_size << 20, sa.vcpu_count, writes, console)
            }
        };
        let console = match console {
            Some(c) => Some(File::create(&c).map_err(io("cannot create the console", &c))?),
            None => None,
        };
        // What the VM writes is charged to its cgroup too: dirty page
        // cache, and on tmpfs pages that cannot be reclaimed at all. A VM
        // that writes a snapshot or a working set (at most its memory's
        // size) may use that much more; a serving VM may not.
        let limits = Limits {
            memory_bytes: mem + if writes { mem } else { 0 } + (args.vm_overhead << 20),
            pids: vcpus + PIDS_SLACK,
            cpu_weight: (100 * vcpus).min(10_000),
        };
        let name = jail_dir.file_name().unwrap_or_default().to_string_lossy();
        let cgroup = Cgroup::create(&name, &limits)?;
        let devices = [
            ("/dev/kvm", "/dev/kvm"),
            ("/dev/userfaultfd", "/dev/userfaultfd"),
        ]
        .into_iter()
        .filter(|(_, host)| Path::new(host).exists())
        .collect();
        Ok(Jail {
            uid,
            root,
            binds,
            devices,
            argv,
            console,
            cgroup,
            fsize: mem + FSIZE_SLACK,
            detach: args.detach,
            tap: matches!(parsed, Parsed::Vm(f) if f.tap_fd.is_some()),
        })
    }

    /// In the child: everything from joining the cgroup to the exec.
    fn enter(&self, start: Instant) -> Result<std::convert::Infallible, JailerError> {
        self.cgroup.join()?;
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
            .map_err(sys("cannot unshare the mount, ipc and uts namespaces"))?;
        // Nothing mounted from here on may propagate back to the host
        // (slaves receive, never send); the jail's own mounts are made
        // private as they are made, but for a shell's inbox, which keeps
        // receiving what the controller mounts under it on the host.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )
        .map_err(sys("cannot make the mounts slaves"))?;
        nix::unistd::sethostname("snapvm").map_err(sys("cannot set the hostname"))?;
        let root = &self.root;
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some("mode=0755,size=1m,nr_inodes=512"),
        )
        .map_err(sys(format!(
            "cannot mount the jail's tmpfs on {}",
            root.display()
        )))?;
        mount(
            None::<&str>,
            root,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(sys("cannot make the jail's root private"))?;
        for b in &self.binds {
            self.bind(b)?;
        }
        for (jail, host) in &self.devices {
            self.device(jail, host)?;
        }
        chdir(root).map_err(sys("cannot enter the jail"))?;
        match nix::unistd::pivot_root(".", ".") {
            // The old root now lies under the new one: detach it.
            Ok(()) => {
                umount2(".", MntFlags::MNT_DETACH).map_err(sys("cannot detach the old root"))?
            }
            // The old root is the initramfs's rootfs, which cannot be
            // pivoted (an emulated host's /init): move the jail over it
            // and chroot. Without CAP_SYS_CHROOT there is no way back.
            Err(nix::Error::EINVAL) => {
                log::info!("pivot_root refused (initramfs root): moving the jail over / instead");
                mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                    .map_err(sys("cannot move the jail over /"))?;
                nix::unistd::chroot(".").map_err(sys("cannot chroot into the jail"))?;
            }
            Err(e) => return Err(JailerError::Sys("pivot_root".into(), e)),
        }
        chdir("/").map_err(sys("cannot enter the jail's root"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(sys("cannot make the jail's root read-only"))?;
        log::debug!("jail set up in {} us", start.elapsed().as_micros());
        self.drop_everything()
    }

    /// Bind-mounts `b` into the jail (read-only unless writable; no exec
    /// unless exec; never setuid or devices).
    fn bind(&self, b: &Bind) -> Result<(), JailerError> {
        let at = self.root.join(b.jail.strip_prefix("/").unwrap_or(&b.jail));
        let meta = fs::metadata(&b.host).map_err(io("cannot bind", &b.host))?;
        if meta.is_dir() {
            fs::create_dir_all(&at).map_err(io("cannot create", &at))?;
        } else {
            if let Some(p) = at.parent() {
                fs::create_dir_all(p).map_err(io("cannot create", p))?;
            }
            File::create(&at).map_err(io("cannot create", &at))?;
        }
        let what = || format!("cannot bind {} at {}", b.host.display(), b.jail.display());
        mount(
            Some(&b.host),
            &at,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(what()))?;
        let propagation = if b.receives {
            MsFlags::MS_SLAVE
        } else {
            MsFlags::MS_PRIVATE
        };
        mount(None::<&str>, &at, None::<&str>, propagation, None::<&str>).map_err(sys(what()))?;
        let mut flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if !b.writable {
            flags |= MsFlags::MS_RDONLY;
        }
        if !b.exec {
            flags |= MsFlags::MS_NOEXEC;
        }
        mount(None::<&str>, &at, None::<&str>, flags, None::<&str>).map_err(sys(what()))
    }

    /// Makes the device node `jail` like the host's `host`, the VM's alone.
    fn device(&self, jail: &str, host: &str) -> Result<(), JailerError> {
        let rdev = fs::metadata(host)
            .map_err(io("cannot stat", Path::new(host)))?
            .rdev();
        let at = self.root.join(jail.trim_start_matches('/'));
        if let Some(p) = at.parent() {
            fs::create_dir_all(p).map_err(io("cannot create", p))?;
        }
        let what = format!("cannot make {jail}");
        mknod(&at, SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), rdev)
            .map_err(sys(what.clone()))?;
        let id = Some(Uid::from_raw(self.uid));
        chown(&at, id, Some(Gid::from_raw(self.uid))).map_err(sys(what))
    }

    /// The last steps before the exec: fds, rlimits, credentials, then
    /// exec with only `RUST_LOG` in the environment.
    fn drop_everything(&self) -> Result<std::convert::Infallible, JailerError> {
        if let Some(console) = &self.console {
            nix::unistd::dup2_stdout(console).map_err(sys("cannot make the console stdout"))?;
        }
        // Everything but 0-2, the control channel (3; the launcher's
        // CONTROL_FD) and the TAP if given (TAP_FD): the console's own fd
        // and anything the controller leaked.
        let first = if self.tap { TAP_FD + 1 } else { TAP_FD } as u32;
        // SAFETY: close_range only closes descriptors; none above 3 but
        // the TAP is used by this process after this point (the console
        // was dup'ed).
        if unsafe { libc::close_range(first, u32::MAX, 0) } < 0 {
            return Err(JailerError::Sys(
                "cannot close inherited fds".into(),
                nix::Error::last(),
            ));
        }
        setrlimit(Resource::RLIMIT_NOFILE, NOFILE, NOFILE)
            .map_err(sys("cannot limit open files"))?;
        setrlimit(Resource::RLIMIT_FSIZE, self.fsize, self.fsize)
            .map_err(sys("cannot limit file size"))?;
        setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(sys("cannot limit core dumps"))?;
        // A write past RLIMIT_FSIZE then fails (EFBIG) instead of killing.
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }
            .map_err(sys("cannot ignore SIGXFSZ"))?;
        let id = Gid::from_raw(self.uid);
        nix::unistd::setgroups(&[]).map_err(sys("cannot drop supplementary groups"))?;
        nix::unistd::setresgid(id, id, id).map_err(sys("cannot set the VM's gid"))?;
        let id = Uid::from_raw(self.uid);
        // From uid 0 to another, every capability goes.
        nix::unistd::setresuid(id, id, id).map_err(sys("cannot set the VM's uid"))?;
        nix::sys::prctl::set_no_new_privs().map_err(sys("cannot set no_new_privs"))?;
        if !self.detach {
            // Set after the uid change, which clears it: the VM dies with
            // its jailer. A detached VM's parent is a thread of its
            // controller, which may end before the VM (the signal would
            // come then); such a VM stops when its control channel closes.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(sys("cannot set the parent-death signal"))?;
        }
        umask(Mode::from_bits_truncate(0o022));
        // firerunner takes these through a signalfd: blocked across the
        // exec, one sent before it is ready waits for it rather than being
        // dropped (pid 1 ignores signals it has no handler for).
        let mut mask = SigSet::empty();
        FORWARDED.iter().for_each(|&s| mask.add(s));
        mask.thread_set_mask()
            .map_err(sys("cannot set the signal mask"))?;
        let env = environment();
        nix::unistd::execve(&self.argv[0], &self.argv, &env)
            .map_err(sys("cannot exec /firerunner in the jail"))
    }
}

/// `RUST_LOG` and, in test builds, the test hooks' variables.
fn environment() -> Vec<CString> {
    std::env::vars_os()
        .filter(|(k, _)| {
            k == "RUST_LOG"
                || (cfg!(feature = "test-hooks") && k.as_bytes().starts_with(b"SNAPVM_TEST_"))
        })
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect()
}

/// How firerunner ended, or that it runs on as the caller's child.
enum Ended {
    Status(ExitStatus),
    Detached,
}

/// Runs the jailer (see the module doc) and returns its exit code, or
/// dies of firerunner's signal.
pub fn run(args: JailerArgs) -> ExitCode {
    let start = Instant::now();
    let parsed = Parsed::parse(&args.firerunner);
    let control = parsed.as_ref().ok().and_then(Parsed::control_fd);
    let fail = |e: JailerError| {
        let reason = format!("jail: {e}");
        eprintln!("jailer: error: {e}");
        if let Some(c) = control.and_then(|fd| Channel::from_fd(fd).ok()) {
            c.send(&Event::Exit {
                code: i32::from(EXIT_SETUP),
                reason,
            });
        }
        ExitCode::from(EXIT_SETUP)
    };
    if !nix::unistd::geteuid().is_root() {
        return fail(JailerError::NotRoot);
    }
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return fail(JailerError::Args(e)),
    };
    if let Parsed::Vm(fr) = &parsed {
        if fr.tap.is_some() || fr.network.is_some() {
            return fail(JailerError::TapInJail);
        }
        if let Some(fd) = fr.tap_fd.filter(|&fd| fd != TAP_FD) {
            return fail(JailerError::TapFd(fd));
        }
    }
    let ended = Jail::prepare(&args, &parsed).and_then(|jail| spawn(&jail, &args, control, start));
    let status = match ended {
        Ok(Ended::Detached) => return ExitCode::SUCCESS,
        Ok(Ended::Status(s)) => s,
        Err(e) => {
            super::remove(&args.jail_dir);
            return fail(e);
        }
    };
    let t = Instant::now();
    if let Err(e) = super::finish(&args.jail_dir, status) {
        eprintln!("jailer: error: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    log::debug!("jail finished in {} us", t.elapsed().as_micros());
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(u8::MAX)),
        (None, Some(s)) => die_of(Signal::try_from(s).unwrap_or(Signal::SIGKILL)),
        (None, None) => ExitCode::from(u8::MAX),
    }
}

/// Starts firerunner's pid 1 in a new pid namespace, as the jailer's
/// child (then waits for it, forwarding termination signals) or, with
/// `--detach`, as its caller's (then records its pid and returns).
fn spawn(
    jail: &Jail,
    args: &JailerArgs,
    control: Option<RawFd>,
    start: Instant,
) -> Result<Ended, JailerError> {
    let mut waited = SigSet::empty();
    for s in FORWARDED.into_iter().chain([Signal::SIGCHLD]) {
        waited.add(s);
    }
    waited.thread_block().map_err(sys("cannot block signals"))?;
    let mut flags = CloneFlags::CLONE_NEWPID;
    if args.detach {
        flags |= CloneFlags::CLONE_PARENT;
    }
    let child_main = Box::new(|| {
        let Err(e) = jail.enter(start);
        eprintln!("jailer: error: {e}");
        if let Some(c) = control.and_then(|fd| Channel::from_fd(fd).ok()) {
            c.send(&Event::Exit {
                code: i32::from(EXIT_SETUP),
                reason: format!("jail: {e}"),
            });
        }
        isize::from(EXIT_SETUP)
    });
    // The child's stack; pages it never touches cost nothing.
    let mut stack = vec![0u8; CHILD_STACK];
    // SAFETY: the jailer is single-threaded and the child gets a copy of
    // its memory (no CLONE_VM), so the child may run any code; it only
    // sets up the jail and execs (or returns, ending it), well within
    // CHILD_STACK. SIGCHLD is its exit signal, as after a fork.
    let child = unsafe { clone(child_main, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(sys("cannot start firerunner in a new pid namespace"))?;
    // The jailer keeps no fd of the VM's: the controller must see the
    // control channel close when firerunner ends.
    // SAFETY: close_range only closes descriptors; the jailer uses none
    // above stderr from here on.
    unsafe { libc::close_range(3, u32::MAX, 0) };
    if args.detach {
        let path = args.jail_dir.join(super::PID_FILE);
        super::record_pid(&args.jail_dir, child).map_err(io("cannot write", &path))?;
        return Ok(Ended::Detached);
    }
    loop {
        match waited.wait().map_err(sys("cannot wait for signals"))? {
            Signal::SIGCHLD => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => {
                    return Ok(Ended::Status(ExitStatus::from_raw(code << 8)))
                }
                Ok(WaitStatus::Signaled(_, s, _)) => {
                    return Ok(Ended::Status(ExitStatus::from_raw(s as i32)))
                }
                _ => {}
            },
            s => forward(child, s),
        }
    }
}

fn forward(child: Pid, s: Signal) {
    if let Err(e) = kill(child, s) {
        log::warn!("cannot pass {s} on to firerunner: {e}");
    }
}

/// Ends the jailer by signal `s`, as firerunner ended.
fn die_of(s: Signal) -> ! {
    // SAFETY: restoring the default action installs no handler code.
    let _ = unsafe { signal(s, SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(s);
    let _ = set.thread_unblock();
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    let _ = kill(Pid::this(), s);
    std::process::exit(128 + s as i32)
}
