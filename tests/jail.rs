//! The jail (src/jail/) on real KVM with testguest: what a jailed
//! firerunner is and sees, that it stops on SIGTERM and leaves nothing on
//! any exit, and that a jailed VM snapshots, restores and serves exactly
//! like an unjailed one. The tests run as root, as the jail needs.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    app_image, descendants_named, firerunner, run_singlevm, singlevm, testguest, Scratch,
};
use serde_json::{json, Value};
use snapvm::jail::cgroup::Cgroup;

const LIMIT: Duration = Duration::from_secs(120);
/// The default `vm_overhead` singlevm gives a VM's cgroup.
const OVERHEAD_MIB: u64 = snapvm::multivm::config::DEFAULT_VM_OVERHEAD_MIB;

fn jailer() -> &'static str {
    env!("CARGO_BIN_EXE_jailer")
}

/// A uid range of its own for each test process, far from the default.
fn uid_base() -> u32 {
    700_000 + (std::process::id() % 10_000) * 16
}

/// `/proc/PID/status` field `name`, whitespace-split.
fn status(pid: u32, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Polls for `pid`'s firerunner descendant.
fn firerunner_under(pid: u32) -> u32 {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(p) = descendants_named(pid, "firerunner").first() {
            return *p;
        }
        assert!(Instant::now() < deadline, "no firerunner under {pid}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A singlevm serving testguest's `fn` with the jail options of `jails`,
/// its stdin held open.
struct Serving {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Serving {
    fn start(s: &Scratch, function: &str, jails: &Path, uid_count: u32) -> Serving {
        let rootfs = s.file("rootfs.img", &[0u8; 4096]);
        let app = app_image(s, &format!("{function}.img"), &[&format!("fn={function}")]);
        let mut child = Command::new(singlevm())
            .arg("--kernel")
            .arg(testguest())
            .arg("--rootfs")
            .arg(&rootfs)
            .arg("--appfs")
            .arg(&app)
            .arg("--jail_dir")
            .arg(jails)
            .args(["--jail_uid_base", &uid_base().to_string()])
            .args(["--jail_uid_count", &uid_count.to_string()])
            .env("TMPDIR", &s.0)
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Serving {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, request: &str) -> Value {
        writeln!(self.stdin, "{request}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

#[test]
fn a_jailed_firerunner_has_its_own_uid_no_capabilities_root_cgroup_and_limits() {
    let s = Scratch::new("jail-walls");
    let jails = s.path("jails");
    let mut vm = Serving::start(&s, "hello", &jails, 4);
    assert_eq!(
        vm.call(r#"{"name":"jail"}"#),
        json!({"message": "hello, jail"})
    );
    let pid = firerunner_under(vm.child.id());

    // Its own uid and gid from the range, no capabilities, pid 1.
    let uid: u32 = status(pid, "Uid")[0].parse().unwrap();
    assert!((uid_base()..uid_base() + 4).contains(&uid), "uid {uid}");
    assert_eq!(status(pid, "Uid"), vec![uid.to_string(); 4]);
    assert_eq!(status(pid, "Gid"), vec![uid.to_string(); 4]);
    assert!(status(pid, "Groups").is_empty());
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status(pid, caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), ["1"]);
    assert_eq!(status(pid, "NSpid").last().map(String::as_str), Some("1"));
    // No jailer stays beside it (its memory would count per VM): the
    // controller is firerunner's parent.
    assert_eq!(status(pid, "PPid"), [vm.child.id().to_string()]);
    assert!(descendants_named(vm.child.id(), "jailer").is_empty());

    // Its root is the jail: only what the VM needs, read-only.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut expected: Vec<String> = ["appfs", "dev", "firerunner", "kernel", "rootfs", "vsock"]
        .map(String::from)
        .to_vec();
    for lib in snapvm::jail::libraries(Path::new(firerunner()), &jails).unwrap() {
        let top = lib.components().nth(1).unwrap();
        expected.push(top.as_os_str().to_string_lossy().into_owned());
    }
    expected.sort();
    expected.dedup();
    assert_eq!(common::dir_entries(&root), expected);
    let mut devices = vec!["kvm".to_string()];
    if Path::new("/dev/userfaultfd").exists() {
        devices.push("userfaultfd".into());
    }
    assert_eq!(common::dir_entries(&root.join("dev")), devices);
    for d in &devices {
        let m = std::fs::metadata(root.join("dev").join(d)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (uid, uid, 0o600),
            "{d}"
        );
    }
    // Its one writable directory holds the vsock sockets alone: the console
    // file the controller reads stays out of its reach.
    assert_eq!(
        common::dir_entries(&root.join("vsock")),
        ["vsock", "vsock_1234"]
    );
    let m = std::fs::metadata(root.join("vsock")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, uid));
    // Nothing of the host: not the scratch directory, /proc, /etc, /tmp.
    for p in [
        s.0.strip_prefix("/").unwrap(),
        Path::new("proc"),
        Path::new("etc"),
        Path::new("tmp"),
    ] {
        assert!(!root.join(p).exists(), "{} is in the jail", p.display());
    }
    // Read-only even for root: the jail's root and the disks.
    let refused = std::fs::write(root.join("planted"), b"x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("rootfs"));
    assert_eq!(disk.unwrap_err().raw_os_error(), Some(libc::EROFS));

    // Only RUST_LOG may reach it (singlevm had TMPDIR).
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
    // Its rlimits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| -> String {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(limit("Max open files"), "2048");
    assert_eq!(limit("Max file size"), ((128u64 + 64) << 20).to_string());

    // Its cgroup: guest memory + overhead, pids, CPU weight.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mine = format!("/snapvm/{uid}");
    assert!(
        cgroups.lines().any(|l| l.ends_with(&mine)),
        "{pid} not in {mine}:\n{cgroups}"
    );
    let cg = Cgroup::named(&uid.to_string()).unwrap();
    let l = cg.limits().unwrap();
    assert_eq!(l.memory_bytes, (128 + OVERHEAD_MIB) << 20);
    assert_eq!((l.pids, l.cpu_weight), (1 + 16, 100));

    let jail = jails.join(uid.to_string());
    assert!(jail.join("root").is_dir());
    drop(vm.stdin);
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!jail.exists(), "{} left behind", jail.display());
    assert!(cg.limits().is_err(), "the cgroup is left behind");
}

/// The jailer run directly (no controller), on testguest's hello.
fn jailer_on(s: &Scratch, uid: u32) -> (Child, PathBuf) {
    let rootfs = s.file("rootfs.img", &[0u8; 4096]);
    let app = app_image(s, "hello.img", &["fn=hello"]);
    let jail = s.path("jails").join(uid.to_string());
    // A controller's runtime directory, handed to the VM's uid.
    let run = s.path(&format!("run-{uid}"));
    std::fs::create_dir_all(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(uid), Some(uid)).unwrap();
    let mut cmd = Command::new(jailer());
    cmd.args(["--uid", &uid.to_string(), "--vm_overhead", "8"])
        .arg("--jail_dir")
        .arg(&jail);
    let libs = snapvm::jail::libraries(Path::new(firerunner()), &s.0).unwrap();
    for lib in libs {
        cmd.arg("--lib").arg(lib);
    }
    cmd.arg("--")
        .arg(firerunner())
        .arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--appfs")
        .arg(&app)
        .arg("--vsock_uds")
        .arg(run.join("vsock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    (cmd.spawn().unwrap(), jail)
}

/// Waits for `child` to end within LIMIT.
fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid of a process this test started, still
    // running (a jailer not reaped yet, or its firerunner).
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn sigterm_stops_a_jailed_firerunner_with_143_whoever_receives_it() {
    let s = Scratch::new("jail-term");
    let uid = uid_base() + 8;
    // firerunner is pid 1 of its namespace, which drops signals it has no
    // handler for: its signalfd must still take SIGTERM.
    let (mut jailer, jail) = jailer_on(&s, uid);
    let pid = firerunner_under(jailer.id());
    std::thread::sleep(Duration::from_millis(300));
    signal(pid, libc::SIGTERM);
    assert_eq!(wait(&mut jailer).code(), Some(143));
    assert!(!jail.exists());
    // The jailer passes it on.
    let (mut jailer, jail) = jailer_on(&s, uid);
    firerunner_under(jailer.id());
    std::thread::sleep(Duration::from_millis(300));
    signal(jailer.id(), libc::SIGTERM);
    assert_eq!(wait(&mut jailer).code(), Some(143));
    assert!(!jail.exists());
}

#[test]
fn kill_9_leaves_no_jail_and_a_leftover_is_removed_by_the_next_start() {
    let s = Scratch::new("jail-kill");
    // kill -9 of firerunner: its jailer removes the jail and cgroup, and
    // dies of the same signal.
    let uid = uid_base() + 9;
    let (mut jailer, jail) = jailer_on(&s, uid);
    let pid = firerunner_under(jailer.id());
    assert!(jail.join("root").is_dir());
    signal(pid, libc::SIGKILL);
    assert_eq!(wait(&mut jailer).signal(), Some(libc::SIGKILL));
    assert!(!jail.exists(), "{} left behind", jail.display());
    assert!(Cgroup::named(&uid.to_string()).unwrap().limits().is_err());

    // kill -9 of the controller: nobody is left to clean up. Its jailed
    // firerunner (its own child: the jailer detached) stops when the
    // control channel closes; the jail stays until the next start of a
    // VM in the same slot (a range of one uid here).
    let jails = s.path("slots");
    let mut vm = Serving::start(&s, "hello", &jails, 1);
    assert_eq!(vm.call("{}"), json!({"message": "hello, world"}));
    let fr = firerunner_under(vm.child.id());
    signal(vm.child.id(), libc::SIGKILL);
    let _ = vm.child.wait();
    let deadline = Instant::now() + LIMIT;
    while Path::new(&format!("/proc/{fr}/status")).exists()
        && !status(fr, "State")[0].starts_with('Z')
    {
        assert!(
            Instant::now() < deadline,
            "firerunner outlived its controller"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let leftover = jails.join(uid_base().to_string());
    assert!(leftover.join("root").is_dir(), "no leftover to clean");
    std::fs::write(leftover.join("marker"), b"stale").unwrap();

    let mut vm = Serving::start(&s, "hello", &jails, 1);
    assert_eq!(vm.call("{}"), json!({"message": "hello, world"}));
    assert!(
        !leftover.join("marker").exists(),
        "the leftover was not removed"
    );
    drop(vm.stdin);
    assert_eq!(vm.child.wait().unwrap().code(), Some(0));
    assert!(!leftover.exists());
}

/// The SnapFaaS workflow (language snapshot, diff, lazy and eager
/// restores, working set recorded and loaded) with `jail` flags; the
/// answers of every serving step.
fn workflow(s: &Scratch, dir: &str, jail: &[&str]) -> Vec<Vec<Value>> {
    let root = s.file("rootfs.img", &[3u8; 4096]);
    let app = app_image(s, "touch.img", &["fn=touch", "mib=4"]);
    let snaps = s.path(dir);
    let (base, diff) = (snaps.join("base"), snaps.join("diff/touch"));
    let (r, a) = (root.display().to_string(), app.display().to_string());
    let (b, d) = (base.display().to_string(), diff.display().to_string());
    let run = |args: &[&str], input: &str| {
        let mut all = vec!["--rootfs", r.as_str()];
        all.extend_from_slice(jail);
        all.extend_from_slice(args);
        let out = run_singlevm(s, &all, input, LIMIT);
        assert_eq!(out.code(), Some(0), "{args:?}:\n{}", out.stderr);
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect::<Vec<Value>>()
    };
    run(&["--dump_dir", &b, "--force_exit"], "");
    run(
        &[
            "--appfs",
            &a,
            "--load_dir",
            &b,
            "--dump_dir",
            &d,
            "--force_exit",
        ],
        "",
    );
    let requests = "{}\n{\"mib\": 2}\n";
    let stack = ["--appfs", &a, "--load_dir", &b, "--diff_dirs", &d];
    vec![
        run(&["--appfs", &a], requests),
        run(&stack, requests),
        run(
            &[&stack[..], &["--copy_base", "--copy_diff"]].concat(),
            requests,
        ),
        run(&[&stack[..], &["--dump_ws"]].concat(), "{}\n"),
        run(&[&stack[..], &["--load_ws"]].concat(), requests),
    ]
}

#[test]
fn a_jailed_vm_snapshots_restores_and_serves_like_an_unjailed_one() {
    let s = Scratch::new("jail-workflow");
    let jails = s.path("jails").display().to_string();
    let base = uid_base().to_string();
    let jailed = workflow(
        &s,
        "jailed",
        &["--jail_dir", &jails, "--jail_uid_base", &base],
    );
    let unjailed = workflow(&s, "unjailed", &["--no_jail"]);
    assert_eq!(jailed, unjailed);
    assert_eq!(jailed[0][0]["touched_mib"], 4, "{jailed:?}");
    // What the jailed VMs wrote is in place, readable by every VM uid,
    // and no staging directory is left.
    let diff = s.path("jailed/diff/touch");
    for f in ["snapshot.json", "memory", "ws", "ws.json"] {
        let mode = std::fs::metadata(diff.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o444, 0o444, "{f}: {mode:o}");
    }
    let mut stack = vec![s.path("jailed")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.contains("snapvm-jail"), "{} left", e.path().display());
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    // No jail directory is left: only the slots' locks and the cached
    // list of firerunner's libraries.
    let left = common::dir_entries(&s.path("jails"));
    assert!(
        left.iter()
            .all(|e| e == "slots" || e.starts_with("libraries-")),
        "{left:?}"
    );
}

/// A file the VM's uid cannot read is refused before the jail is built,
/// naming the host path, not the in-jail one firerunner would see: a disk
/// image, and a file inside a snapshot layer. Root outside the jail reads
/// both.
#[test]
fn files_the_vm_uid_cannot_read_are_named_before_the_vm_starts() {
    let s = Scratch::new("jail-unreadable");
    let jails = s.path("jails").display().to_string();
    let uids = uid_base().to_string();
    let jail = ["--jail_dir", jails.as_str(), "--jail_uid_base", &uids];
    let root = s.file("rootfs.img", &[3u8; 4096]);
    let app = app_image(&s, "hello.img", &["fn=hello"]);
    let base = s.path("base");
    let (r, a, b) = (
        root.display().to_string(),
        app.display().to_string(),
        base.display().to_string(),
    );
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let refused = |args: &[&str], path: &Path| {
        let out = run_singlevm(&s, &[&jail[..], args].concat(), "{}\n", LIMIT);
        assert_ne!(out.code(), Some(0), "{args:?} ran:\n{}", out.stderr);
        let want = format!("{} is not readable by the VM's uid", path.display());
        assert!(
            out.stderr.contains(&want),
            "{args:?}: no {want:?} in:\n{}",
            out.stderr
        );
    };
    chmod(&root, 0o600);
    refused(&["--rootfs", &r, "--appfs", &a], &root);
    let out = run_singlevm(
        &s,
        &["--no_jail", "--rootfs", &r, "--appfs", &a],
        "{}\n",
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "unjailed:\n{}", out.stderr);
    chmod(&root, 0o644);
    let out = run_singlevm(
        &s,
        &[
            "--no_jail",
            "--rootfs",
            &r,
            "--dump_dir",
            &b,
            "--force_exit",
        ],
        "",
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "snapshot:\n{}", out.stderr);
    let memory = base.join("memory");
    chmod(&memory, 0o600);
    refused(&["--rootfs", &r, "--appfs", &a, "--load_dir", &b], &memory);
    chmod(&memory, 0o644);
    let out = run_singlevm(
        &s,
        &[
            &jail[..],
            &["--rootfs", &r, "--appfs", &a, "--load_dir", &b],
        ]
        .concat(),
        "{}\n",
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "readable again:\n{}", out.stderr);
}
