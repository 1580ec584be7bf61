//! VM shells (`firerunner shell`) on real KVM with testguest: a shell
//! built before the snapshot is known, then restored from full snapshots,
//! base + diff stacks and working sets, answers as a fresh restore of the
//! same snapshot does (`count` answers from the memory it restored, so the
//! guest saw the snapshot's bytes, not the placeholder's zeros); clones
//! differ in randomness; bad commands are refused and leave the shell
//! waiting; a snapshot of another shape ends it with the reason.

mod common;

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{app_image, firerunner, testguest, Scratch};
use serde_json::Value;
use snapvm::control::{AfterSnapshot, Command, Event, RestoreRequest};
use snapvm::jail::JailOptions;
use snapvm::launcher::{self, Launch, VmProcess};

const LIMIT: Duration = Duration::from_secs(60);

/// A VM and its guest agent's connection.
struct Vm {
    process: VmProcess,
    agent: UnixStream,
}

fn launch(args: Vec<OsString>) -> Launch {
    Launch {
        firerunner: PathBuf::from(firerunner()),
        vm_args: args,
        console: None,
        jail: None,
        network: false,
    }
}

impl Vm {
    /// firerunner with testguest and `args`, booted or restored.
    fn fresh(s: &Scratch, args: &[&str]) -> Vm {
        let mut a: Vec<OsString> = vec!["--kernel".into(), testguest().into()];
        a.extend(["--rootfs".into(), rootfs(s).into()]);
        a.extend(args.iter().map(Into::into));
        Vm::connect(VmProcess::spawn(&launch(a)).expect("spawn firerunner"))
    }

    fn connect(mut process: VmProcess) -> Vm {
        let agent = match process.wait_for_guest(LIMIT) {
            Ok(a) => a,
            Err(e) => panic!("{e}\n{}", process.failure_detail()),
        };
        launcher::handshake(&agent, Some(Instant::now() + LIMIT)).expect("handshake");
        Vm { process, agent }
    }

    fn call(&mut self, request: &str) -> Value {
        let deadline = Some(Instant::now() + LIMIT);
        let body = self
            .process
            .call(&self.agent, request.as_bytes(), deadline)
            .unwrap_or_else(|e| panic!("{request}: {e:?}\n{}", self.process.failure_detail()));
        serde_json::from_slice(&body).unwrap()
    }

    /// The first event `pick` accepts.
    fn event<T>(&self, what: &str, pick: impl Fn(Event) -> Option<T>) -> T {
        let deadline = Instant::now() + LIMIT;
        loop {
            match self.process.events().recv_deadline(deadline) {
                Ok(e) => {
                    if let Some(t) = pick(e) {
                        return t;
                    }
                }
                Err(e) => panic!("no {what}: {e}\n{}", self.process.failure_detail()),
            }
        }
    }

    fn snapshot_and_exit(mut self, name: &str) {
        self.process
            .command(&Command::Snapshot {
                name: name.into(),
                then: AfterSnapshot::Exit,
            })
            .unwrap();
        let status = self.process.wait_for_exit(LIMIT).unwrap();
        assert!(status.success(), "{}", self.process.failure_detail());
    }
}

/// A shell of 128 MiB and 1 vCPU unless `extra` (more shell flags) says
/// otherwise, ready.
fn shell(extra: &[&str]) -> VmProcess {
    let mut a: Vec<OsString> = vec!["shell".into()];
    if !extra.contains(&"--mem_size") {
        a.extend(["--mem_size".into(), "128".into()]);
    }
    a.extend(extra.iter().map(Into::into));
    let process = VmProcess::spawn(&launch(a)).expect("spawn firerunner shell");
    match process.events().recv_deadline(Instant::now() + LIMIT) {
        Ok(Event::ShellReady { .. }) => process,
        Ok(e) => panic!("a shell said {e:?} before it was ready"),
        Err(e) => panic!("the shell never became ready: {e}"),
    }
}

/// The rootfs every VM here uses, written once: rewriting it under a VM
/// that reads or verifies it would change its disk.
fn rootfs(s: &Scratch) -> PathBuf {
    let path = s.path("rootfs.img");
    if !path.exists() {
        s.file("rootfs.img", &[7u8; 4096]);
    }
    path
}

fn request(s: &Scratch, app: &Path, layers: &[&Path]) -> RestoreRequest {
    RestoreRequest {
        rootfs: rootfs(s),
        appfs: Some(app.to_path_buf()),
        layers: layers.iter().map(|l| l.to_path_buf()).collect(),
        ..Default::default()
    }
}

/// `shell` restored as `r` asks, connected.
fn restore(process: VmProcess, r: RestoreRequest) -> Vm {
    process.restore(&r).unwrap();
    Vm::connect(process)
}

fn joined(layers: &[&Path]) -> String {
    let v: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
    v.join(",")
}

/// testguest's `count` snapshotted after 2 requests (`two`, full), and a
/// diff layer over it after one more (`two+1`); `want[n]` is a VM's answer
/// to its request n + 1.
fn count_snapshots(s: &Scratch) -> (PathBuf, PathBuf, PathBuf, Vec<Value>) {
    let app = app_image(s, "count.img", &["fn=count"]);
    let snaps = s.path("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let (a, d) = (app.to_str().unwrap(), snaps.to_str().unwrap());
    let mut vm = Vm::fresh(s, &["--appfs", a, "--snapshot_dir", d]);
    let want: Vec<Value> = (0..6).map(|_| vm.call("{}")).collect();
    drop(vm);
    let mut vm = Vm::fresh(s, &["--appfs", a, "--snapshot_dir", d]);
    assert_eq!([vm.call("{}"), vm.call("{}")], want[..2]);
    vm.snapshot_and_exit("two");
    let two = snaps.join("two");
    let mut vm = Vm::fresh(s, &["--appfs", a, "--load_dir", &joined(&[&two])]);
    assert_eq!(vm.call("{}"), want[2]);
    drop(vm);
    let two_s = two.to_str().unwrap();
    let mut vm = Vm::fresh(s, &["--appfs", a, "--load_dir", two_s, "--snapshot_dir", d]);
    assert_eq!(vm.call("{}"), want[2]);
    vm.snapshot_and_exit("two+1");
    (app, two, snaps.join("two+1"), want)
}

#[test]
fn shells_restore_full_diff_and_working_set_snapshots_as_fresh_restores_do() {
    let s = Scratch::new("shell-modes");
    let (app, two, diff, want) = count_snapshots(&s);
    let copy = |mut r: RestoreRequest, base: bool, diffs: bool| {
        r.copy_base = base;
        r.copy_diff = diffs;
        r
    };
    let cases = [
        ("full, lazy", request(&s, &app, &[&two]), 2),
        (
            "full, copied",
            copy(request(&s, &app, &[&two]), true, false),
            2,
        ),
        ("base + diff, lazy", request(&s, &app, &[&two, &diff]), 3),
        (
            "base + diff, copied",
            copy(request(&s, &app, &[&two, &diff]), true, true),
            3,
        ),
    ];
    for (what, r, next) in cases {
        let mut vm = restore(shell(&[]), r);
        assert_eq!(vm.call("{}"), want[next], "{what}");
        assert_eq!(vm.call("{}"), want[next + 1], "{what}");
    }

    // A working set recorded in a shell, then loaded into another.
    let mut r = request(&s, &app, &[&two, &diff]);
    r.dump_ws = Some(String::new());
    let mut vm = restore(shell(&[]), r);
    assert_eq!(vm.call("{}"), want[3]);
    vm.process.command(&Command::WsDone).unwrap();
    let pages = vm.event("ws_written", |e| match e {
        Event::WsWritten { pages, .. } => Some(pages),
        Event::WsFailed { reason, .. } => panic!("working set not written: {reason}"),
        _ => None,
    });
    assert!(pages > 0);
    drop(vm);
    let mut r = request(&s, &app, &[&two, &diff]);
    r.load_ws = true;
    let mut vm = restore(shell(&[]), r);
    assert_eq!(vm.call("{}"), want[3], "working set loaded");
    assert_eq!(vm.call("{}"), want[4], "working set loaded");
}

/// A shell registered with a dirty log (`--snapshot_dir`) takes a diff
/// layer of only what the guest wrote after the restore into it.
#[test]
fn a_shell_with_a_snapshot_dir_takes_diff_layers_over_what_it_restored() {
    let s = Scratch::new("shell-diff");
    let (app, two, diff, want) = count_snapshots(&s);
    let snaps = s.path("shell-snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let sh = shell(&["--snapshot_dir", snaps.to_str().unwrap()]);
    let mut vm = restore(sh, request(&s, &app, &[&two, &diff]));
    assert_eq!(vm.call("{}"), want[3]);
    vm.snapshot_and_exit("top");
    let top = snaps.join("top");
    let blocks =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(top.join("memory")).unwrap());
    assert!(blocks * 512 < 8 << 20, "a diff layer of {} KiB", blocks / 2);
    let a = app.to_str().unwrap();
    let mut vm = Vm::fresh(
        &s,
        &["--appfs", a, "--load_dir", &joined(&[&two, &diff, &top])],
    );
    assert_eq!(vm.call("{}"), want[4]);
}

#[test]
fn two_shells_restored_from_one_snapshot_differ_in_randomness() {
    let s = Scratch::new("shell-random");
    let app = app_image(&s, "random.img", &["fn=random"]);
    let snaps = s.path("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let (a, d) = (app.to_str().unwrap(), snaps.to_str().unwrap());
    let mut vm = Vm::fresh(&s, &["--appfs", a, "--snapshot_dir", d]);
    vm.call("{}");
    vm.snapshot_and_exit("r");
    let r = snaps.join("r");
    let (one, other) = (shell(&[]), shell(&[]));
    one.restore(&request(&s, &app, &[&r])).unwrap();
    other.restore(&request(&s, &app, &[&r])).unwrap();
    let (mut one, mut other) = (Vm::connect(one), Vm::connect(other));
    let (x, y) = (one.call("{}"), other.call("{}"));
    assert!(x["random"].is_string(), "{x}");
    assert_ne!(x["random"], y["random"], "clones share their randomness");
}

#[test]
fn bad_restore_commands_are_refused_and_the_shell_waits_for_a_good_one() {
    let s = Scratch::new("shell-refusals");
    let (app, two, diff, want) = count_snapshots(&s);
    let sh = shell(&[]);
    let refused = |sh: &VmProcess, r: RestoreRequest, why: &str| {
        sh.restore(&r).unwrap();
        match sh.events().recv_deadline(Instant::now() + LIMIT) {
            Ok(Event::RestoreFailed { reason, .. }) => {
                assert!(reason.contains(why), "{reason:?} does not say {why:?}")
            }
            other => panic!("{other:?}: not refused ({why})"),
        }
    };
    refused(&sh, request(&s, &app, &[]), "at least one layer");
    refused(
        &sh,
        RestoreRequest {
            copy_diff: true,
            ..request(&s, &app, &[&two])
        },
        "--copy_diff needs a diff layer",
    );
    let comma = PathBuf::from(format!("{},x", two.display()));
    refused(&sh, request(&s, &app, &[&comma]), "comma");
    refused(
        &sh,
        RestoreRequest {
            dump_ws: Some(String::new()),
            load_ws: true,
            ..request(&s, &app, &[&two])
        },
        "cannot be combined",
    );
    // A running VM is no shell.
    let mut vm = restore(sh, request(&s, &app, &[&two, &diff]));
    assert_eq!(vm.call("{}"), want[3]);
    vm.process.restore(&request(&s, &app, &[&two])).unwrap();
    let reason = vm.event("restore_failed", |e| match e {
        Event::RestoreFailed { reason, .. } => Some(reason),
        _ => None,
    });
    assert!(reason.contains("only a shell restores"), "{reason}");
    assert_eq!(vm.call("{}"), want[4], "the VM runs on");
}

/// What a shell that cannot restore `r` says as it exits.
fn ends_with(r: RestoreRequest, shell_flags: &[&str]) -> String {
    let mut sh = shell(shell_flags);
    sh.restore(&r).unwrap();
    let status = sh.wait_for_exit(LIMIT).expect("the shell exits");
    assert_eq!(status.code(), Some(1), "{}", sh.failure_detail());
    sh.failure_detail()
}

#[test]
fn a_snapshot_a_shell_cannot_restore_ends_it_with_the_reason() {
    let s = Scratch::new("shell-mismatch");
    let (app, two, diff, _) = count_snapshots(&s);
    // Another shape: the snapshot is of 128 MiB, this shell of 64.
    let why = ends_with(request(&s, &app, &[&two]), &["--mem_size", "64"]);
    assert!(
        why.contains("guest RAM is 67108864 (truncated, or another --mem_size)"),
        "{why}"
    );
    let why = ends_with(request(&s, &app, &[&two]), &["--vcpu_count", "2"]);
    assert!(why.contains("--vcpu_count"), "{why}");
    // A layer that is not there, and a diff without its base.
    let gone = s.path("no-such-snapshot");
    let why = ends_with(request(&s, &app, &[&gone]), &[]);
    assert!(why.contains("no-such-snapshot"), "{why}");
    let why = ends_with(request(&s, &app, &[&diff]), &[]);
    assert!(why.contains("diff snapshot"), "{why}");
    // Another rootfs than the snapshot's.
    let mut r = request(&s, &app, &[&two]);
    r.rootfs = s.file("other-rootfs.img", &[8u8; 8192]);
    let why = ends_with(r, &[]);
    assert!(why.contains("rootfs"), "{why}");
}

fn jail_options(s: &Scratch) -> JailOptions {
    JailOptions {
        jailer: PathBuf::from(env!("CARGO_BIN_EXE_jailer")),
        base: s.path("jails"),
        uid_base: 720_000 + (std::process::id() % 10_000) * 16,
        uid_count: 16,
        vm_overhead_mib: snapvm::multivm::config::DEFAULT_VM_OVERHEAD_MIB,
    }
}

/// A jailed shell is shown the layers and disks of its restore through its
/// inbox (read-only bind mounts the controller makes after the shell
/// started), restores lazily or with a working set, and when it ends its
/// jail goes without taking a byte of the snapshot with it.
#[test]
fn a_jailed_shell_restores_what_its_controller_shows_it_and_the_layers_stay_whole() {
    let s = Scratch::new("shell-jail");
    let (app, two, diff, want) = count_snapshots(&s);
    let jail = jail_options(&s);
    let jailed = || {
        let a = vec!["shell".into(), "--mem_size".into(), "128".into()];
        let process = VmProcess::spawn(&Launch {
            jail: Some(jail.clone()),
            network: false,
            ..launch(a)
        })
        .expect("spawn a jailed shell");
        match process.events().recv_deadline(Instant::now() + LIMIT) {
            Ok(Event::ShellReady { .. }) => process,
            other => panic!("the jailed shell is not ready: {other:?}"),
        }
    };
    let before: Vec<(PathBuf, u64)> = [&two, &diff]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::metadata(&p).unwrap().len()))
        .collect();

    let mut vm = restore(jailed(), request(&s, &app, &[&two, &diff]));
    assert_eq!(vm.call("{}"), want[3]);
    // It runs as a uid of the jail's range (other tests' VMs run as root).
    let uids = jail.uid_base..jail.uid_base + jail.uid_count;
    let jailed_vms = common::descendants_named(std::process::id(), "firerunner")
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|st| {
            let line = st.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u32>().ok()
        })
        .filter(|uid| uids.contains(uid))
        .count();
    assert_eq!(jailed_vms, 1, "the shell's VM is not jailed");
    assert_eq!(vm.call("{}"), want[4]);
    drop(vm);

    // A working set recorded unjailed, loaded by a jailed shell.
    let mut r = request(&s, &app, &[&two, &diff]);
    r.dump_ws = Some(String::new());
    let mut vm = restore(shell(&[]), r);
    assert_eq!(vm.call("{}"), want[3]);
    vm.process.command(&Command::WsDone).unwrap();
    vm.event("ws_written", |e| match e {
        Event::WsWritten { .. } => Some(()),
        Event::WsFailed { reason, .. } => panic!("working set not written: {reason}"),
        _ => None,
    });
    drop(vm);
    let mut r = request(&s, &app, &[&two, &diff]);
    r.load_ws = true;
    let mut vm = restore(jailed(), r);
    assert_eq!(vm.call("{}"), want[3], "working set loaded in a jail");
    drop(vm);

    // Recording a working set is refused before the shell hears of it.
    let sh = jailed();
    let mut r = request(&s, &app, &[&two]);
    r.dump_ws = Some(String::new());
    let e = sh.restore(&r).unwrap_err().to_string();
    assert!(e.contains("cannot record a working set"), "{e}");
    drop(sh);

    for (path, len) in before {
        let now = std::fs::metadata(&path).map(|m| m.len());
        assert_eq!(now.ok(), Some(len), "{} changed", path.display());
    }
    let left: Vec<_> = std::fs::read_dir(s.path("jails"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "slots" && !n.starts_with("libraries-"))
        .collect();
    assert!(left.is_empty(), "jails left behind: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let jails = s.path("jails").display().to_string();
    assert!(!mounts.contains(&jails), "inbox mounts left:\n{mounts}");
}
