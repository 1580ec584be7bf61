//! multivm end to end on real KVM with testguest, over loopback HTTP:
//! config errors, warm reuse, the memory budget under load, LRU eviction,
//! idle timeouts, queueing, timeouts, dead VMs, launch failures, a
//! clean SIGTERM, and seccomp-filtered VMs unless `--no_seccomp`. Every
//! wait is bounded.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{multivm_bin, Daemon};
use common::{app_image, testguest, thread_modes, Scratch};
use serde_json::json;

/// Guest memory of every test function (MiB) and the VMM overhead the
/// configs set: each VM accounts for 40 MiB.
const MEM: u64 = 32;
const OVERHEAD: u64 = 8;
const VM_MIB: u64 = MEM + OVERHEAD;

/// A config for testguest functions: `(name, fn=, extra YAML lines)`.
fn config(s: &Scratch, functions: &[(&str, &str, &str)]) -> String {
    let rootfs = s.file("rootfs.img", &[0u8; 4096]);
    let mut y = format!(
        "kernel_path: {}\nvm_overhead: {OVERHEAD}\nboot_timeout: 20s\nfunctions:\n",
        testguest().display()
    );
    for (name, f, extra) in functions {
        let app = app_image(s, &format!("{name}.img"), &[&format!("fn={f}")]);
        y += &format!(
            "  {name}:\n    runtimefs: {}\n    appfs: {}\n    memory: {MEM}\n",
            rootfs.display(),
            app.display()
        );
        for l in extra.lines().filter(|l| !l.trim().is_empty()) {
            y += &format!("    {}\n", l.trim());
        }
    }
    y
}

#[test]
fn config_errors_stop_startup_naming_the_key_and_line() {
    let s = Scratch::new("mv-config");
    let cases: [(String, u64, &str); 3] = [
        (
            config(&s, &[("hello", "hello", "colour: blue")]),
            1024,
            ":9:",
        ),
        (
            config(&s, &[("hello", "hello", "")]).replace("hello.img", "missing.img"),
            1024,
            ":7: functions.hello.appfs",
        ),
        (
            config(&s, &[("hello", "hello", "")]),
            39,
            ":8: functions.hello.memory",
        ),
    ];
    for (yaml, mem, want) in cases {
        let cfg = s.file("bad.yaml", yaml.as_bytes());
        let out = common::run_with_deadline(
            {
                let mut c = Command::new(multivm_bin());
                c.args([
                    "--config",
                    cfg.to_str().unwrap(),
                    "--mem",
                    &mem.to_string(),
                    "--listen",
                    "127.0.0.1:0",
                ]);
                c
            },
            Duration::from_secs(20),
        );
        assert_eq!(out.code(), Some(1), "{yaml}\n{}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(
            out.stderr.contains("bad.yaml") && out.stderr.contains(want),
            "want {want:?} in: {}",
            out.stderr
        );
    }
    let out = common::run_with_deadline(
        {
            let mut c = Command::new(multivm_bin());
            c.args(["--config", "/nonexistent.yaml", "--mem", "64"]);
            c
        },
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("/nonexistent.yaml"), "{}", out.stderr);
}

#[test]
fn requests_reuse_warm_vms_and_the_api_answers() {
    let s = Scratch::new("mv-api");
    let cfg = config(
        &s,
        &[
            ("hello", "hello", "concurrency_limit: 2"),
            ("fail", "fail", ""),
        ],
    );
    let d = Daemon::start(&s, &cfg, 10 * VM_MIB, &[]);
    assert_eq!(d.get("/healthz").json(), json!({"status": "ok"}));

    let r = d.post("hello", r#"{"name": "multivm"}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
    assert_eq!(r.json(), json!({"message": "hello, multivm"}));
    assert_eq!(r.header("x-start"), Some("cold-boot"));
    let rid = r.header("x-request-id").expect("request id").to_string();
    let vm = r.header("x-vm-id").unwrap().to_string();
    let r = d.post("hello", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"message": "hello, world"}));
    assert_eq!(r.header("x-start"), Some("warm"));
    assert_eq!(
        r.header("x-vm-id"),
        Some(vm.as_str()),
        "the idle VM is reused"
    );
    assert_ne!(r.header("x-request-id"), Some(rid.as_str()));
    // The daemon logs a request after answering it: wait for the line.
    d.wait_for("the request id in the log", Duration::from_secs(10), |d| {
        d.log().contains(&format!("[{rid}]"))
    });
    assert_eq!(
        d.metric("multivm_warm_starts_total{function=\"hello\"}"),
        1.0
    );
    assert_eq!(
        d.metric("multivm_cold_starts_total{function=\"hello\",kind=\"boot\"}"),
        1.0
    );
    assert_eq!(
        d.metric("multivm_requests_total{function=\"hello\",code=\"200\"}"),
        2.0
    );
    assert!(d.metric("multivm_scheduler_overhead_seconds_count") >= 1.0);

    // A function error is the function's answer; the VM stays.
    let r = d.post("fail", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("requested failure"));
    assert_eq!(r.header("x-function-error"), Some("true"));
    assert_eq!(d.post("fail", "{}").header("x-start"), Some("warm"));

    // Errors of the caller.
    let r = d.post("nope", "{}");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("nope"));
    assert!(r.json()["request_id"].is_string());
    // A body that is not JSON, and another method, reach the function in a
    // request envelope (envelope.rs), where `hello` finds no name.
    let r = d.post("hello", "{not json");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"message": "hello, world"}));
    assert_eq!(d.get("/function/hello").status, 200);
    assert_eq!(d.get("/nowhere").status, 404);

    // Introspection.
    let fns = d.get("/functions").json();
    let hello = fns
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "hello")
        .unwrap();
    assert_eq!(hello["concurrency_limit"], 2);
    assert_eq!(hello["vms"]["idle"], 1);
    assert_eq!(
        hello["warm_starts"], 3,
        "the two envelope calls were warm too"
    );
    let vms = d.vms();
    assert_eq!(vms.len(), 2, "{vms:?}");
    assert!(vms
        .iter()
        .all(|v| v["state"] == "idle" && v["memory_mib"] == VM_MIB));
    let log = d.get(&format!("/vms/{vm}/log"));
    assert_eq!(log.status, 200);
    assert!(
        log.body.contains("testguest: app loaded: hello"),
        "{}",
        log.body
    );
    assert_eq!(d.get("/vms/999/log").status, 404);
    assert_eq!(d.metric("multivm_memory_used_mib"), (2 * VM_MIB) as f64);

    let (code, log) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn the_budget_holds_under_a_load_that_wants_four_times_more() {
    let s = Scratch::new("mv-budget");
    // Room for 4 VMs; 16 clients over two functions want 16.
    let cfg = config(
        &s,
        &[
            ("a", "hello", "concurrency_limit: 8\nmax_queue: 64"),
            ("b", "echo", "concurrency_limit: 8\nmax_queue: 64"),
        ],
    );
    let budget = 4 * VM_MIB;
    let d = Arc::new(Daemon::start(&s, &cfg, budget, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (d, stop) = (Arc::clone(&d), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut peak = (0.0f64, 0usize, 0usize);
            while !stop.load(Ordering::SeqCst) {
                peak.0 = peak.0.max(d.metric("multivm_memory_used_mib"));
                let vms = d.vms();
                peak.1 = peak.1.max(vms.len());
                peak.2 = peak
                    .2
                    .max(vms.iter().filter(|v| v["function"] == "a").count());
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                let f = if i % 2 == 0 { "a" } else { "b" };
                let mut codes = Vec::new();
                for n in 0..6 {
                    let r = d.post(f, &format!(r#"{{"name": "c{i}-{n}"}}"#));
                    if r.status == 200 && f == "a" {
                        assert_eq!(r.json(), json!({"message": format!("hello, c{i}-{n}")}));
                    }
                    codes.push(r.status);
                }
                codes
            })
        })
        .collect();
    let codes: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    stop.store(true, Ordering::SeqCst);
    let (peak_used, peak_vms, peak_a) = sampler.join().unwrap();
    let ok = codes.iter().filter(|&&c| c == 200).count();
    assert!(
        codes.iter().all(|&c| c == 200 || c == 503),
        "{codes:?}\n{}",
        d.log()
    );
    assert!(
        ok >= codes.len() / 2,
        "{ok} of {} served: {codes:?}",
        codes.len()
    );
    let high = d.metric("multivm_memory_high_water_mib");
    assert!(
        high <= budget as f64,
        "high water {high} over budget {budget}"
    );
    assert!(
        high >= (2 * VM_MIB) as f64,
        "the load never used the budget: {high}"
    );
    assert!(peak_used <= budget as f64, "{peak_used}");
    assert!(peak_vms as u64 <= budget / VM_MIB, "{peak_vms} VMs");
    assert!(peak_a <= 8, "concurrency_limit exceeded: {peak_a}");
    assert!(
        d.metric("multivm_evictions_total{function=\"a\",reason=\"lru\"}")
            + d.metric("multivm_evictions_total{function=\"b\",reason=\"lru\"}")
            > 0.0
    );
    let d = Arc::try_unwrap(d).ok().expect("clients are done");
    let (code, log) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn concurrency_limit_caps_the_vms_of_a_function() {
    let s = Scratch::new("mv-limit");
    let cfg = config(&s, &[("echo", "echo", "concurrency_limit: 2")]);
    let d = Arc::new(Daemon::start(&s, &cfg, 10 * VM_MIB, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (d, stop) = (Arc::clone(&d), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::SeqCst) {
                peak = peak.max(d.vms().len());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                (0..3)
                    .map(|n| {
                        let r = d.post("echo", &format!(r#"{{"i": {i}, "n": {n}}}"#));
                        assert_eq!(r.status, 200, "{}", r.body);
                        assert_eq!(r.json(), json!({"i": i, "n": n}));
                    })
                    .count()
            })
        })
        .collect();
    let served: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    stop.store(true, Ordering::SeqCst);
    assert_eq!(served, 18);
    assert!(sampler.join().unwrap() <= 2);
    assert!(d.metric("multivm_cold_starts_total{function=\"echo\",kind=\"boot\"}") <= 2.0);
    assert_eq!(
        d.metric("multivm_requests_total{function=\"echo\",code=\"200\"}"),
        18.0
    );
}

#[test]
fn idle_vms_are_evicted_least_recently_used_first_and_after_idle_timeout() {
    let s = Scratch::new("mv-lru");
    let cfg = config(
        &s,
        &[
            ("a", "hello", ""),
            ("b", "hello", ""),
            ("c", "hello", ""),
            ("short", "hello", "idle_timeout: 300ms"),
        ],
    );
    let d = Daemon::start(&s, &cfg, 2 * VM_MIB, &[]);
    let functions = |d: &Daemon| -> Vec<String> {
        let mut v: Vec<String> = d
            .vms()
            .iter()
            .map(|v| v["function"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let start = |d: &Daemon, f: &str| {
        let r = d.post(f, "{}");
        assert_eq!(r.status, 200, "{f}: {}\n{}", r.body, d.log());
        r.header("x-start").unwrap().to_string()
    };
    assert_eq!(start(&d, "a"), "cold-boot");
    assert_eq!(start(&d, "b"), "cold-boot");
    assert_eq!(start(&d, "c"), "cold-boot");
    assert_eq!(functions(&d), ["b", "c"], "a was least recently used");
    assert_eq!(start(&d, "b"), "warm");
    assert_eq!(start(&d, "a"), "cold-boot");
    assert_eq!(functions(&d), ["a", "b"], "c was least recently used");
    assert_eq!(
        d.metric("multivm_evictions_total{function=\"a\",reason=\"lru\"}"),
        1.0
    );
    assert_eq!(
        d.metric("multivm_evictions_total{function=\"c\",reason=\"lru\"}"),
        1.0
    );

    // idle_timeout: `short` goes by itself; the others stay.
    assert_eq!(start(&d, "short"), "cold-boot");
    d.wait_for("short's idle timeout", Duration::from_secs(5), |d| {
        !functions(d).contains(&"short".to_string())
    });
    assert_eq!(
        d.metric("multivm_evictions_total{function=\"short\",reason=\"idle_timeout\"}"),
        1.0
    );
    assert_eq!(functions(&d).len(), 1);
    assert!(d.metric("multivm_memory_high_water_mib") <= (2 * VM_MIB) as f64);
}

#[test]
fn queueing_overload_and_timeouts() {
    let s = Scratch::new("mv-queue");
    let cfg = config(
        &s,
        &[
            ("spin", "spin", "request_timeout: 3s"),
            ("hello", "hello", "request_timeout: 1s\nmax_queue: 1"),
        ],
    );
    // Room for one VM: while spin runs, hello must wait.
    let d = Arc::new(Daemon::start(&s, &cfg, VM_MIB, &[]));
    let spin = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            let t = Instant::now();
            (d.post("spin", "{}"), t.elapsed())
        })
    };
    d.wait_for("spin to run", Duration::from_secs(20), |d| {
        d.vms()
            .iter()
            .any(|v| v["function"] == "spin" && v["state"] == "busy")
    });
    let queued = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            let t = Instant::now();
            (d.post("hello", "{}"), t.elapsed())
        })
    };
    d.wait_for("hello to queue", Duration::from_secs(5), |d| {
        d.metric("multivm_queue_depth{function=\"hello\"}") == 1.0
    });
    let full = d.post("hello", "{}");
    assert_eq!(full.status, 503, "{}", full.body);
    assert_eq!(full.header("retry-after"), Some("1"));
    assert!(full.json()["error"].as_str().unwrap().contains("waiting"));

    let (r, took) = queued.join().unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );

    let (r, took) = spin.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("timeout"));
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert_eq!(d.metric("multivm_timeouts_total{function=\"spin\"}"), 1.0);
    d.wait_for("the spinning VM to go", Duration::from_secs(5), |d| {
        d.vms().is_empty()
    });

    // The daemon keeps serving.
    let r = d.post("hello", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        d.metric("multivm_queue_rejections_total{function=\"hello\"}"),
        1.0
    );
}

#[test]
fn a_killed_firerunner_gives_502_and_the_daemon_keeps_serving() {
    let s = Scratch::new("mv-kill");
    let cfg = config(
        &s,
        &[
            ("spin", "spin", "request_timeout: 60s"),
            ("hello", "hello", ""),
        ],
    );
    let d = Arc::new(Daemon::start(&s, &cfg, 4 * VM_MIB, &[]));
    let spin = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || d.post("spin", "{}"))
    };
    d.wait_for("spin to run", Duration::from_secs(20), |d| {
        d.vms().iter().any(|v| v["state"] == "busy")
    });
    let pids = d.firerunners();
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: kill(2) on a pid read from /proc; a stale pid at worst
    // fails with ESRCH.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let r = spin.join().unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("firerunner"),
        "{}",
        r.body
    );

    // An idle VM that dies is noticed and removed without a request.
    assert_eq!(d.post("hello", "{}").status, 200);
    let pids = d.firerunners();
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: as above.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    d.wait_for(
        "the dead idle VM to be dropped",
        Duration::from_secs(5),
        |d| d.vms().is_empty(),
    );
    let r = d.post("hello", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-start"), Some("cold-boot"));
    assert_eq!(d.metric("multivm_vm_crashes_total{function=\"spin\"}"), 1.0);
    assert_eq!(
        d.metric("multivm_vm_crashes_total{function=\"hello\"}"),
        1.0
    );
}

#[test]
fn a_failing_launch_is_a_clear_502_per_request() {
    let s = Scratch::new("mv-launch");
    std::fs::create_dir_all(s.path("snap/empty")).unwrap();
    let cfg = config(&s, &[("restored", "hello", "")]).replace(
        "    memory: 32\n",
        &format!(
            "    memory: 32\n    load_dir: {}\n",
            s.path("snap/empty").display()
        ),
    );
    let d = Daemon::start(&s, &cfg, 2 * VM_MIB, &[]);
    for _ in 0..2 {
        let t = Instant::now();
        let r = d.post("restored", "{}");
        assert_eq!(r.status, 502, "{}", r.body);
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            msg.contains("launching a VM of function restored failed"),
            "{msg}"
        );
        assert!(msg.contains("firerunner exited"), "{msg}");
        assert!(t.elapsed() < Duration::from_secs(15));
    }
    assert_eq!(
        d.metric("multivm_launch_failures_total{function=\"restored\"}"),
        2.0
    );
    assert_eq!(d.metric("multivm_memory_used_mib"), 0.0);
}

#[test]
fn functions_with_load_dir_launch_by_snapshot_restore() {
    let s = Scratch::new("mv-restore");
    let (snap, diff) = (s.path("snap"), s.path("diff"));
    let rootfs = s.file("rootfs.img", &[0u8; 4096]);
    let app = app_image(&s, "dump.img", &["fn=hello"]);
    let firerunner = |extra: &[&str]| {
        let mut cmd = Command::new(common::firerunner());
        cmd.arg("--kernel")
            .arg(testguest())
            .arg("--rootfs")
            .arg(&rootfs)
            .arg("--appfs")
            .arg(&app)
            .args(["--mem_size", &MEM.to_string()])
            .args(extra)
            .arg("--console")
            .arg(s.path("dump.log"));
        let made = common::run_with_deadline(cmd, Duration::from_secs(60));
        assert_eq!(made.code(), Some(0), "{extra:?}: {}", made.stderr);
    };
    // A snapshot at testguest's first snapshot point (language snapshot),
    // a diff layer of the app on it, and the working set of one request.
    let (b, d) = (snap.display().to_string(), diff.display().to_string());
    firerunner(&["--dump_dir", &b]);
    firerunner(&["--load_dir", &b, "--dump_dir", &d]);
    let layers = format!("{b},{d}");
    let mut record = Command::new(common::singlevm());
    record
        .arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--appfs")
        .arg(&app)
        .args([
            "--mem_size",
            &MEM.to_string(),
            "--load_dir",
            &layers,
            "--dump_ws",
        ])
        .env("TMPDIR", &s.0);
    let recorded = common::run_with_input(record, b"{}\n".to_vec(), Duration::from_secs(60));
    assert_eq!(recorded.code(), Some(0), "{}", recorded.stderr);
    assert!(diff.join("ws.json").is_file());

    let cfg = config(&s, &[("restored", "hello", ""), ("layered", "hello", "")])
        .replacen(
            "    memory: 32\n",
            &format!("    memory: 32\n    load_dir: {b}\n"),
            1,
        )
        .replace(
            "layered.img\n    memory: 32\n",
            &format!("layered.img\n    memory: 32\n    load_dir: {layers}\n    load_ws: true\n"),
        );
    assert!(cfg.contains("load_ws: true"), "{cfg}");
    let d = Daemon::start(&s, &cfg, 3 * VM_MIB, &[]);
    for f in ["restored", "layered"] {
        let r = d.post(f, r#"{"name": "clone"}"#);
        assert_eq!(r.status, 200, "{f}: {}\n{}", r.body, d.log());
        assert_eq!(r.json(), json!({"message": "hello, clone"}));
        assert_eq!(r.header("x-start"), Some("cold-restore"));
        assert_eq!(d.post(f, "{}").header("x-start"), Some("warm"));
        assert_eq!(
            d.metric(&format!(
                "multivm_cold_starts_total{{function=\"{f}\",kind=\"restore\"}}"
            )),
            1.0
        );
    }
    assert!(d.vms().iter().all(|v| v["launch"] == "restore"));
}

#[test]
fn sigterm_drains_and_leaves_no_processes_or_files() {
    let s = Scratch::new("mv-term");
    let cfg = config(
        &s,
        &[
            ("warm", "hello", "min_idle: 2\nconcurrency_limit: 3"),
            ("spin", "spin", "request_timeout: 60s"),
        ],
    );
    let d = Arc::new(Daemon::start(
        &s,
        &cfg,
        3 * VM_MIB,
        &["--drain_timeout", "1"],
    ));
    d.wait_for("2 pre-warmed VMs", Duration::from_secs(20), |d| {
        d.vms().iter().filter(|v| v["state"] == "idle").count() == 2
    });
    let r = d.post("warm", "{}");
    assert_eq!(r.header("x-start"), Some("warm"), "{}", r.body);
    let spin = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || d.post("spin", "{}"))
    };
    d.wait_for("spin to run", Duration::from_secs(20), |d| {
        d.vms().iter().any(|v| v["state"] == "busy")
    });
    let pids = d.firerunners();
    assert!((2..=3).contains(&pids.len()), "{pids:?}");
    let runtime = d.runtime.clone();
    assert!(std::fs::read_dir(&runtime).unwrap().count() > 0);
    let pid = d.child.id();
    let t = Instant::now();
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // The spinning request is failed after the 1 s drain.
    let r = spin.join().unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    let d = Arc::try_unwrap(d).ok().expect("the client is done");
    let (code, log) = d.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{log}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "firerunner {p} survived"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&runtime)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind in the runtime dir: {left:?}");
}

#[test]
fn openfaas_style_invocations_carry_method_path_query_headers_and_raw_bodies() {
    let s = Scratch::new("mv-envelope");
    let cfg = config(&s, &[("http", "http", ""), ("hello", "hello", "")]);
    let d = Daemon::start(&s, &cfg, 4 * VM_MIB, &[]);
    let csv = "a,b\n1,\"two\"\n\u{0}\u{1}\\ é\n";
    let r = common::http_with(
        &d.addr,
        "PUT",
        "/function/http/a/b?x=1&y=%20",
        &[("Content-Type", "text/csv"), ("X-Status", "201")],
        csv.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.body, d.log());
    assert_eq!(r.body, csv, "the raw body comes back byte for byte");
    assert_eq!(r.header("content-type"), Some("text/csv"));
    assert_eq!(r.header("x-method"), Some("PUT"));
    assert_eq!(r.header("x-path"), Some("/a/b"));
    assert_eq!(r.header("x-query"), Some("x=1&y=%20"));
    assert!(r.header("x-vm-id").is_some());

    let r = common::http_with(&d.addr, "GET", "/function/http", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "");
    assert_eq!(r.header("x-method"), Some("GET"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));

    // A plain JSON call is unchanged, whatever its content type.
    let r = common::http_with(
        &d.addr,
        "POST",
        "/function/http",
        &[("Content-Type", "text/plain")],
        br#"{"n": 1}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"plain": {"n": 1}}));
    assert_eq!(r.header("content-type"), Some("application/json"));
    // faas-cli invoke's text/plain that is not JSON reaches a JSON function too.
    let r = common::http_with(
        &d.addr,
        "POST",
        "/function/hello",
        &[("Content-Type", "text/plain")],
        b"just text",
    );
    assert_eq!(r.json(), json!({"message": "hello, world"}));

    // 1 MiB of body in base64 both ways; above 3 MiB less 64 KiB, 413.
    let big = "z".repeat(1 << 20);
    let r = common::http_with(&d.addr, "POST", "/function/http/big", &[], big.as_bytes());
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(200)]);
    assert_eq!(r.body.len(), big.len());
    assert!(r.body == big);
    let over = "z".repeat((3 << 20) - (64 << 10) + 1);
    let r = common::http_with(&d.addr, "POST", "/function/http", &[], over.as_bytes());
    assert_eq!(r.status, 413, "{}", &r.body[..r.body.len().min(200)]);
    assert!(r.json()["error"].as_str().unwrap().contains("base64"));
    assert_eq!(d.post("http", "{}").status, 200, "the daemon keeps serving");
}

#[test]
fn with_cluster_a_functions_own_503_is_a_500_so_balancers_never_run_it_twice() {
    let s = Scratch::new("mv-cluster503");
    let cfg = config(&s, &[("http", "http", "")]);
    for (extra, want) in [(&[][..], 503), (&["--cluster"][..], 500)] {
        let d = Daemon::start(&s, &cfg, 2 * VM_MIB, extra);
        let r = common::http_with(
            &d.addr,
            "GET",
            "/function/http/x",
            &[("X-Status", "503")],
            b"",
        );
        assert_eq!(r.status, want, "{extra:?}: {}", r.body);
        let marked = r.header("x-function-status");
        assert_eq!(marked, (want == 500).then_some("503"), "{extra:?}");
        assert!(r.header("x-vm-id").is_some(), "the function ran");
        let (code, log) = d.terminate(Duration::from_secs(20));
        assert_eq!(code, Some(0), "{log}");
    }
}

#[test]
fn vms_run_with_their_seccomp_filters_unless_multivm_has_no_seccomp() {
    for (extra, mode) in [(&[][..], "2"), (&["--no_seccomp"][..], "0")] {
        let s = Scratch::new("mv-seccomp");
        let cfg = config(&s, &[("hello", "hello", "")]);
        let d = Daemon::start(&s, &cfg, 10 * VM_MIB, extra);
        let r = d.post("hello", "");
        assert_eq!(r.status, 200, "{extra:?}: {}\n{}", r.body, d.log());
        let pids = d.firerunners();
        assert_eq!(pids.len(), 1, "{extra:?}: {pids:?}");
        let modes = thread_modes(pids[0]);
        assert!(modes.iter().any(|(n, _)| n == "vcpu0"), "{modes:?}");
        for (thread, m) in &modes {
            assert_eq!(m, mode, "{extra:?}: thread {thread}: {modes:?}");
        }
    }
}

#[test]
fn a_vmm_over_its_cgroup_memory_limit_is_stopped_and_the_daemon_answers_502() {
    use snapvm::vmm::runner::hooks::{HOG_AFTER_MS_ENV, HOG_MIB_ENV};
    assert!(nix::unistd::geteuid().is_root(), "the jail needs root");
    let s = Scratch::new("mv-oom");
    let cfg = config(
        &s,
        &[
            ("spin", "spin", "request_timeout: 60s"),
            ("hello", "hello", ""),
        ],
    );
    // Every VM's firerunner (test hook) writes 64 MiB of its own memory
    // 1.5 s after it starts: more than its cgroup's 32 + 8 MiB.
    let d = Daemon::start_env(
        &s,
        &cfg,
        4 * VM_MIB,
        &[],
        &[(HOG_MIB_ENV, "64"), (HOG_AFTER_MS_ENV, "1500")],
    );
    let t = Instant::now();
    let r = d.post("spin", "{}");
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("SIGKILL"), "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let limit = format!("killed by its cgroup's memory limit ({VM_MIB} MiB)");
    d.wait_for("the OOM report", Duration::from_secs(5), |d| {
        d.log().contains(&limit)
    });
    // The daemon stays up and serves (a new VM answers before its hook).
    let r = d.post("hello", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"message": "hello, world"}));
    let (code, log) = d.terminate(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{log}");
}

/// Writes at `snap` a snapshot of a testguest VM of `mem` MiB at its
/// first snapshot point (no app yet: a language snapshot).
fn snapshot_at_first_point(s: &Scratch, snap: &std::path::Path, mem: u64) {
    let rootfs = s.file("rootfs.img", &[0u8; 4096]);
    let mut cmd = Command::new(common::firerunner());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--mem_size", &mem.to_string(), "--dump_dir"])
        .arg(snap)
        .arg("--console")
        .arg(s.path("dump.log"));
    let made = common::run_with_deadline(cmd, Duration::from_secs(60));
    assert_eq!(made.code(), Some(0), "{}", made.stderr);
}

/// Shells (`shells:` in the config) kept ready, jailed like every VM:
/// restores take one (`X-Start: cold-shell`) and the pool refills; ready
/// shells that die are never handed out (the request is still answered);
/// under eviction the shells' share and the VMs together stay within the
/// budget.
#[test]
fn restores_take_ready_shells_which_are_refilled_and_counted_in_the_budget() {
    let s = Scratch::new("mv-shells");
    let snap = s.path("snap");
    snapshot_at_first_point(&s, &snap, MEM);
    let restore = format!("load_dir: {}", snap.display());
    let cfg = config(
        &s,
        &[("one", "hello", &restore), ("two", "hello", &restore)],
    )
    .replace(
        "functions:\n",
        &format!("shells:\n  - memory: {MEM}\n    count: 2\nfunctions:\n"),
    );
    // Two shells (8 MiB each) and one VM (40 MiB): the two functions evict
    // each other.
    let budget = 2 * OVERHEAD + VM_MIB;
    let d = Daemon::start(&s, &cfg, budget, &[]);
    let ready = format!("multivm_shells_ready{{memory_mib=\"{MEM}\",vcpus=\"1\"}}");
    let full = |d: &Daemon| d.metric(&ready) == 2.0;
    d.wait_for("two ready shells", Duration::from_secs(20), full);
    assert_eq!(d.metric("multivm_memory_used_mib"), (2 * OVERHEAD) as f64);
    assert_eq!(d.metric("multivm_memory_budget_mib"), budget as f64);

    for (i, f) in ["one", "two", "one", "two"].iter().enumerate() {
        let r = d.post(f, r#"{"name": "shell"}"#);
        assert_eq!(r.status, 200, "{f}: {}\n{}", r.body, d.log());
        assert_eq!(r.json(), json!({"message": "hello, shell"}));
        assert_eq!(r.header("x-start"), Some("cold-shell"), "request {i}");
        d.wait_for("the pool refilled", Duration::from_secs(20), full);
    }
    assert_eq!(
        d.metric("multivm_cold_starts_total{function=\"one\",kind=\"shell\"}"),
        2.0
    );
    assert!(d.metric("multivm_memory_high_water_mib") <= budget as f64);

    // Both ready shells killed (and the idle VM, once a shell too): the
    // next restore must not get one.
    let shells: Vec<u32> = d
        .firerunners()
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|&b| b == 0).any(|a| a == b"shell")
        })
        .collect();
    assert_eq!(
        shells.len(),
        3,
        "two ready shells and the idle VM: {shells:?}"
    );
    for pid in &shells {
        // SAFETY: kill(2) on a firerunner of this test's daemon.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let r = d.post("one", "{}");
    assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
    assert_eq!(r.json(), json!({"message": "hello, world"}));
    d.wait_for("dead shells replaced", Duration::from_secs(20), full);
    assert!(d.metric("multivm_memory_high_water_mib") <= budget as f64);
    let (code, log) = d.terminate(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{log}");
}

/// The VM network namespaces that exist (src/network.rs names them
/// `snapvm-<uid>`).
fn vm_namespaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.strip_prefix("snapvm-")
                        .is_some_and(|u| u.bytes().all(|b| b.is_ascii_digit()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_networked_function_gets_a_namespace_per_vm_that_goes_with_its_vm() {
    let s = Scratch::new("mv-net");
    let cfg = format!(
        "allow_network: true\n{}",
        config(
            &s,
            &[
                ("net", "hello", "network: true\nidle_timeout: 500ms"),
                ("plain", "hello", ""),
            ]
        )
    );
    // Leftovers of a killed controller in the default slot range: one
    // whose slot no one holds goes at start, one whose slot is held (by
    // this test, as a live controller would) stays.
    let (free, held) = (965_400, 965_401);
    for uid in [free, held] {
        let _ = Command::new("ip")
            .args(["netns", "add", &format!("snapvm-{uid}")])
            .status();
    }
    std::fs::create_dir_all("/run/snapvm/jail/slots").unwrap();
    let lock = std::fs::File::create(format!("/run/snapvm/jail/slots/{held}.lock")).unwrap();
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .expect("the test's slot lock");
    let before: Vec<String> = vm_namespaces()
        .into_iter()
        .filter(|n| *n != format!("snapvm-{free}"))
        .collect();
    let d = Daemon::start(&s, &cfg, 10 * VM_MIB, &[]);
    assert!(
        !vm_namespaces().contains(&format!("snapvm-{free}")),
        "the free slot's leftover namespace was not removed at start"
    );
    assert!(vm_namespaces().contains(&format!("snapvm-{held}")));
    drop(lock);
    let _ = Command::new("ip")
        .args(["netns", "del", &format!("snapvm-{held}")])
        .status();
    let before: Vec<String> = before
        .into_iter()
        .filter(|n| *n != format!("snapvm-{held}"))
        .collect();
    for f in ["net", "plain"] {
        let r = d.post(f, "");
        assert_eq!(r.status, 200, "{f}: {}\n{}", r.body, d.log());
    }
    let added: Vec<String> = vm_namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert_eq!(
        added.len(),
        1,
        "one namespace, the networked VM's: {added:?}"
    );
    // The networked VM holds its TAP on fd 4 and booted with its address;
    // the other has no TAP.
    let mut taps = 0;
    for pid in d.firerunners() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let fd4 = std::fs::read_link(format!("/proc/{pid}/fd/4")).ok();
        if cmdline.contains("--tap_fd 4") {
            taps += 1;
            assert_eq!(fd4, Some("/dev/net/tun".into()), "{cmdline}");
            assert!(cmdline.contains("ip=172.16.0.2::172.16.0.1:"), "{cmdline}");
        } else {
            assert_ne!(fd4, Some("/dev/net/tun".into()), "{cmdline}");
        }
    }
    assert_eq!(taps, 1, "{}", d.log());
    // The idle networked VM is stopped after its idle_timeout; its
    // namespace and uplink go with it.
    let uid = added[0].trim_start_matches("snapvm-").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm_namespaces().contains(&added[0]) {
        assert!(
            Instant::now() < deadline,
            "{} outlived its VM\n{}",
            added[0],
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let link = Command::new("ip")
        .args(["link", "show", &format!("snv{uid}")])
        .output()
        .unwrap();
    assert!(
        !link.status.success(),
        "the uplink snv{uid} outlived its VM"
    );
    // The next request gets a new VM and a namespace again.
    assert_eq!(d.post("net", "").status, 200, "{}", d.log());
    let again: Vec<String> = vm_namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert_eq!(again.len(), 1, "{again:?}");
    // A clean stop removes it too.
    let (code, log) = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !vm_namespaces().contains(&again[0]),
        "{} outlived multivm",
        again[0]
    );
}

/// The `layer-*` directories in a hibernation directory.
fn layers_in(dir: &std::path::Path) -> Vec<String> {
    common::dir_entries(dir)
        .into_iter()
        .filter(|n| n.starts_with("layer-"))
        .collect()
}

/// The hibernated VMs waiting for a wake of function `f`, from /functions.
fn hibernated(d: &Daemon, f: &str) -> u64 {
    d.get("/functions")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == f)
        .map_or(0, |x| x["hibernated"].as_u64().unwrap())
}

/// A keep_state function's idle VM is hibernated at its idle timeout, not
/// stopped, and the next request wakes it where it left off: testguest's
/// `count` answers exactly as a VM that never stopped (the count and the
/// checksum of the memory the previous request left), across more
/// hibernate/wake cycles than a chain holds, so layers are merged rather
/// than stacked. A layer changed on disk is refused: a clean start.
#[test]
fn keep_state_vms_hibernate_when_idle_and_wake_where_they_left_off() {
    let s = Scratch::new("mv-hibernate");
    let hib = s.path("hib");
    let cfg = config(
        &s,
        &[
            ("kept", "count", "keep_state: true\nidle_timeout: 200ms"),
            ("straight", "count", ""),
        ],
    )
    .replace(
        "functions:\n",
        &format!("hibernate:\n  dir: {}\nfunctions:\n", hib.display()),
    );
    let d = Daemon::start(&s, &cfg, 4 * VM_MIB, &[]);
    let call = |f: &str| {
        let r = d.post(f, "{}");
        assert_eq!(r.status, 200, "{f}: {}\n{}", r.body, d.log());
        (r.header("x-start").unwrap().to_string(), r.json())
    };
    // What a VM that never stops answers to its n-th request.
    let want: Vec<serde_json::Value> = (0..7).map(|_| call("straight").1).collect();
    assert_eq!(want[6]["count"], 7);

    assert_eq!(call("kept"), ("cold-boot".into(), want[0].clone()));
    assert_eq!(call("kept"), ("warm".into(), want[1].clone()));
    for cycle in 1..=5u64 {
        d.wait_for("a hibernation", Duration::from_secs(20), |d| {
            d.metric("multivm_hibernations_total{function=\"kept\",result=\"ok\"}") == cycle as f64
        });
        assert_eq!(hibernated(&d, "kept"), 1);
        let on_disk = layers_in(&hib);
        // Chains hold at most 3 layers: the 4th hibernation merges them.
        let chain = if cycle <= 3 { cycle } else { cycle - 3 };
        assert_eq!(on_disk.len() as u64, chain, "cycle {cycle}: {on_disk:?}");
        assert!(
            !common::dir_entries(&hib)
                .iter()
                .any(|n| n.starts_with("vm-")),
            "no VM runs, so no VM directory is left"
        );
        assert!(d.metric("multivm_hibernate_disk_bytes") > 0.0);
        assert_eq!(
            call("kept"),
            ("cold-wake".into(), want[1 + cycle as usize].clone()),
            "cycle {cycle}"
        );
        assert_eq!(hibernated(&d, "kept"), 0);
    }
    assert_eq!(
        d.metric("multivm_wakes_total{function=\"kept\",result=\"ok\"}"),
        5.0
    );
    assert_eq!(
        d.metric("multivm_evictions_total{function=\"straight\",reason=\"idle_timeout\"}"),
        0.0
    );

    // A changed page in the newest layer: refused, and a clean start.
    d.wait_for("a hibernation", Duration::from_secs(20), |d| {
        hibernated(d, "kept") == 1
    });
    let mut on_disk = layers_in(&hib);
    on_disk.sort_by_key(|n| n["layer-".len()..].parse::<u64>().unwrap());
    let top = hib.join(on_disk.last().unwrap());
    let state = std::fs::read(top.join("snapshot.json")).unwrap();
    let state = snapvm::snapshot::format::state_value(&state).unwrap();
    let own = state["memory"]["layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap();
    let first_page = own["ranges"][0][0].as_u64().unwrap();
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(top.join("memory"))
        .unwrap();
    let mut byte = [0u8; 1];
    use std::os::unix::fs::FileExt;
    memory.read_exact_at(&mut byte, first_page + 8).unwrap();
    memory.write_all_at(&[!byte[0]], first_page + 8).unwrap();
    drop(memory);
    assert_eq!(call("kept"), ("cold-boot".into(), want[0].clone()));
    assert_eq!(
        d.metric("multivm_wakes_total{function=\"kept\",result=\"refused\"}"),
        1.0
    );
    assert!(
        layers_in(&hib).is_empty(),
        "the refused image's layers went"
    );

    // Without --basic_auth_dir, no VM moves in or out.
    let body = json!({"function": "kept", "target": "127.0.0.1:1"}).to_string();
    let r = common::http_with(&d.addr, "POST", "/system/migrate", &[], body.as_bytes());
    assert_eq!(r.status, 403, "{}", r.body);
    let r = common::http_with(&d.addr, "PUT", "/system/hibernated/kept", &[], b"layers");
    assert_eq!(r.status, 403, "{}", r.body);
}

/// Evicting a keep_state function's idle VM for another function's launch
/// hibernates it first (the budget holds throughout), a restored function
/// hibernates as a diff over its own layers, and the hibernation disk
/// budget drops the least recently hibernated VM, whose function then
/// starts clean.
#[test]
fn eviction_hibernates_within_the_budget_and_the_disk_budget_drops_the_oldest() {
    let s = Scratch::new("mv-hib-budget");
    let (snap, hib) = (s.path("snap"), s.path("hib"));
    snapshot_at_first_point(&s, &snap, 48);
    // Three restored keep_state functions of 48 MiB whose `touch` writes
    // 8 MiB of pages, room for one VM (each launch evicts the one before),
    // and 20 MiB of disk for hibernated layers: two of them.
    let kept = format!("keep_state: true\nload_dir: {}", snap.display());
    let cfg = config(
        &s,
        &[
            ("a", "touch", &kept),
            ("b", "touch", &kept),
            ("c", "touch", &kept),
        ],
    )
    .replace("    memory: 32\n", "    memory: 48\n")
    .replace(
        "functions:\n",
        &format!(
            "hibernate:\n  dir: {}\n  disk: 20\nfunctions:\n",
            hib.display()
        ),
    );
    let one_vm = 48 + OVERHEAD;
    let d = Daemon::start(&s, &cfg, one_vm, &[]);
    let call = |f: &str| {
        let r = d.post(f, r#"{"mib": 8}"#);
        assert_eq!(r.status, 200, "{f}: {}\n{}", r.body, d.log());
        assert_eq!(r.json()["touched_mib"], 8, "{}", r.body);
        r.header("x-start").unwrap().to_string()
    };
    assert_eq!(call("a"), "cold-restore");
    assert_eq!(call("b"), "cold-restore");
    assert_eq!(
        d.metric("multivm_evictions_total{function=\"a\",reason=\"lru\"}"),
        1.0
    );
    assert_eq!(hibernated(&d, "a"), 1, "{}", d.log());
    // A diff over the function's snapshot: about the 8 MiB touched.
    let one_layer = d.metric("multivm_hibernate_disk_bytes");
    assert!(
        (8.0 * 1048576.0..10.0 * 1048576.0).contains(&one_layer),
        "{one_layer}"
    );
    assert_eq!(call("c"), "cold-restore");
    assert_eq!(hibernated(&d, "b"), 1, "{}", d.log());
    assert_eq!(d.metric("multivm_hibernated_dropped_total"), 0.0);

    // a wakes (its image is taken before c hibernates); c's layer makes
    // three, over the budget: the least recently hibernated image, b's,
    // goes, and b starts clean.
    assert_eq!(call("a"), "cold-wake", "{}", d.log());
    assert_eq!(d.metric("multivm_hibernated_dropped_total"), 1.0);
    assert_eq!(
        (hibernated(&d, "b"), hibernated(&d, "c")),
        (0, 1),
        "{}",
        d.log()
    );
    // a hibernates again, a diff over its first layer: c's image, now the
    // oldest, goes; a's two-layer chain wakes.
    assert_eq!(call("b"), "cold-restore");
    assert_eq!(d.metric("multivm_hibernated_dropped_total"), 2.0);
    assert_eq!((hibernated(&d, "a"), hibernated(&d, "c")), (1, 0));
    assert_eq!(call("a"), "cold-wake", "{}", d.log());
    assert_eq!(
        d.metric("multivm_wakes_total{function=\"a\",result=\"ok\"}"),
        2.0
    );
    assert!(d.metric("multivm_memory_high_water_mib") <= one_vm as f64);
}

/// `POST /system/migrate` moves an idle VM of a keep_state function to
/// another node: it counts on there where it left off, and the source
/// starts the function clean. The target refuses layers that do not stack
/// on its own snapshot of the function (the VM then stays hibernated on
/// the source, losing nothing), layers from another CPU, and garbage;
/// both routes need the provider API's credentials.
#[test]
fn a_vm_moves_to_another_node_and_counts_on_there() {
    let (s, t, u) = (
        Scratch::new("mv-move-src"),
        Scratch::new("mv-move-dst"),
        Scratch::new("mv-move-other"),
    );
    let (snap, other_snap) = (s.path("snap"), u.path("snap"));
    snapshot_at_first_point(&s, &snap, MEM);
    snapshot_at_first_point(&u, &other_snap, MEM);
    let creds = s.path("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(creds.join("basic-auth-password"), "s3cret\n").unwrap();
    let auth = [("Authorization", "Basic YWRtaW46czNjcmV0")];
    let node = |sc: &Scratch, snap: &std::path::Path| {
        let kept = format!("keep_state: true\nload_dir: {}", snap.display());
        config(
            sc,
            &[("counter", "count", &kept), ("straight", "count", "")],
        )
        .replace(
            "functions:\n",
            &format!(
                "hibernate:\n  dir: {}\nfunctions:\n",
                sc.path("hib").display()
            ),
        )
    };
    let flags = ["--basic_auth_dir", creds.to_str().unwrap()];
    let src = Daemon::start(&s, &node(&s, &snap), 4 * VM_MIB, &flags);
    let dst = Daemon::start(&t, &node(&t, &snap), 4 * VM_MIB, &flags);
    let other = Daemon::start(&u, &node(&u, &other_snap), 4 * VM_MIB, &flags);
    let call = |d: &Daemon, f: &str| {
        let r = d.post(f, "{}");
        assert_eq!(r.status, 200, "{f}: {}\n{}", r.body, d.log());
        (r.header("x-start").unwrap().to_string(), r.json())
    };
    let want: Vec<serde_json::Value> = (0..8).map(|_| call(&src, "straight").1).collect();
    for n in 0..3 {
        call(&src, "counter");
        assert_eq!(call(&src, "counter").1, want[2 * n + 1]);
    }
    let migrate = |d: &Daemon, to: &str, headers: &[(&str, &str)]| {
        let body = json!({"function": "counter", "target": to}).to_string();
        common::http_with(&d.addr, "POST", "/system/migrate", headers, body.as_bytes())
    };
    assert_eq!(migrate(&src, &dst.addr, &[]).status, 401);

    // Another snapshot of the function there: refused, and kept here.
    let r = migrate(&src, &other.addr, &auth);
    assert_eq!(r.status, 502, "{}", r.body);
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(msg.contains("409") && msg.contains("do not stack"), "{msg}");
    assert_eq!(hibernated(&src, "counter"), 1);
    assert_eq!(hibernated(&other, "counter"), 0);

    // A layer of this VM claiming another TSC frequency: refused too.
    let layer = s.path("hib").join(&layers_in(&s.path("hib"))[0]);
    let state_path = layer.join("snapshot.json");
    let mut state =
        snapvm::snapshot::format::state_value(&std::fs::read(&state_path).unwrap()).unwrap();
    let forged = s.path("forged");
    std::fs::create_dir_all(&forged).unwrap();
    std::fs::copy(layer.join("memory"), forged.join("memory")).unwrap();
    state["vcpus"][0]["tsc_khz"] = json!(1234567);
    let sealed = snapvm::snapshot::format::seal_value(snapvm::snapshot::format::VERSION, &state);
    std::fs::write(forged.join("snapshot.json"), sealed.unwrap()).unwrap();
    let mut stream = 1u32.to_le_bytes().to_vec();
    snapvm::snapshot::chain::send(&forged, &mut stream).unwrap();
    let put = |body: &[u8]| {
        let mut h = auth.to_vec();
        h.push(("Content-Type", "application/octet-stream"));
        common::http_with(&dst.addr, "PUT", "/system/hibernated/counter", &h, body)
    };
    let r = put(&stream);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("CPU"), "{}", r.body);
    // Garbage, a stream cut short, a function that keeps no state.
    assert_eq!(put(b"garbage").status, 400);
    assert_eq!(put(&stream[..stream.len() / 2]).status, 400);
    let r = common::http_with(
        &dst.addr,
        "PUT",
        "/system/hibernated/straight",
        &auth,
        &stream,
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(hibernated(&dst, "counter"), 0);
    assert!(
        layers_in(&t.path("hib")).is_empty(),
        "refused layers are removed"
    );

    // The move: the source's hibernated VM wakes (count 7) and is then
    // moved to dst, which counts on (8); the source starts clean (1).
    assert_eq!(call(&src, "counter"), ("cold-wake".into(), want[6].clone()));
    let r = migrate(&src, &dst.addr, &auth);
    assert_eq!(r.status, 200, "{}\n{}\n{}", r.body, src.log(), dst.log());
    assert!(r.json()["bytes"].as_u64().unwrap() > 0, "{}", r.body);
    assert_eq!(hibernated(&src, "counter"), 0);
    assert_eq!(hibernated(&dst, "counter"), 1);
    assert_eq!(call(&dst, "counter"), ("cold-wake".into(), want[7].clone()));
    assert_eq!(
        call(&src, "counter"),
        ("cold-restore".into(), want[0].clone())
    );
    assert_eq!(
        src.metric("multivm_migrations_total{function=\"counter\",direction=\"out\"}"),
        1.0
    );
    assert_eq!(
        dst.metric("multivm_migrations_total{function=\"counter\",direction=\"in\"}"),
        1.0
    );
    // A function that keeps no state never moves.
    let body = json!({"function": "straight", "target": dst.addr}).to_string();
    let r = common::http_with(&src.addr, "POST", "/system/migrate", &auth, body.as_bytes());
    assert_eq!(r.status, 409, "{}", r.body);
}
