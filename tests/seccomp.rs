//! firerunner's per-thread seccomp filters on real KVM with testguest:
//! every thread of a running firerunner — booted, restored lazily, restored
//! with its working set — is filtered; a 64 MiB working set records and
//! loads under the filters; a forbidden call from any thread
//! class ends firerunner with exit code 148 and one line naming the call
//! and the thread; `--no_seccomp` (also through singlevm) runs without.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{app_image, firerunner, run_with_deadline, run_with_input, singlevm, testguest};
use common::{collect, thread_modes, Scratch};
use serde_json::{json, Value};
use snapvm::vmm::seccomp::{hooks, VIOLATION_EXIT_CODE};

const LIMIT: Duration = Duration::from_secs(120);
const HELLO: &[&str] = &["fn=hello"];

/// A rootfs, an app, and a SnapFaaS stack: the language snapshot `base`,
/// the app's diff layer `diff` with the working set of one request.
struct Stack {
    root: PathBuf,
    app: PathBuf,
    base: PathBuf,
    diff: PathBuf,
}

impl Stack {
    fn layers(&self) -> String {
        format!("{},{}", self.base.display(), self.diff.display())
    }
}

/// firerunner on testguest with these disks and its vsock at `uds`.
fn firerunner_on(root: &Path, app: &Path, uds: &Path) -> Command {
    let mut cmd = Command::new(firerunner());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(root)
        .arg("--appfs")
        .arg(app)
        .arg("--vsock_uds")
        .arg(uds);
    cmd
}

fn expect_ok(what: &str, out: &common::Outcome) {
    assert_eq!(out.code(), Some(0), "{what} failed:\n{}", out.stderr);
}

/// Builds the [`Stack`] of `app` (manifest lines) in `s`, recording the
/// working set of `request` (with the filters on all along).
fn stack(s: &Scratch, app: &[&str], request: &str) -> Stack {
    let data: Vec<u8> = (0..64u32 << 10).map(|i| (i * 31 % 251) as u8).collect();
    let root = s.file("rootfs.img", &data);
    let app = app_image(s, "app.img", app);
    let (base, diff) = (s.path("base"), s.path("diff"));
    let mut cmd = firerunner_on(&root, &s.file("empty.img", b""), &s.path("base.vsock"));
    cmd.arg("--dump_dir").arg(&base);
    expect_ok("the language snapshot", &run_with_deadline(cmd, LIMIT));
    let mut cmd = firerunner_on(&root, &app, &s.path("diff.vsock"));
    cmd.arg("--load_dir")
        .arg(&base)
        .arg("--dump_dir")
        .arg(&diff);
    expect_ok("the diff snapshot", &run_with_deadline(cmd, LIMIT));
    let mut cmd = Command::new(singlevm());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&root)
        .arg("--appfs")
        .arg(&app)
        .arg("--load_dir")
        .arg(&base)
        .arg("--diff_dirs")
        .arg(&diff)
        .arg("--dump_ws")
        .env("TMPDIR", &s.0)
        .env_remove("XDG_RUNTIME_DIR");
    let out = run_with_input(cmd, format!("{request}\n").into_bytes(), LIMIT);
    expect_ok("recording the working set", &out);
    assert!(diff.join("ws").is_file(), "no working set written");
    Stack {
        root,
        app,
        base,
        diff,
    }
}

/// A firerunner whose guest agent connected and answered a request.
struct Serving {
    child: Child,
    _conn: UnixStream,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` (vsock at `uds`), plays the controller's part — init
/// frame, then one `{}` request answered by `hello` — and returns the
/// firerunner, now in its steady state.
fn serve_one(mut cmd: Command, uds: &Path) -> Serving {
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stderr, _) = collect(child.stderr.take().unwrap());
    let start = Instant::now();
    let mut conn = loop {
        if let Ok((c, _)) = listener.accept() {
            break c;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "firerunner exited ({status}) before its guest connected:\n{}",
                stderr.lock().unwrap()
            );
        }
        assert!(start.elapsed() < LIMIT, "the guest never connected");
        std::thread::sleep(Duration::from_millis(5));
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    let init = snapvm::protocol::init_frame(&[7; 32], 1);
    snapvm::protocol::write_frame(&mut conn, init.to_string().as_bytes()).unwrap();
    assert_eq!(
        snapvm::protocol::read_json(&mut conn).unwrap(),
        json!({"ready": true})
    );
    snapvm::protocol::write_frame(&mut conn, b"{}").unwrap();
    let answer: Value = snapvm::protocol::read_json(&mut conn).unwrap();
    assert_eq!(answer, json!({"message": "hello, world"}));
    Serving { child, _conn: conn }
}

#[test]
fn every_thread_of_a_booted_and_a_restored_firerunner_is_filtered() {
    let s = Scratch::new("seccomp-threads");
    let st = stack(&s, HELLO, "{}");
    let layers = st.layers();
    let cases: [(&str, &[&str], &[&str]); 3] = [
        (
            "boot",
            &["--vcpu_count", "2"],
            &["firerunner", "vcpu0", "vcpu1"],
        ),
        ("lazy", &["--load_dir", &layers], &["firerunner", "vcpu0"]),
        (
            "ws",
            &["--load_dir", &layers, "--load_ws"],
            &["firerunner", "vcpu0", "uffd-handler"],
        ),
    ];
    for (name, args, expected) in cases {
        let uds = s.path(&format!("{name}.vsock"));
        let mut cmd = firerunner_on(&st.root, &st.app, &uds);
        cmd.args(args);
        let vm = serve_one(cmd, &uds);
        // Threads that only set up (restore-memory) were joined before
        // the guest ran, but a loaded host may take a moment to remove an
        // exited thread from /proc: wait (bounded) for their entries to go.
        let t = Instant::now();
        let modes = loop {
            let modes = thread_modes(vm.child.id());
            if modes.iter().all(|(_, m)| m == "2") || t.elapsed() > Duration::from_secs(2) {
                break modes;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for want in expected {
            assert!(
                modes.iter().any(|(n, _)| n == want),
                "{name}: no thread {want} in {modes:?}"
            );
        }
        // A prefetch thread may still be there, filtered too.
        for (thread, mode) in &modes {
            assert_eq!(
                mode, "2",
                "{name}: thread {thread} is not filtered: {modes:?}"
            );
        }
    }
}

/// Runs firerunner with `args` and the violation hook armed for `class`;
/// expects exit 148 and the line naming the call and `thread`.
fn expect_violation(s: &Scratch, st: &Stack, class: &str, thread: &str, args: &[&str]) {
    let uds = s.path(&format!("v-{class}.vsock"));
    let mut cmd = firerunner_on(&st.root, &st.app, &uds);
    cmd.args(args).env(hooks::VIOLATE_ENV, class);
    let out = run_with_deadline(cmd, LIMIT);
    assert_eq!(
        out.code(),
        Some(VIOLATION_EXIT_CODE),
        "{class}: firerunner did not end with the violation code:\n{}",
        out.stderr
    );
    let line = format!(
        "firerunner: seccomp: thread {thread} ({class} filter) made a forbidden system call: \
         {} ({}); exiting with code {VIOLATION_EXIT_CODE}",
        libc::SYS_getppid,
        hooks::FORBIDDEN
    );
    assert_eq!(
        out.stderr.lines().filter(|l| *l == line).count(),
        1,
        "{class}: expected exactly the line {line:?} in:\n{}",
        out.stderr
    );
}

#[test]
fn a_forbidden_call_from_each_thread_class_ends_firerunner_with_148() {
    let s = Scratch::new("seccomp-violation");
    let st = stack(&s, HELLO, "{}");
    let layers = st.layers();
    let dump = s.path("dump").display().to_string();
    let ws: &[&str] = &["--load_dir", &layers, "--load_ws"];
    expect_violation(&s, &st, "vcpu", "vcpu0", &[]);
    expect_violation(&s, &st, "event-loop", "firerunner", &[]);
    expect_violation(&s, &st, "event-loop", "firerunner", &["--dump_dir", &dump]);
    expect_violation(
        &s,
        &st,
        "rootfs-hash",
        "rootfs-hash",
        &["--dump_dir", &dump],
    );
    expect_violation(&s, &st, "uffd-handler", "uffd-handler", ws);
    expect_violation(&s, &st, "ws-prefetch", "ws-prefetch", ws);
    expect_violation(&s, &st, "vcpu", "vcpu0", ws);
    assert!(!s.path("dump").exists(), "a snapshot was written");
}

#[test]
fn no_seccomp_runs_unfiltered_and_singlevm_passes_it_on() {
    let s = Scratch::new("seccomp-off");
    let st = stack(&s, HELLO, "{}");
    let layers = st.layers();

    // Unfiltered, the armed hook's call is just a call: the VM serves.
    let uds = s.path("off.vsock");
    let mut cmd = firerunner_on(&st.root, &st.app, &uds);
    cmd.args(["--load_dir", &layers, "--load_ws", "--no_seccomp"])
        .env(hooks::VIOLATE_ENV, "vcpu");
    let vm = serve_one(cmd, &uds);
    let modes = thread_modes(vm.child.id());
    assert!(modes.iter().any(|(n, _)| n == "uffd-handler"), "{modes:?}");
    for (thread, mode) in &modes {
        assert_eq!(mode, "0", "thread {thread} is filtered: {modes:?}");
    }
    drop(vm);

    // singlevm: the hook kills its firerunner unless --no_seccomp is given.
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(singlevm());
        cmd.arg("--kernel")
            .arg(testguest())
            .args(["--rootfs", &st.root.display().to_string()])
            .args(["--appfs", &st.app.display().to_string()])
            .args(extra)
            .env(hooks::VIOLATE_ENV, "vcpu")
            .env("TMPDIR", &s.0)
            .env_remove("XDG_RUNTIME_DIR");
        run_with_input(cmd, b"{}\n".to_vec(), LIMIT)
    };
    let out = run(&[]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("exit status: {VIOLATION_EXIT_CODE}")),
        "singlevm does not report firerunner's exit:\n{}",
        out.stderr
    );
    let out = run(&["--no_seccomp"]);
    expect_ok("singlevm --no_seccomp", &out);
    assert_eq!(out.stdout, "{\"message\":\"hello, world\"}\n");

    // The code and the flag are documented in --help.
    let help = Command::new(firerunner()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--no_seccomp"), "{help}");
    assert!(help.contains(&VIOLATION_EXIT_CODE.to_string()), "{help}");
}

/// A 64 MiB working set: the fault handler's recording outgrows glibc's
/// heap (its `realloc` then moves the block with `mremap`) and the
/// prefetch places every page, with the filters on.
#[test]
fn a_64_mib_working_set_records_and_loads_under_the_filters() {
    let s = Scratch::new("seccomp-bigws");
    let request = r#"{"mib": 64}"#;
    let st = stack(&s, &["fn=touch", "mib=64"], request);
    let mut cmd = Command::new(singlevm());
    cmd.arg("--kernel")
        .arg(testguest())
        .args(["--rootfs", &st.root.display().to_string()])
        .args(["--appfs", &st.app.display().to_string()])
        .args(["--load_dir", &st.layers(), "--load_ws"])
        .env("TMPDIR", &s.0)
        .env_remove("XDG_RUNTIME_DIR");
    let out = run_with_input(cmd, format!("{request}\n").into_bytes(), LIMIT);
    expect_ok("serving from the 64 MiB working set", &out);
    let answer: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(answer["touched_mib"], 64, "{}", out.stdout);
}
