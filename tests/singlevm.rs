//! singlevm end to end on real KVM with testguest: one JSON line out per
//! line in, in order; functions that fail or spin; a guest that never
//! connects; a firerunner that dies; vsock streams both ways.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{app_image, descendants_named, firerunner, run_singlevm, testguest, Scratch};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

fn lines(out: &common::Outcome) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// Nothing of singlevm's runtime (sockets, console) is left in `s`.
fn assert_clean(s: &Scratch) {
    let left: Vec<String> = s
        .entries()
        .into_iter()
        .filter(|e| e.starts_with("snapvm-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn answers_every_line_in_order() {
    let s = Scratch::new("sv-order");
    let rootfs = s.file("rootfs.img", &[1u8; 4096]);
    let app = app_image(&s, "hello.img", &["fn=hello"]);
    let input = "{\"name\":\"x\"}\nnot json\n{}\n[1,2]\n\n{\"name\":\"ü\"}\n";
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--appfs",
            app.to_str().unwrap(),
        ],
        input,
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let got = lines(&out);
    assert_eq!(got.len(), 6, "{}", out.stdout);
    assert_eq!(got[0], json!({"message": "hello, x"}));
    assert!(got[1]["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid request: "));
    assert_eq!(got[2], json!({"message": "hello, world"}));
    assert_eq!(got[3], json!({"message": "hello, world"}));
    assert!(got[4]["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid request: "));
    assert_eq!(got[5], json!({"message": "hello, ü"}));
    assert_clean(&s);
}

#[test]
fn a_thousand_echo_requests_none_lost() {
    let s = Scratch::new("sv-echo");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let app = app_image(&s, "echo.img", &["fn=echo"]);
    let input: String = (0..1000)
        .map(|i| format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 97)))
        .collect();
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--appfs",
            app.to_str().unwrap(),
        ],
        &input,
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let got = lines(&out);
    assert_eq!(got.len(), 1000);
    for (i, (g, want)) in got.iter().zip(input.lines()).enumerate() {
        let want: Value = serde_json::from_str(want).unwrap();
        assert_eq!(g, &want, "response {i}");
    }
}

#[test]
fn function_errors_are_responses_and_the_vm_keeps_serving() {
    let s = Scratch::new("sv-fail");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let app = app_image(&s, "fail.img", &["fn=fail"]);
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--appfs",
            app.to_str().unwrap(),
        ],
        "{}\n{\"again\":1}\n",
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        lines(&out),
        vec![
            json!({"error": "fail: requested failure"}),
            json!({"error": "fail: requested failure"})
        ]
    );
}

#[test]
fn a_request_past_its_timeout_kills_the_vm() {
    let s = Scratch::new("sv-spin");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let app = app_image(&s, "spin.img", &["fn=spin"]);
    let start = Instant::now();
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--appfs",
            app.to_str().unwrap(),
            "--request_timeout",
            "1",
        ],
        "{}\n{}\nnot json\n",
        LIMIT,
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    let got = lines(&out);
    assert_eq!(got.len(), 3, "{}", out.stdout);
    assert!(
        got[0]["error"].as_str().unwrap().starts_with("timeout"),
        "{}",
        got[0]
    );
    assert!(
        got[1]["error"].as_str().unwrap().starts_with("vm is gone"),
        "{}",
        got[1]
    );
    assert!(
        got[2]["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid request"),
        "{}",
        got[2]
    );
    assert_clean(&s);
}

#[test]
fn oversized_requests_are_refused_and_serving_goes_on() {
    let s = Scratch::new("sv-big");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let app = app_image(&s, "echo.img", &["fn=echo"]);
    let big = format!("{{\"blob\":\"{}\"}}\n", "a".repeat(5 << 20));
    let input = format!("{big}{{\"ok\":true}}\n");
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--appfs",
            app.to_str().unwrap(),
        ],
        &input,
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let got = lines(&out);
    assert!(got[0]["error"]
        .as_str()
        .unwrap()
        .starts_with("request too large"));
    assert_eq!(got[1], json!({"ok": true}));
}

#[test]
fn a_guest_that_never_connects_is_a_clear_error() {
    let s = Scratch::new("sv-noconn");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let start = Instant::now();
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel_args",
            "testguest.exit=halt",
            "--boot_timeout",
            "2",
        ],
        "{}\n",
        LIMIT,
    );
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("did not connect"), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    assert_clean(&s);
    assert_no_firerunner_left(&s);
}

#[test]
fn firerunner_dying_is_a_clear_error() {
    let s = Scratch::new("sv-dies");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    // At start: firerunner refuses its configuration.
    let out = run_singlevm(&s, &["--rootfs", "/nonexistent.img"], "{}\n", LIMIT);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("firerunner exited"), "{}", out.stderr);
    assert!(out.stderr.contains("/nonexistent.img"), "{}", out.stderr);
    assert_clean(&s);

    // Mid-request: kill -9 firerunner while the guest spins.
    let app = app_image(&s, "spin.img", &["fn=spin"]);
    let mut cmd = Command::new(common::singlevm());
    cmd.arg("--kernel")
        .arg(testguest())
        .args([
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--appfs",
            app.to_str().unwrap(),
        ])
        .env("TMPDIR", &s.0)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"{}\n").unwrap();
    // Find the firerunner child once the request is in flight, and kill it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let pids = descendants_named(child.id(), "firerunner");
        if let Some(p) = pids.first() {
            break *p;
        }
        assert!(Instant::now() < deadline, "no firerunner child");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    stdin.write_all(b"{}\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 2, "{stdout}");
    assert!(
        got[0]["error"].as_str().unwrap().starts_with("vm died"),
        "{}",
        got[0]
    );
    assert!(
        got[1]["error"].as_str().unwrap().starts_with("vm is gone"),
        "{}",
        got[1]
    );
    assert_clean(&s);
}

/// No firerunner started from this test's scratch dir is still running.
fn assert_no_firerunner_left(s: &Scratch) {
    let needle = s.0.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&cmdline);
            assert!(
                !(c.contains("firerunner") && c.contains(&needle)),
                "still running: {c}"
            );
        }
    }
}

/// Connects to a guest vsock port through firerunner's host socket.
fn connect_guest(uds: &std::path::Path, port: u32) -> Option<(UnixStream, BufReader<UnixStream>)> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    line.starts_with("OK ").then_some((s, r))
}

#[test]
fn sixteen_vsock_streams_move_data_both_ways() {
    let s = Scratch::new("sv-streams");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let app = app_image(&s, "listen.img", &["fn=echo", "listen=5000"]);
    let uds = s.path("v.sock");
    let mut vm = Command::new(firerunner())
        .arg("--kernel")
        .arg(testguest())
        .args([
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--appfs",
            app.to_str().unwrap(),
        ])
        .arg("--vsock_uds")
        .arg(&uds)
        .arg("--console")
        .arg(s.path("console.log"))
        .spawn()
        .unwrap();
    // Wait until the guest listens.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((w, _)) = connect_guest(&uds, 5000) {
            w.shutdown(std::net::Shutdown::Both).ok();
            break;
        }
        assert!(Instant::now() < deadline, "guest never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers: Vec<_> = (0..16u64)
        .map(|n| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let (mut w, mut r) = connect_guest(&uds, 5000).expect("connect");
                let data: Vec<u8> = (0..(256 * 1024 + n * 1000))
                    .map(|i| (i.wrapping_mul(n + 7) >> 3) as u8)
                    .collect();
                let sent = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                r.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                assert_eq!(back.len(), data.len(), "stream {n}");
                assert!(back == data, "stream {n}: data differs");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("stream worker");
    }
    vm.kill().unwrap();
    vm.wait().unwrap();
}

/// `--force_exit --dump_dir` is a snapshot run: it must end with the
/// snapshot written, and must say at once when it cannot, never wait out
/// a timeout.
#[test]
fn a_snapshot_run_that_cannot_snapshot_fails_fast_with_the_reason() {
    let s = Scratch::new("sv-nosnap");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let app = app_image(&s, "hello.img", &["fn=hello"]);
    let base = s.path("base");
    let diff = s.path("diff");
    let snapshot_run = |extra: &[&str], dump: &std::path::Path| {
        let mut args = vec!["--rootfs", rootfs.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--dump_dir", dump.to_str().unwrap(), "--force_exit"]);
        args.extend_from_slice(&["--boot_timeout", "100"]);
        let start = Instant::now();
        let out = run_singlevm(&s, &args, "", LIMIT);
        (out, start.elapsed())
    };

    // The guest resets the machine before its snapshot point (as a Linux
    // guest does when its agent dies): firerunner exits 0, no snapshot.
    let (out, took) = snapshot_run(&["--kernel_args", "testguest.exit=reboot"], &base);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("exited without writing the snapshot"),
        "{}",
        out.stderr
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(!base.exists(), "nothing may be left at the dump dir");

    // A snapshot taken after both snapshot points: restored with
    // --dump_dir, the guest connects without another 124.
    let (out, _) = snapshot_run(&["--appfs", app.to_str().unwrap()], &base);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let (out, _) = snapshot_run(
        &[
            "--appfs",
            app.to_str().unwrap(),
            "--load_dir",
            base.to_str().unwrap(),
        ],
        &diff,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let stack = format!("{},{}", base.display(), diff.display());
    let again = s.path("again");
    let (out, took) = snapshot_run(
        &["--appfs", app.to_str().unwrap(), "--load_dir", &stack],
        &again,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("went past its snapshot point"),
        "{}",
        out.stderr
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(!again.exists());
    assert_clean(&s);
    assert_no_firerunner_left(&s);
}

/// The pages an error path touched are not the function's working set:
/// `--dump_ws` records none when the first answer is an error.
#[test]
fn no_working_set_is_recorded_from_an_error_answer() {
    let s = Scratch::new("sv-wserr");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let app = app_image(&s, "fail.img", &["fn=fail"]);
    let base = s.path("base");
    let ws = s.path("ws");
    std::fs::create_dir(&ws).unwrap();
    let rootfs = rootfs.to_str().unwrap();
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs,
            "--dump_dir",
            base.to_str().unwrap(),
            "--force_exit",
        ],
        "",
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let out = run_singlevm(
        &s,
        &[
            "--rootfs",
            rootfs,
            "--appfs",
            app.to_str().unwrap(),
            "--load_dir",
            base.to_str().unwrap(),
            "--dump_ws",
            ws.to_str().unwrap(),
        ],
        "{}\n",
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_eq!(
        lines(&out),
        vec![json!({"error": "fail: requested failure"})]
    );
    assert!(
        out.stderr.contains("answered with an error"),
        "{}",
        out.stderr
    );
    assert!(!ws.join("ws.json").exists() && !ws.join("ws").exists());
}
