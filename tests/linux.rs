//! Linux guests end to end: our release kernel, the python3 and nodejs root
//! images and their agents, booted and restored by firerunner on a KVM that
//! runs Linux guests.
//!
//! Every test here is `#[ignore]`d in a plain `cargo test`, since the KVM of
//! our development machines cannot run a Linux guest to userspace.
//! `scripts/linux-test.sh` runs them inside the emulated KVM host
//! (`scripts/kvm-host.sh`), in one QEMU boot, after
//! `scripts/mk-snapshots.sh` has made the snapshot tree they restore from
//! (its language snapshots, diff snapshots and working sets are part of
//! what is tested). They read where things are from the environment:
//! `SNAPVM_BIN` (firerunner, singlevm, multivm), `SNAPVM_LINUX_TREE` (the
//! tree) and `SNAPVM_LINUX_DATA` (`answers/<function>.answers`, the host
//! tests' answers to `requests/<function>.json`, and `probe-python3.ext2`,
//! the app image of tests/linux/probe-python3).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::daemon::Daemon;
use common::{dir_entries, http_with, ip, run_with_input, Outcome, Scratch};
use serde_json::{json, Value};

/// How long one singlevm run may take (a nodejs boot takes ~15 s inside
/// the emulated host; everything else is faster).
const LIMIT: Duration = Duration::from_secs(240);

fn env_dir(name: &str) -> PathBuf {
    let dir = std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: run these tests with scripts/linux-test.sh"));
    assert!(dir.is_dir(), "{name}={} is not a directory", dir.display());
    dir
}

fn bin(name: &str) -> PathBuf {
    env_dir("SNAPVM_BIN").join(name)
}

fn tree() -> PathBuf {
    env_dir("SNAPVM_LINUX_TREE")
}

fn data() -> PathBuf {
    env_dir("SNAPVM_LINUX_DATA")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("paths here are UTF-8")
}

/// The language snapshot of a function, as mk-snapshots.sh names it: its
/// root image's label, `@net` when it has a network.
fn language(function: &str) -> &'static str {
    match function {
        "thumbnail-python3" => "python3+python3-pil",
        "fetch-python3" => "python3@net",
        f if f.ends_with("-nodejs") => "nodejs",
        _ => "python3",
    }
}

/// The root image of a function's language snapshot.
fn image(function: &str) -> PathBuf {
    let label = language(function).trim_end_matches("@net");
    tree().join(format!("images/{label}.ext4"))
}

/// A function's VM in the tree: kernel, root image and app image, and a
/// network for a function that has one.
fn vm_args(function: &str, app: &Path) -> Vec<String> {
    let t = tree();
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        path_str(&t.join("vmlinux")).into(),
        "--rootfs".into(),
        path_str(&image(function)).into(),
        "--appfs".into(),
        path_str(app).into(),
    ];
    if language(function).ends_with("@net") {
        args.push("--net".into());
    }
    args
}

fn app_of(function: &str) -> PathBuf {
    tree().join(format!("images/{function}.ext2"))
}

/// The tree's language + diff layers of `function`, as `--load_dir`.
fn stack(function: &str) -> String {
    let t = tree();
    format!(
        "{},{}",
        path_str(&t.join(language(function))),
        path_str(&t.join("diff").join(function))
    )
}

/// Runs singlevm with `args` on `input`, its console kept in `s`.
fn singlevm(s: &Scratch, name: &str, args: &[String], input: &str) -> (Outcome, PathBuf) {
    let console = s.path(&format!("{name}.console"));
    let mut cmd = Command::new(bin("singlevm"));
    cmd.args(args)
        .arg("--console")
        .arg(&console)
        .args(["--boot_timeout", "200"])
        .env("TMPDIR", &s.0)
        .env("RUST_LOG", "info");
    let started = Instant::now();
    // A run that times out panics; its message gets the VM's console (a
    // guest that hangs says why there, if anywhere).
    let run =
        std::panic::AssertUnwindSafe(|| run_with_input(cmd, input.as_bytes().to_vec(), LIMIT));
    let out = std::panic::catch_unwind(run).unwrap_or_else(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "singlevm's run panicked".into());
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!("{name}: {why}\nconsole (last lines):\n{}", tail.join("\n"))
    });
    eprintln!(
        "{name}: singlevm exited {:?} after {:?}",
        out.code(),
        started.elapsed()
    );
    (out, console)
}

/// Like [`singlevm`], and the run must succeed; returns the answers.
fn answers(s: &Scratch, name: &str, args: &[String], input: &str) -> Vec<Value> {
    let (out, console) = singlevm(s, name, args, input);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(
        out.code(),
        Some(0),
        "{name}: singlevm failed\n{}\nconsole:\n{console}",
        out.stderr
    );
    parse_lines(&out.stdout)
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn requests(function: &str) -> String {
    std::fs::read_to_string(data().join(format!("requests/{function}.json")))
        .expect("the function's request file")
}

fn expected(function: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(data().join(format!("answers/{function}.answers")))
        .expect("the host tests' answers");
    parse_lines(&text)
}

fn with_strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Every restore mode of the SnapFaaS workflow (the tree's language
/// snapshot, diff snapshot and working set), then a boot: all answer alike,
/// and as the host tests expect. (The boot comes last: inside the emulated
/// KVM host, a restore started right after a nodejs boot wedged the
/// emulated host in every run that got there.)
fn workflow_answers_like_a_boot(function: &str) {
    let s = Scratch::new(&format!("linux-{function}"));
    let input = requests(function);
    let restore = |name: &str, extra: &[&str]| {
        let mut args = vm_args(function, &app_of(function));
        args.extend(with_strings(&["--load_dir", &stack(function)]));
        args.extend(with_strings(extra));
        answers(&s, name, &args, &input)
    };
    let lazy = restore("lazy", &[]);
    assert_eq!(
        lazy,
        expected(function),
        "lazy restore, against the host tests"
    );
    let eager = restore("copy", &["--copy_base", "--copy_diff"]);
    let ws = restore("ws", &["--load_ws"]);
    // multivm's default: the small diff copied, the working set prefetched.
    let copy_diff_ws = restore("copy-diff-ws", &["--copy_diff", "--load_ws"]);
    let mut boot = vm_args(function, &app_of(function));
    boot.extend(with_strings(&["--kernel_args", KERNEL_ARGS]));
    let booted = answers(&s, "boot", &boot, &input);
    assert_eq!(
        booted,
        expected(function),
        "a booted VM answers as the host tests expect"
    );
    assert_eq!(lazy, booted, "lazy restore");
    assert_eq!(eager, booted, "eager restore");
    assert_eq!(ws, booted, "working-set restore");
    assert_eq!(
        copy_diff_ws, booted,
        "working-set restore over a copied diff"
    );
}

/// firerunner's default command line plus the root disk (rootfs/README.md).
const KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux \
    i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro rootfstype=ext4";

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn python3_hello_boots_and_every_restore_answers_like_the_boot() {
    workflow_answers_like_a_boot("hello-python3");
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn nodejs_hello_boots_and_every_restore_answers_like_the_boot() {
    workflow_answers_like_a_boot("hello-nodejs");
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn every_example_function_answers_its_fixtures_from_its_snapshots() {
    let s = Scratch::new("linux-examples");
    let functions = dir_entries(&tree().join("diff"));
    for f in [
        "archive-python3",
        "logstats-python3",
        "thumbnail-python3",
        "wordcount-python3",
    ] {
        assert!(
            functions.iter().any(|g| g == f),
            "{f} has no diff snapshot in the tree"
        );
    }
    for f in &functions {
        let mut args = vm_args(f, &app_of(f));
        args.extend(with_strings(&["--load_dir", &stack(f)]));
        let got = answers(&s, f, &args, &requests(f));
        assert_eq!(
            got,
            expected(f),
            "{f}: the VM's answers differ from the host tests'"
        );
    }
}

/// A diff snapshot of the probe function on the tree's python3 language
/// snapshot, made by the test (`vcpus` must match the language snapshot).
fn probe_diff(s: &Scratch, base: &Path, vcpus: &str) -> PathBuf {
    let diff = s.path("probe-diff");
    let mut args = vm_args("probe-python3", &data().join("probe-python3.ext2"));
    args.extend(with_strings(&[
        "--vcpu_count",
        vcpus,
        "--load_dir",
        path_str(base),
        "--dump_dir",
        path_str(&diff),
        "--force_exit",
    ]));
    let (out, console) = singlevm(s, "probe-diff", &args, "");
    assert_eq!(
        out.code(),
        Some(0),
        "diff snapshot of the probe: {}\nconsole:\n{}",
        out.stderr,
        std::fs::read_to_string(console).unwrap_or_default()
    );
    assert!(diff.join("snapshot.json").is_file());
    diff
}

fn probe_args(base: &Path, diff: &Path, vcpus: &str) -> Vec<String> {
    let mut args = vm_args("probe-python3", &data().join("probe-python3.ext2"));
    args.extend(with_strings(&[
        "--vcpu_count",
        vcpus,
        "--load_dir",
        &format!("{},{}", path_str(base), path_str(diff)),
    ]));
    args
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn the_guest_sees_our_virtio_disks_as_linux_drives_them() {
    // The probe's app image is larger than the empty appfs the language
    // snapshot was taken with: the guest can only mount it (and answer)
    // if the restore raised a configuration change on vdb that Linux's
    // virtio-blk driver acted on.
    let s = Scratch::new("linux-virtio");
    let base = tree().join("python3");
    let diff = probe_diff(&s, &base, "1");
    let diff_console = std::fs::read_to_string(s.path("probe-diff.console")).unwrap();
    assert!(
        diff_console.contains("vdb: detected capacity change"),
        "no capacity change on vdb in:\n{diff_console}"
    );
    let got = answers(&s, "probe", &probe_args(&base, &diff, "1"), "{}\n");
    let p = &got[0];
    let app_sectors = std::fs::metadata(data().join("probe-python3.ext2"))
        .unwrap()
        .len()
        / 512;
    let root_sectors = std::fs::metadata(tree().join("images/python3.ext4"))
        .unwrap()
        .len()
        / 512;
    assert_eq!(p["vdb"]["sectors"], app_sectors, "{p}");
    assert_eq!(p["vda"]["sectors"], root_sectors, "{p}");
    for d in ["vda", "vdb"] {
        assert_eq!(p[d]["ro"], true, "{d} must be read-only: {p}");
        let w = p[d]["write"].as_str().unwrap_or_default();
        assert!(w.starts_with("refused"), "{d} took a write: {p}");
    }
    // The boot that made the language snapshot probed both disks and the
    // vsock device through virtio-mmio.
    let lang_console = std::fs::read_to_string(tree().join("logs/python3.console")).unwrap();
    for want in ["virtio_blk virtio0: [vda]", "virtio_blk virtio1: [vdb]"] {
        assert!(
            lang_console.contains(want),
            "{want:?} not in:\n{lang_console}"
        );
    }
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn a_two_vcpu_linux_guest_snapshots_restores_and_runs_on_both() {
    let s = Scratch::new("linux-smp");
    let base = s.path("python3-2cpu");
    let mut args = vec![
        "--kernel".to_string(),
        path_str(&tree().join("vmlinux")).into(),
        "--rootfs".into(),
        path_str(&tree().join("images/python3.ext4")).into(),
    ];
    args.extend(with_strings(&[
        "--kernel_args",
        KERNEL_ARGS,
        "--vcpu_count",
        "2",
        "--dump_dir",
        path_str(&base),
        "--force_exit",
    ]));
    let (out, console) = singlevm(&s, "lang-2cpu", &args, "");
    assert_eq!(
        out.code(),
        Some(0),
        "{}\n{}",
        out.stderr,
        std::fs::read_to_string(console).unwrap_or_default()
    );
    let diff = probe_diff(&s, &base, "2");
    let got = answers(&s, "probe-2cpu", &probe_args(&base, &diff, "2"), "{}\n{}\n");
    for p in &got {
        assert_eq!(p["cpus"], 2, "{p}");
        assert_eq!(p["online"], "0-1", "{p}");
    }
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn clones_restored_at_once_differ_in_randomness_and_know_the_time() {
    let s = Scratch::new("linux-clones");
    let base = tree().join("python3");
    let diff = probe_diff(&s, &base, "1");
    let args = probe_args(&base, &diff, "1");
    let before = now_ns();
    let clones: Vec<_> = (0..2)
        .map(|i| {
            let mut cmd = Command::new(bin("singlevm"));
            cmd.args(&args)
                .args(["--boot_timeout", "200"])
                .env("TMPDIR", &s.0)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn singlevm");
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"{}\n").unwrap();
            drop(stdin);
            (i, child)
        })
        .collect();
    let mut probes = Vec::new();
    for (i, child) in clones {
        let out = child.wait_with_output().expect("wait for singlevm");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "clone {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        probes.push(parse_lines(&stdout).remove(0));
    }
    let after = now_ns();
    assert_ne!(
        probes[0]["urandom"], probes[1]["urandom"],
        "kernel RNG shared: {probes:?}"
    );
    assert_ne!(
        probes[0]["random"], probes[1]["random"],
        "Python's RNG shared: {probes:?}"
    );
    for p in &probes {
        let t = p["time_ns"].as_i64().expect("time_ns") as i128;
        // The snapshot's clock is minutes old; the init frame must have
        // set it to now.
        assert!(
            t >= before - 1_000_000_000 && t <= after + 1_000_000_000,
            "guest clock {t} outside [{before}, {after}]"
        );
    }
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn multivm_serves_python3_functions_from_their_snapshots_under_eviction() {
    let s = Scratch::new("linux-multivm");
    // Room for two 128 MiB VMs (plus overhead), six functions: every new
    // function evicts the least recently used idle VM.
    let d = Daemon::spawn(
        &bin("multivm"),
        &s,
        &tree().join("multivm.yaml"),
        300,
        &[],
        &[],
    );
    let functions = [
        "hello-python3",
        "wordcount-python3",
        "logstats-python3",
        "archive-python3",
        "thumbnail-python3",
        "hello-python3",
        "wordcount-python3",
    ];
    for f in functions {
        eprintln!("multivm: {f}");
        let request = requests(f);
        let first_request = request.lines().next().expect("a request");
        let reply = d.post(f, first_request);
        assert_eq!(reply.status, 200, "{f}: {}\n{}", reply.body, d.log());
        assert_eq!(reply.json(), expected(f)[0], "{f} answered differently");
    }
    let metrics = d.get("/metrics").body;
    let evictions: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("multivm_evictions_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert!(evictions >= 3.0, "expected evictions, metrics:\n{metrics}");

    // OpenFaaS-style invocations reach both agents in the HTTP envelope
    // (another method, a sub-path, a query, a text/plain body); a function
    // with only handle(request) gets the body parsed as JSON.
    for f in ["hello-python3", "hello-nodejs"] {
        let reply = http_with(
            &d.addr,
            "PUT",
            &format!("/function/{f}/a/b?x=1"),
            &[("Content-Type", "text/plain")],
            br#"{"name": "envelope"}"#,
        );
        assert_eq!(reply.status, 200, "{f}: {}\n{}", reply.body, d.log());
        assert_eq!(reply.json(), json!({"message": "hello, envelope"}), "{f}");
    }
    let (code, log) = d.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{log}");
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn a_corrupt_layer_and_a_foreign_working_set_are_refused() {
    let s = Scratch::new("linux-bad");
    let f = "hello-python3";
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    let base = tree().join(language(f));
    let refused = |name: &str, diff: &Path, extra: &[&str], want: &str| {
        let mut args = vm_args(f, &app_of(f));
        args.extend(with_strings(&[
            "--load_dir",
            &format!("{},{}", path_str(&base), path_str(diff)),
        ]));
        args.extend(with_strings(extra));
        let t = Instant::now();
        let (out, _) = singlevm(&s, name, &args, "{}\n");
        assert_eq!(out.code(), Some(1), "{name}: {}", out.stderr);
        assert!(
            out.stderr.contains(want),
            "{name}: want {want:?} in:\n{}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{name} answered: {}", out.stdout);
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{name} took {:?}",
            t.elapsed()
        );
    };
    // A flipped byte in the layer's state.
    let corrupt = s.path("corrupt");
    copy(&tree().join("diff").join(f), &corrupt);
    let state = corrupt.join("snapshot.json");
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&state, bytes).unwrap();
    refused("corrupt", &corrupt, &[], "corrupt");
    // A truncated memory file.
    let short = s.path("short");
    copy(&tree().join("diff").join(f), &short);
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(short.join("memory"))
        .unwrap();
    mem.set_len(4096).unwrap();
    drop(mem);
    refused("truncated", &short, &[], "truncated");
    // The working set of another function's stack.
    let foreign = s.path("foreign");
    copy(&tree().join("diff").join(f), &foreign);
    let other = tree().join("diff/wordcount-python3");
    for name in ["ws", "ws.json"] {
        std::fs::copy(other.join(name), foreign.join(name)).unwrap();
    }
    refused(
        "foreign-ws",
        &foreign,
        &["--load_ws"],
        "belongs to another snapshot",
    );
}

/// A python3 function restored into a VM shell (`firerunner shell`, built
/// before the snapshot was named): lazily, and with its working set,
/// it answers its fixtures as the host tests do, as a fresh restore does.
#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn python3_functions_restored_into_shells_answer_their_fixtures() {
    use snapvm::control::{Event, RestoreRequest};
    use snapvm::launcher::{self, Launch, VmProcess};
    for (f, load_ws) in [
        ("hello-python3", false),
        ("wordcount-python3", false),
        ("wordcount-python3", true),
    ] {
        let t = tree();
        let launch = Launch {
            firerunner: bin("firerunner"),
            vm_args: vec!["shell".into()],
            console: None,
            jail: None,
            network: false,
        };
        let mut vm = VmProcess::spawn(&launch).expect("spawn firerunner shell");
        match vm.events().recv_deadline(Instant::now() + LIMIT) {
            Ok(Event::ShellReady { .. }) => {}
            other => panic!("{f}: the shell is not ready: {other:?}"),
        }
        vm.restore(&RestoreRequest {
            rootfs: image(f),
            appfs: Some(app_of(f)),
            layers: vec![t.join(language(f)), t.join("diff").join(f)],
            load_ws,
            ..Default::default()
        })
        .unwrap();
        let agent = vm
            .wait_for_guest(LIMIT)
            .unwrap_or_else(|e| panic!("{f}: {e}{}", vm.failure_detail()));
        let deadline = Some(Instant::now() + LIMIT);
        launcher::handshake(&agent, deadline).expect("handshake");
        let got: Vec<Value> = requests(f)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let body = vm
                    .call(&agent, l.as_bytes(), deadline)
                    .unwrap_or_else(|e| panic!("{f}: {e}{}", vm.failure_detail()));
                serde_json::from_slice(&body).expect("JSON")
            })
            .collect();
        assert_eq!(got, expected(f), "{f} (load_ws {load_ws}) in a shell");
        eprintln!("{f}: answered from a shell (load_ws {load_ws})");
    }
}

/// The network test's outside world: namespace `snapvm-upstream`, joined
/// to this host by a veth pair (here `up0` 10.99.0.1/24, there `eth0`
/// 10.99.0.2/24), its HTTP server on 10.99.0.2:8080 noting who connects.
/// Its name server (10.99.0.2:53, UDP) knows `upstream.test`, and is this
/// host's resolver. Removed on drop, on failure too.
struct Upstream {
    seen: Seen,
    /// Who asked the upstream name server.
    dns_seen: Seen,
}

/// The peers a listener saw.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>;

const UPSTREAM_BODY: &[u8] = b"hello from upstream";

/// A thread in the named network namespace that accepts on `addr` and
/// notes each peer in `seen`, answering HTTP/1.0 200 with
/// [`UPSTREAM_BODY`].
fn listen_in(netns: &str, addr: &str, seen: Seen) {
    let (path, addr) = (format!("/run/netns/{netns}"), addr.to_owned());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = std::net::TcpListener::bind(&addr).expect("bind");
        tx.send(()).unwrap();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if let Ok(peer) = conn.peer_addr() {
                seen.lock().unwrap().push(peer.ip());
            }
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                UPSTREAM_BODY.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(UPSTREAM_BODY);
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the listener started");
}

/// A name server for the test's outside world, in the named namespace on
/// `addr` (UDP): `upstream.test` is 10.99.0.2 (A), has no AAAA, and no
/// other name exists. Notes each client in `seen`.
fn dns_in(netns: &str, addr: &str, seen: Seen) {
    let (path, addr) = (format!("/run/netns/{netns}"), addr.to_owned());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let socket = std::net::UdpSocket::bind(&addr).expect("bind");
        tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            seen.lock().unwrap().push(peer.ip());
            // The question: labels up to a zero byte, then type and class.
            let Some(end) = buf[12..n].iter().position(|&b| b == 0).map(|i| 12 + i + 5) else {
                continue;
            };
            if end > n {
                continue;
            }
            let name = &buf[12..end - 4];
            let qtype = u16::from_be_bytes([buf[end - 4], buf[end - 3]]);
            let ours = name == b"\x08upstream\x04test\x00";
            let mut reply = buf[..end].to_vec();
            let rcode = if ours { 0 } else { 3 }; // NXDOMAIN
            reply[2..4].copy_from_slice(&(0x8180u16 | rcode).to_be_bytes());
            let answer = ours && qtype == 1;
            reply[6..8].copy_from_slice(&u16::from(answer).to_be_bytes());
            reply[8..12].fill(0);
            if answer {
                reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 99, 0, 2]);
            }
            let _ = socket.send_to(&reply, peer);
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the name server started");
}

impl Upstream {
    fn start() -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", "snapvm-upstream"])
            .status();
        let _ = Command::new("ip").args(["link", "del", "up0"]).status();
        ip(&["netns", "add", "snapvm-upstream"]);
        ip(&[
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            "snapvm-upstream",
        ]);
        ip(&["addr", "add", "10.99.0.1/24", "dev", "up0"]);
        ip(&["link", "set", "up0", "up"]);
        let n = ["-n", "snapvm-upstream"];
        ip(&[&n[..], &["addr", "add", "10.99.0.2/24", "dev", "eth0"]].concat());
        ip(&[&n[..], &["link", "set", "eth0", "up"]].concat());
        ip(&[&n[..], &["link", "set", "lo", "up"]].concat());
        let seen = std::sync::Arc::default();
        listen_in(
            "snapvm-upstream",
            "10.99.0.2:8080",
            std::sync::Arc::clone(&seen),
        );
        let dns_seen = Seen::default();
        dns_in(
            "snapvm-upstream",
            "10.99.0.2:53",
            std::sync::Arc::clone(&dns_seen),
        );
        // This (emulated, throw-away) host's resolver: the VMs' DNS goes
        // there (src/network.rs reads it when it makes a VM's network).
        std::fs::write("/etc/resolv.conf", "nameserver 10.99.0.2\n").unwrap();
        Upstream { seen, dns_seen }
    }

    fn seen(&self) -> Vec<std::net::IpAddr> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", "up0"]).status();
        let _ = Command::new("ip")
            .args(["netns", "del", "snapvm-upstream"])
            .status();
    }
}

/// The addresses of jail slot `uid`'s uplink (src/network.rs): this host's
/// end, the VM namespace's end.
fn uplink_addrs(uid: u32) -> (String, String) {
    let base = u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0)) + (uid % 65_536) * 4;
    let at = |n| std::net::Ipv4Addr::from(base + n).to_string();
    (at(1), at(2))
}

/// The python3 fetch function (appfs/fetch-python3), restored with a
/// network from its snapshots, fetches from an HTTP server outside this
/// host, which sees the host's NAT address; it cannot reach this host's
/// own services or a sibling VM's namespace; it resolves names through
/// its gateway (forwarded to this host's resolver); two clones of the one
/// snapshot (same guest address and MAC) run at once and both fetch; the
/// same function without a network reaches nothing.
#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn a_networked_function_fetches_through_nat_and_reaches_nothing_else() {
    let s = Scratch::new("linux-net");
    let f = "fetch-python3";
    let upstream = Upstream::start();
    // A service of this host's, on every address.
    let host_seen: Seen = Seen::default();
    let host = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    {
        let seen = std::sync::Arc::clone(&host_seen);
        std::thread::spawn(move || {
            for c in host.incoming().flatten() {
                if let Ok(p) = c.peer_addr() {
                    seen.lock().unwrap().push(p.ip());
                }
            }
        });
    }
    let host_seen = move || host_seen.lock().unwrap().clone();

    let (uid_a, uid_b) = (961_000, 961_001);
    let vm = |uid: u32| {
        let mut args = vm_args(f, &app_of(f));
        args.extend(with_strings(&["--load_dir", &stack(f), "--load_ws"]));
        args.extend(with_strings(&[
            "--jail_uid_base",
            &uid.to_string(),
            "--jail_uid_count",
            "1",
        ]));
        args
    };
    // Clone B waits, serving, while clone A runs.
    let console_b = s.path("b.console");
    let mut b = Command::new(bin("singlevm"))
        .args(vm(uid_b))
        .arg("--console")
        .arg(&console_b)
        .args(["--boot_timeout", "200"])
        .env("TMPDIR", &s.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn singlevm");
    let ns_b = format!("snapvm-{uid_b}");
    let deadline = Instant::now() + LIMIT;
    while !Path::new(&format!("/run/netns/{ns_b}")).exists() {
        assert!(Instant::now() < deadline, "no namespace {ns_b}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What A might try to reach of B: B's namespace, on its uplink address.
    let sibling_seen: Seen = Seen::default();
    let (_, b_addr) = uplink_addrs(uid_b);
    listen_in(
        &ns_b,
        &format!("{b_addr}:8081"),
        std::sync::Arc::clone(&sibling_seen),
    );

    let (a_host, _) = uplink_addrs(uid_a);
    let lines = [
        json!({"url": "http://10.99.0.2:8080/a", "timeout": 30}),
        json!({"url": "http://upstream.test:8080/by-name", "timeout": 30}),
        json!({"url": format!("http://10.99.0.1:{host_port}/"), "timeout": 3}),
        json!({"url": format!("http://{a_host}:{host_port}/"), "timeout": 3}),
        json!({"url": format!("http://{b_addr}:8081/"), "timeout": 3}),
    ];
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let got = answers(&s, "a", &vm(uid_a), &input);
    let ok = json!({"url": "http://10.99.0.2:8080/a", "ok": true, "status": 200,
                    "length": UPSTREAM_BODY.len()});
    assert_eq!(got[0], ok, "the fetch from upstream: {got:?}");
    // By name: the guest asks its gateway, which forwards to this host's
    // resolver; the name server too sees only the NAT address.
    assert_eq!(
        (got[1]["ok"].clone(), got[1]["status"].clone()),
        (json!(true), json!(200)),
        "the fetch by name: {}",
        got[1]
    );
    let asked = upstream.dns_seen.lock().unwrap().clone();
    assert!(
        !asked.is_empty()
            && asked
                .iter()
                .all(|a| *a == std::net::IpAddr::from([10, 99, 0, 1])),
        "the name server saw {asked:?}"
    );
    for (i, what) in [
        (2, "this host's upstream address"),
        (3, "this host's end of the uplink"),
        (4, "the sibling's namespace"),
    ] {
        assert_eq!(
            (got[i]["ok"].clone(), got[i]["reason"].clone()),
            (json!(false), json!("TimeoutError")),
            "{what} was not dropped: {}",
            got[i]
        );
    }
    assert_eq!(
        host_seen(),
        Vec::<std::net::IpAddr>::new(),
        "this host's service was reached"
    );
    assert!(
        sibling_seen.lock().unwrap().is_empty(),
        "the sibling was reached"
    );

    // B, restored from the same snapshot and running all along, fetches too.
    let mut stdin = b.stdin.take().unwrap();
    writeln!(
        stdin,
        "{}",
        json!({"url": "http://10.99.0.2:8080/b", "timeout": 30})
    )
    .unwrap();
    drop(stdin);
    let out = b.wait_with_output().unwrap();
    let console = std::fs::read_to_string(&console_b).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(0),
        "clone B failed; console:\n{console}"
    );
    let got_b = parse_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        got_b.first().map(|v| v["ok"].clone()),
        Some(json!(true)),
        "clone B: {got_b:?}"
    );
    assert_eq!(
        upstream.seen(),
        vec![std::net::IpAddr::from([10, 99, 0, 1]); 3],
        "upstream must see only this host's NAT address: A twice, B once"
    );
    for uid in [uid_a, uid_b] {
        assert!(!Path::new(&format!("/run/netns/snapvm-{uid}")).exists());
    }

    // Without a network (the python3 language snapshot, the app loaded
    // after the restore), the same function reaches nothing.
    let mut args = vm_args("hello-python3", &app_of(f));
    args.extend(with_strings(&[
        "--load_dir",
        path_str(&tree().join("python3")),
    ]));
    let got = answers(
        &s,
        "no-net",
        &args,
        &format!(
            "{}\n",
            json!({"url": "http://10.99.0.2:8080/c", "timeout": 5})
        ),
    );
    assert_eq!(got[0]["ok"], json!(false), "{got:?}");
    assert_eq!(
        upstream.seen().len(),
        3,
        "a VM without a network reached upstream"
    );
}

#[test]
#[ignore = "needs a KVM that runs Linux guests: scripts/linux-test.sh"]
fn a_python3_function_keeps_its_module_state_across_hibernate_and_wake() {
    let s = Scratch::new("linux-hibernate");
    let base = tree().join("python3");
    let diff = probe_diff(&s, &base, "1");
    let hib = s.path("hib");
    let cfg = format!(
        "kernel_path: {kernel}\nboot_timeout: 200s\nhibernate:\n  dir: {hib}\n\
         functions:\n  probe:\n    runtimefs: {rootfs}\n    appfs: {app}\n    memory: 128\n\
         \x20   load_dir: {base},{diff}\n    keep_state: true\n    idle_timeout: 1s\n",
        kernel = path_str(&tree().join("vmlinux")),
        hib = path_str(&hib),
        rootfs = path_str(&image("probe-python3")),
        app = path_str(&data().join("probe-python3.ext2")),
        base = path_str(&base),
        diff = path_str(&diff),
    );
    let cfg = s.file("hibernate.yaml", cfg.as_bytes());
    let d = Daemon::spawn(&bin("multivm"), &s, &cfg, 300, &[], &[]);
    let call = |want_start: &str, want_served: u64| {
        let r = d.post("probe", "{}");
        assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
        assert_eq!(
            (r.header("x-start"), &r.json()["served"]),
            (Some(want_start), &json!(want_served)),
            "{}",
            d.log()
        );
    };
    call("cold-restore", 1);
    call("warm", 2);
    for cycle in 1..=2u64 {
        let hibernations = "multivm_hibernations_total{function=\"probe\",result=\"ok\"}";
        d.wait_for("a hibernation", LIMIT, |d| {
            d.metric(hibernations) == cycle as f64
        });
        // A diff over the function's layers: a few MiB, not the 128 MiB VM.
        let bytes = d.metric("multivm_hibernate_disk_bytes");
        assert!(
            bytes > 0.0 && bytes < (64u64 << 20) as f64 * cycle as f64,
            "{bytes}"
        );
        eprintln!(
            "hibernation {cycle}: {:.1} MiB of layers on disk",
            bytes / 1048576.0
        );
        call("cold-wake", 2 + cycle);
    }
    let metrics = d.get("/metrics").body;
    for line in metrics.lines().filter(|l| {
        l.starts_with("multivm_hibernate_duration_seconds_sum")
            || l.starts_with("multivm_launch_duration_seconds_sum")
    }) {
        eprintln!("{line}");
    }
    let (code, log) = d.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{log}");
}
