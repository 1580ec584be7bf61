//! Per-thread seccomp filters: every thread firerunner keeps running while
//! a guest runs is confined to the system calls its own job needs.
//!
//! Thread classes, each with its own allow-list ([`ThreadClass`]):
//! - `vcpu`: one per vCPU — `KVM_RUN`, the port-I/O and MMIO exits it
//!   handles (device registers, the serial console, the control port), and
//!   saving its KVM state at a snapshot;
//! - `event-loop`: firerunner's main thread — the devices (virtio-blk
//!   reads, vsock's Unix sockets), the controller's channel, the
//!   termination signals (a signalfd), kicking the vCPUs at teardown; with
//!   `--dump_dir` or `--dump_ws` also writing the snapshot or working set
//!   (the `event-loop` + `writer` list);
//! - `uffd-handler`: the working-set fault handler (userfaultfd);
//! - `ws-prefetch`: the `--load_ws` prefetch thread;
//! - `rootfs-hash`: hashing a booted VM's rootfs for its snapshot.
//!
//! Each thread installs its filter itself, as it starts its steady-state
//! loop, once its set-up (opening files, creating fds, mapping memory) is
//! done. Threads that only set up — the restore-memory thread, boot's
//! memory-slot thread — end before any guest code runs and have none. No
//! list allows `clone`/`clone3` or `execve`: a filtered thread can neither
//! start threads (which would inherit its filter) nor processes. Filters
//! never widen: every thread that spawns others does so before installing
//! its own filter, and each child installs its own narrower one.
//!
//! Arguments are checked where they matter: `ioctl` request numbers
//! (compared as 32-bit values, as the kernel's `ioctl` takes an
//! `unsigned int`) per class, `mmap`/`mprotect` never with `PROT_EXEC`,
//! `madvise` only `MADV_DONTNEED`, `tgkill` only to this process's own
//! threads with the vCPU kick signal or `SIGABRT` (a panic's abort),
//! `socket` only for Unix stream sockets, `getsockopt` only `SO_ERROR`,
//! `fcntl` only `F_GETFD`/`F_GETFL`/`F_SETFD`.
//!
//! A forbidden call traps (`SECCOMP_RET_TRAP`): the `SIGSYS` handler writes
//! one line naming the call and the thread to stderr and ends the process
//! with [`VIOLATION_EXIT_CODE`]; never a silent hang. The filters are the
//! same in every build; `firerunner --no_seccomp` runs without them.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::memory::uffd::sys as uffd;
use super::vcpu::kick_signal;

/// firerunner's exit code when a thread made a system call its filter
/// forbids (as Firecracker's; not a signal number: 128 + 20 would be
/// SIGTSTP, which stops a process and never ends it).
pub const VIOLATION_EXIT_CODE: i32 = 148;

/// Test hooks, compiled in only with the `test-hooks` feature (the
/// integration tests enable it; release binaries never carry them).
#[cfg(feature = "test-hooks")]
pub mod hooks {
    /// When set to a thread class's name (`vcpu`, `event-loop`, ...), each
    /// thread of that class makes a forbidden system call right after
    /// installing its filter.
    pub const VIOLATE_ENV: &str = "SNAPVM_TEST_SECCOMP_VIOLATE";
    /// What it calls: harmless, and in no allow-list.
    pub const FORBIDDEN: &str = "getppid";
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {class} seccomp filter: {source}")]
    Build {
        class: &'static str,
        source: BackendError,
    },
    #[error("cannot install the SIGSYS handler for seccomp violations: {0}")]
    Handler(vmm_sys_util::errno::Error),
    #[error("seccomp filters were already enabled in this process")]
    AlreadyEnabled,
    #[error("cannot turn off heap trimming (mallopt), which filtered threads cannot do")]
    Malloc,
    #[error("cannot install the {class} seccomp filter: {source}")]
    Install {
        class: &'static str,
        source: seccompiler::Error,
    },
}

/// The kinds of thread firerunner runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadClass {
    Vcpu,
    EventLoop,
    FaultHandler,
    Prefetch,
    RootfsHash,
}

impl ThreadClass {
    pub const ALL: [ThreadClass; 5] = [
        ThreadClass::Vcpu,
        ThreadClass::EventLoop,
        ThreadClass::FaultHandler,
        ThreadClass::Prefetch,
        ThreadClass::RootfsHash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::EventLoop => "event-loop",
            ThreadClass::FaultHandler => "uffd-handler",
            ThreadClass::Prefetch => "ws-prefetch",
            ThreadClass::RootfsHash => "rootfs-hash",
        }
    }
}

/// Syscall numbers and their names (with the `SYS_` prefix): every call an
/// allow-list names, and forbidden ones worth naming in a violation's line.
macro_rules! named {
    ($($sys:ident),* $(,)?) => { &[$((libc::$sys, stringify!($sys))),*] };
}
#[rustfmt::skip]
const NAMES: &[(i64, &str)] = named![
    // In some allow-list.
    SYS_access, SYS_accept4, SYS_brk, SYS_clock_gettime, SYS_close, SYS_connect,
    SYS_epoll_ctl, SYS_epoll_wait, SYS_exit, SYS_exit_group, SYS_fcntl, SYS_flock,
    SYS_fsync, SYS_ftruncate, SYS_futex, SYS_getdents64, SYS_getpid, SYS_getsockopt,
    SYS_gettid, SYS_ioctl, SYS_madvise, SYS_mincore, SYS_mkdir, SYS_mmap, SYS_mprotect,
    SYS_mremap, SYS_munmap, SYS_newfstatat, SYS_openat, SYS_poll, SYS_pread64,
    SYS_pwrite64, SYS_read, SYS_recvfrom, SYS_rename, SYS_renameat2, SYS_rt_sigprocmask,
    SYS_rt_sigreturn, SYS_sched_yield, SYS_sendto, SYS_shutdown, SYS_sigaltstack,
    SYS_socket, SYS_statx, SYS_tgkill, SYS_timerfd_settime, SYS_unlink, SYS_unlinkat,
    SYS_write,
    // In none, and worth naming.
    SYS_accept, SYS_bind, SYS_clone, SYS_clone3, SYS_execve, SYS_execveat, SYS_fork,
    SYS_getppid, SYS_kill, SYS_listen, SYS_mount, SYS_open, SYS_prctl, SYS_ptrace,
    SYS_recvmsg, SYS_seccomp, SYS_sendmsg, SYS_vfork,
];

/// The name of syscall `nr`, if [`NAMES`] has it.
fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| &name[4..])
}

/// One allow-list: syscall number → the rules one of which must match its
/// arguments (none: any arguments).
type AllowList = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds `nr`, allowed with any arguments.
fn any(list: &mut AllowList, nr: i64) {
    list.insert(nr, Vec::new());
}

/// Adds `nr`, allowed when one of `rules` matches (merged with the rules
/// already there; a syscall already allowed with any arguments stays so).
fn when(list: &mut AllowList, nr: i64, rules: Vec<SeccompRule>) {
    match list.get_mut(&nr) {
        Some(existing) if existing.is_empty() => {}
        Some(existing) => existing.extend(rules),
        None => {
            list.insert(nr, rules);
        }
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// `tgkill` of a thread of this process with `signal`. (The process id is
/// taken when the filter is built: the one this process has in its pid
/// namespace, as `getpid` returns it to glibc.)
fn tgkill(signal: i32) -> Result<Vec<SeccompRule>, BackendError> {
    Ok(vec![SeccompRule::new(vec![
        cond(0, SeccompCmpOp::Eq, u64::from(std::process::id()))?,
        cond(2, SeccompCmpOp::Eq, signal as u64)?,
    ])?])
}

/// `fcntl` with one of these commands.
fn fcntl(commands: &[i32]) -> Result<Vec<SeccompRule>, BackendError> {
    commands
        .iter()
        .map(|&c| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, c as u64)?]))
        .collect()
}

/// `ioctl` with one of these request numbers (compared as 32 bits).
fn ioctls(list: &mut AllowList, requests: &[u64]) -> Result<(), BackendError> {
    let rules = requests
        .iter()
        .map(|&r| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, r)?]))
        .collect::<Result<_, _>>()?;
    when(list, libc::SYS_ioctl, rules);
    Ok(())
}

/// What every filtered thread needs to live, allocate, log and end:
/// locks and channels (`futex`, `sched_yield`), the allocator (`mmap` and
/// `mprotect` never executable, `munmap`, `mremap` — glibc's `realloc` of a
/// large block, e.g. the fault handler's growing recording — `brk`,
/// `madvise(MADV_DONTNEED)`),
/// log lines on stderr (`write`), the clock where the vDSO falls back to
/// the kernel, a signal handler's return, and thread and process exit
/// (std and glibc release the thread's stacks: `sigaltstack`, `munmap`,
/// `madvise`; glibc blocks signals first: `rt_sigprocmask`, as
/// `pthread_kill` does around its `tgkill`), a panic's `abort()`, which
/// must stay a `SIGABRT` (`getpid`, `gettid`, `tgkill` to this process
/// with `SIGABRT`), and `fcntl(F_GETFD)`, with which std's debug builds
/// check that an fd is open before they close it (allowed in every build:
/// the lists are the same in all).
fn base() -> Result<AllowList, BackendError> {
    let mut list = AllowList::new();
    for nr in [
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_write,
        libc::SYS_clock_gettime,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getpid,
        libc::SYS_gettid,
    ] {
        any(&mut list, nr);
    }
    when(&mut list, libc::SYS_tgkill, tgkill(libc::SIGABRT)?);
    when(&mut list, libc::SYS_fcntl, fcntl(&[libc::F_GETFD])?);
    let no_exec = |arg| -> Result<Vec<SeccompRule>, BackendError> {
        let exec = libc::PROT_EXEC as u64;
        Ok(vec![SeccompRule::new(vec![cond(
            arg,
            SeccompCmpOp::MaskedEq(exec),
            0,
        )?])?])
    };
    when(&mut list, libc::SYS_mmap, no_exec(2)?);
    when(&mut list, libc::SYS_mprotect, no_exec(2)?);
    when(
        &mut list,
        libc::SYS_madvise,
        vec![SeccompRule::new(vec![cond(
            2,
            SeccompCmpOp::Eq,
            libc::MADV_DONTNEED as u64,
        )?])?],
    );
    Ok(list)
}

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, kvm_bindings::KVMIO, 0x81, kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, kvm_bindings::KVMIO, 0x83, kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_TRANSLATE, kvm_bindings::KVMIO, 0x85, kvm_translation);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, kvm_bindings::KVMIO, 0x88, kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, kvm_bindings::KVMIO, 0x8e, kvm_lapic_state);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, kvm_bindings::KVMIO, 0x91, kvm_cpuid2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, kvm_bindings::KVMIO, 0x98, kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_vcpu_events
);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, kvm_bindings::KVMIO, 0xa1, kvm_debugregs);
vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, kvm_bindings::KVMIO, 0xa4, kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, kvm_bindings::KVMIO, 0xa6, kvm_xcrs);
vmm_sys_util::ioctl_io_nr!(KVM_KVMCLOCK_CTRL, kvm_bindings::KVMIO, 0xad);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, kvm_bindings::KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, kvm_bindings::KVMIO, 0x62, kvm_irqchip);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, kvm_bindings::KVMIO, 0x7c, kvm_clock_data);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, kvm_bindings::KVMIO, 0x9f, kvm_pit_state2);

/// A vCPU thread: `KVM_RUN` and its exits — device registers, the serial
/// console and irqfds (`write`), the control port's events to the
/// controller (`sendto`), host streams closed by a vsock reset the guest
/// asks for (`close`) — pausing (`KVM_KVMCLOCK_CTRL`), saving its state
/// for a snapshot, the registers for a fatal exit's log line, and closing
/// its vCPU fd as it ends.
fn vcpu() -> Result<AllowList, BackendError> {
    let mut list = base()?;
    any(&mut list, libc::SYS_sendto);
    any(&mut list, libc::SYS_close);
    ioctls(
        &mut list,
        &[
            KVM_RUN(),
            KVM_KVMCLOCK_CTRL(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_LAPIC(),
            KVM_GET_MSRS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_VCPU_EVENTS(),
            KVM_TRANSLATE(),
        ]
        .map(u64::from),
    )?;
    Ok(list)
}

/// The event loop (firerunner's main thread): epoll; eventfds, the
/// signalfd and the controller's socket; virtio-blk reads; vsock's Unix
/// sockets (accepting host clients, connecting to `<uds>_P` — only Unix
/// stream sockets — `FIONBIO`, a stream's error, shutting down and closing
/// them), its timerfd, and removing its listener at teardown (`statx`,
/// `unlink`); kicking the vCPUs (`tgkill` to this process with the kick
/// signal, as `pthread_kill` does) and joining them.
fn event_loop() -> Result<AllowList, BackendError> {
    let mut list = base()?;
    for nr in [
        libc::SYS_epoll_wait,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_close,
        libc::SYS_timerfd_settime,
        libc::SYS_statx,
        libc::SYS_unlink,
    ] {
        any(&mut list, nr);
    }
    when(
        &mut list,
        libc::SYS_socket,
        vec![SeccompRule::new(vec![
            cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?,
            cond(1, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_STREAM as u64)?,
        ])?],
    );
    when(&mut list, libc::SYS_tgkill, tgkill(kick_signal())?);
    // A vsock host stream's pending error, on EPOLLERR (`take_error`).
    when(
        &mut list,
        libc::SYS_getsockopt,
        vec![SeccompRule::new(vec![
            cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)?,
            cond(2, SeccompCmpOp::Eq, libc::SO_ERROR as u64)?,
        ])?],
    );
    ioctls(&mut list, &[libc::FIONBIO])?;
    Ok(list)
}

/// What the event loop adds when it writes a snapshot (`--dump_dir`) or a
/// working set (`--dump_ws`): the VM-wide KVM state and the dirty log
/// (`ioctl`), a booted VM's resident pages (`mincore`); checking and
/// creating the directory and its files crash-safely (`access`, `mkdir`,
/// `openat`, `ftruncate`, `pwrite64`, `fsync`, `rename`, `renameat2` to
/// replace a snapshot, `flock` on the working-set files), and removing
/// what a replaced snapshot or a dead writer left (`getdents64`,
/// `newfstatat`, `unlinkat`, `fcntl(F_GETFL/F_SETFD)`); hashing the rootfs
/// again if it changed since it was hashed.
fn writer(list: &mut AllowList) -> Result<(), BackendError> {
    for nr in [
        libc::SYS_mincore,
        libc::SYS_access,
        libc::SYS_mkdir,
        libc::SYS_openat,
        libc::SYS_ftruncate,
        libc::SYS_pwrite64,
        libc::SYS_fsync,
        libc::SYS_rename,
        libc::SYS_renameat2,
        libc::SYS_flock,
        libc::SYS_getdents64,
        libc::SYS_newfstatat,
        libc::SYS_unlinkat,
    ] {
        any(list, nr);
    }
    when(
        list,
        libc::SYS_fcntl,
        fcntl(&[libc::F_GETFL, libc::F_SETFD])?,
    );
    ioctls(
        list,
        &[
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_CLOCK(),
            KVM_GET_DIRTY_LOG(),
        ]
        .map(u64::from),
    )
}

/// The userfaultfd fault handler: waits on the userfaultfd and its stop
/// eventfd, reads fault messages, reads pages from the layers and places
/// them (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE`); signals its own
/// failure on an eventfd.
fn fault_handler() -> Result<AllowList, BackendError> {
    let mut list = base()?;
    for nr in [libc::SYS_poll, libc::SYS_read, libc::SYS_pread64] {
        any(&mut list, nr);
    }
    ioctls(
        &mut list,
        &[
            uffd::UFFDIO_COPY(),
            uffd::UFFDIO_ZEROPAGE(),
            uffd::UFFDIO_WAKE(),
        ]
        .map(u64::from),
    )?;
    Ok(list)
}

/// The `--load_ws` prefetch thread: reads `ws` and places its pages;
/// closes `ws` as it ends.
fn prefetch() -> Result<AllowList, BackendError> {
    let mut list = base()?;
    any(&mut list, libc::SYS_pread64);
    any(&mut list, libc::SYS_close);
    ioctls(
        &mut list,
        &[uffd::UFFDIO_COPY(), uffd::UFFDIO_WAKE()].map(u64::from),
    )?;
    Ok(list)
}

/// Hashing the rootfs (opened before) for a booted VM's snapshot; closes
/// it as it ends.
fn rootfs_hash() -> Result<AllowList, BackendError> {
    let mut list = base()?;
    any(&mut list, libc::SYS_read);
    any(&mut list, libc::SYS_pread64);
    any(&mut list, libc::SYS_close);
    Ok(list)
}

/// The allow-list of `class`; the event loop's with the writer's calls when
/// `writes` (the VM writes a snapshot or a working set).
fn allow_list(class: ThreadClass, writes: bool) -> Result<AllowList, SeccompError> {
    let build = || match class {
        ThreadClass::Vcpu => vcpu(),
        ThreadClass::EventLoop => {
            let mut list = event_loop()?;
            if writes {
                writer(&mut list)?;
            }
            Ok(list)
        }
        ThreadClass::FaultHandler => fault_handler(),
        ThreadClass::Prefetch => prefetch(),
        ThreadClass::RootfsHash => rootfs_hash(),
    };
    build().map_err(|source| SeccompError::Build {
        class: class.name(),
        source,
    })
}

/// `class`'s filter: its allow-list, everything else traps.
fn compile(class: ThreadClass, writes: bool) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build {
        class: class.name(),
        source,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(err)?;
    let filter = SeccompFilter::new(
        allow_list(class, writes)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The compiled filters of this process, set once by [`enable`].
struct Filters {
    /// In the order of [`ThreadClass::ALL`] (the enum's).
    programs: Vec<BpfProgram>,
    /// The class whose threads make a forbidden call (test hook).
    #[cfg(feature = "test-hooks")]
    violate: Option<String>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Turns the filters on for this process: compiles every class's filter,
/// turns off heap trimming (see below) and installs the `SIGSYS` handler.
/// Call it before any thread starts;
/// from then on each thread's [`install`] confines it. `writes`: this VM
/// writes a snapshot or working set (see [`allow_list`]).
pub fn enable(writes: bool) -> Result<(), SeccompError> {
    let programs = ThreadClass::ALL
        .iter()
        .map(|&class| compile(class, writes))
        .collect::<Result<Vec<_>, SeccompError>>()?;
    // glibc opens /proc/sys/vm/overcommit_memory the first time it gives
    // the top of a thread's heap back to the kernel (`shrink_heap`), which
    // no filtered thread may. Never trimming heaps avoids it; it also pins
    // the mmap threshold at its default, so large blocks are still
    // unmapped when freed and only small ones stay in the heaps.
    // SAFETY: mallopt only sets malloc's tunables; no other thread exists.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) } != 1 {
        return Err(SeccompError::Malloc);
    }
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(SeccompError::Handler)?;
    FILTERS
        .set(Filters {
            programs,
            #[cfg(feature = "test-hooks")]
            violate: std::env::var(hooks::VIOLATE_ENV).ok(),
        })
        .map_err(|_| SeccompError::AlreadyEnabled)
}

thread_local! {
    /// This thread's name and class, for the `SIGSYS` handler (read there
    /// without allocating or locking: a plain thread-local copy).
    static THREAD: Cell<([u8; 16], &'static str)> = const { Cell::new(([0; 16], "none")) };
}

/// Confines the calling thread to `class`'s allow-list, if [`enable`] was
/// called (firerunner without `--no_seccomp`); otherwise does nothing.
pub fn install(class: ThreadClass) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let mut name = [0u8; 16];
    if let Ok(n) = nix::sys::prctl::get_name() {
        let bytes = n.as_bytes();
        let len = bytes.len().min(name.len());
        name[..len].copy_from_slice(&bytes[..len]);
    }
    THREAD.with(|t| t.set((name, class.name())));
    seccompiler::apply_filter(&filters.programs[class as usize]).map_err(|source| {
        SeccompError::Install {
            class: class.name(),
            source,
        }
    })?;
    #[cfg(feature = "test-hooks")]
    if filters.violate.as_deref() == Some(class.name()) {
        // SAFETY: getppid takes no arguments and has no side effects.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    Ok(())
}

/// A small stack buffer for the `SIGSYS` line: no allocation.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The `SIGSYS` part of `siginfo_t` (include/uapi/asm-generic/siginfo.h:
/// `_sigsys` in the union after three ints, 8-byte aligned on 64-bit).
#[repr(C)]
struct SigsysInfo {
    _signo: i32,
    _errno: i32,
    _code: i32,
    _pad: i32,
    _call_addr: *mut libc::c_void,
    syscall: i32,
    _arch: u32,
}

/// The violation line for syscall `nr` made by thread `name` of `class`.
fn violation_line(nr: i64, name: &[u8], class: &str) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    let name = name.split(|&b| b == 0).next().unwrap_or_default();
    line.push(b"firerunner: seccomp: thread ");
    line.push(name);
    line.push(b" (");
    line.push(class.as_bytes());
    line.push(b" filter) made a forbidden system call: ");
    line.push_num(nr as u64);
    if let Some(n) = syscall_name(nr) {
        line.push(b" (");
        line.push(n.as_bytes());
        line.push(b")");
    }
    line.push(b"; exiting with code ");
    line.push_num(VIOLATION_EXIT_CODE as u64);
    line.push(b"\n");
    line
}

/// `SIGSYS`: a thread made a forbidden call. Async-signal-safe: a stack
/// buffer, one `write(2)`, `_exit(2)`.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO
    // handler; for SIGSYS its union holds `_sigsys` at the offset
    // `SigsysInfo` mirrors, and reading plain integers from it is sound.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let (name, class) = THREAD.with(Cell::get);
    let line = violation_line(i64::from(nr), &name, class);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer
    // lives on this stack for the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(VIOLATION_EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles_and_names_its_calls() {
        // `Filters::programs` is indexed by the enum's value.
        for (i, class) in ThreadClass::ALL.into_iter().enumerate() {
            assert_eq!(class as usize, i);
        }
        for class in ThreadClass::ALL {
            for writes in [false, true] {
                let list = allow_list(class, writes).unwrap();
                for nr in list.keys() {
                    assert!(
                        syscall_name(*nr).is_some(),
                        "{class:?}: syscall {nr} unnamed"
                    );
                }
                for nr in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_execve] {
                    assert!(!list.contains_key(&nr), "{class:?} allows {nr}");
                }
                assert!(!compile(class, writes).unwrap().is_empty());
            }
        }
    }

    #[test]
    fn the_lists_have_the_sizes_the_readme_gives() {
        // README, Security / seccomp: change both together.
        let size = |class, writes| allow_list(class, writes).unwrap().len();
        assert_eq!(base().unwrap().len(), 19);
        assert_eq!(size(ThreadClass::Vcpu, false), 22);
        assert_eq!(size(ThreadClass::EventLoop, false), 35);
        assert_eq!(size(ThreadClass::EventLoop, true), 48);
        assert_eq!(size(ThreadClass::FaultHandler, false), 23);
        assert_eq!(size(ThreadClass::Prefetch, false), 22);
        assert_eq!(size(ThreadClass::RootfsHash, false), 22);
        let ioctls = |class, writes| allow_list(class, writes).unwrap()[&libc::SYS_ioctl].len();
        assert_eq!(ioctls(ThreadClass::Vcpu, false), 14);
        assert_eq!(ioctls(ThreadClass::EventLoop, false), 1);
        assert_eq!(ioctls(ThreadClass::EventLoop, true), 5);
    }

    /// Runs `f` in a forked child confined by `class`'s filter (no SIGSYS
    /// handler: a trap kills it with SIGSYS) and returns the signal that
    /// ended the child, if one did.
    fn in_confined_child(class: ThreadClass, f: fn()) -> Option<i32> {
        // SAFETY: the child only builds and installs the filter (in its own
        // process: the filter names its pid; glibc's malloc works after a
        // fork) and runs `f`, then exits without returning into the test
        // harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let installed = compile(class, false)
                .ok()
                .is_some_and(|p| seccompiler::apply_filter(&p).is_ok());
            if !installed {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(2) };
            }
            f();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) || libc::WEXITSTATUS(status) == 0,
            "the child exited {}",
            libc::WEXITSTATUS(status)
        );
        libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
    }

    #[test]
    fn a_forbidden_call_traps_and_a_panics_abort_still_aborts() {
        let forbidden = || {
            // SAFETY: getppid takes no arguments and has no side effects.
            unsafe { libc::syscall(libc::SYS_getppid) };
        };
        for class in ThreadClass::ALL {
            assert_eq!(in_confined_child(class, forbidden), Some(libc::SIGSYS));
            assert_eq!(
                in_confined_child(class, || std::process::abort()),
                Some(libc::SIGABRT),
                "{class:?}"
            );
        }
    }

    #[test]
    fn the_violation_line_names_the_call_and_thread() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        let line = violation_line(libc::SYS_getppid, &name, "vcpu");
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            format!(
                "firerunner: seccomp: thread vcpu0 (vcpu filter) made a forbidden system call: \
                 {} (getppid); exiting with code 148\n",
                libc::SYS_getppid
            )
        );
        let line = violation_line(99_999, &name, "vcpu");
        assert!(std::str::from_utf8(&line.buf[..line.len])
            .unwrap()
            .contains("system call: 99999; exiting"));
    }
}
