//! Restore into a VM shell against a fresh restore, interleaved (issue
//! 21's benchmark), unjailed and jailed: testguest `count`, 128 MiB, 1
//! vCPU, its full snapshot restored lazily. Fresh: spawning firerunner
//! (through the jailer when jailed) with `--load_dir` → the guest's first
//! answer. Shell: a `firerunner shell` that reported ready (VM, vCPU and
//! memory slots made ahead, in its jail when jailed) → its restore asked
//! (the layers shown to a jailed shell included) → the guest's first
//! answer. Prints each side's median, p10 and p90 and the ratios.
//!
//!   cargo bench --bench shell [-- RUNS]     (default 30; root, /dev/kvm)

#[path = "../tests/common/mod.rs"]
mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{app_image, firerunner, testguest, Scratch};
use snapvm::control::{AfterSnapshot, Command, Event, RestoreRequest};
use snapvm::jail::JailOptions;
use snapvm::launcher::{self, Launch, VmProcess};

const LIMIT: Duration = Duration::from_secs(60);

fn launch(args: Vec<OsString>, jail: &Option<JailOptions>) -> Launch {
    Launch {
        firerunner: PathBuf::from(firerunner()),
        vm_args: args,
        console: None,
        jail: jail.clone(),
        network: false,
    }
}

/// When firerunner said its vCPUs run (`ready`), and when the guest's
/// first answer came.
fn running_and_first_answer(mut vm: VmProcess) -> (Instant, Instant) {
    let deadline = Instant::now() + LIMIT;
    let running = loop {
        match vm.events().recv_deadline(deadline) {
            Ok(Event::Ready { .. }) => break Instant::now(),
            Ok(_) => {}
            Err(e) => panic!("no ready event: {e}: {}", vm.failure_detail()),
        }
    };
    let agent = vm.wait_for_guest(LIMIT).expect("the guest connects");
    let deadline = Some(Instant::now() + LIMIT);
    launcher::handshake(&agent, deadline).expect("handshake");
    vm.call(&agent, b"{}", deadline).expect("an answer");
    (running, Instant::now())
}

fn percentile(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() - 1) * p / 100]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let s = Scratch::new("bench-shell");
    let rootfs = s.file("rootfs.img", &[7u8; 4096]);
    let app = app_image(&s, "count.img", &["fn=count"]);
    let snaps = s.path("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let base: Vec<OsString> = vec![
        "--kernel".into(),
        testguest().into(),
        "--rootfs".into(),
        rootfs.clone().into(),
        "--appfs".into(),
        app.clone().into(),
    ];
    // The snapshot: booted, one answer, snapshotted.
    let mut args = base.clone();
    args.extend(["--snapshot_dir".into(), snaps.clone().into()]);
    let mut vm = VmProcess::spawn(&launch(args, &None)).unwrap();
    let agent = vm.wait_for_guest(LIMIT).unwrap();
    launcher::handshake(&agent, None).unwrap();
    vm.call(&agent, b"{}", None).unwrap();
    vm.command(&Command::Snapshot {
        name: "one".into(),
        then: AfterSnapshot::Exit,
    })
    .unwrap();
    assert!(vm.wait_for_exit(LIMIT).unwrap().success());
    let snap: &Path = &snaps.join("one");

    let jail = Some(JailOptions {
        jailer: PathBuf::from(env!("CARGO_BIN_EXE_jailer")),
        base: s.path("jails"),
        uid_base: 730_000,
        uid_count: 64,
        vm_overhead_mib: snapvm::multivm::config::DEFAULT_VM_OVERHEAD_MIB,
    });
    let request = RestoreRequest {
        rootfs: rootfs.clone(),
        appfs: Some(app.clone()),
        layers: vec![snap.to_path_buf()],
        ..Default::default()
    };
    // [fresh, shell] x [unjailed, jailed]
    // (→ vCPUs running, → first answer) of each side.
    let mut samples: [(Vec<f64>, Vec<f64>); 4] = Default::default();
    for i in 0..runs {
        let mut order = [0, 1, 2, 3];
        order.rotate_left(i % 4);
        for k in order {
            let jail = if k >= 2 { &jail } else { &None };
            let (t, (running, answered)) = if k % 2 == 0 {
                let mut args = base.clone();
                args.extend(["--load_dir".into(), snap.into()]);
                let t = Instant::now();
                let vm = VmProcess::spawn(&launch(args, jail)).unwrap();
                (t, running_and_first_answer(vm))
            } else {
                let a = vec!["shell".into(), "--mem_size".into(), "128".into()];
                let sh = VmProcess::spawn(&launch(a, jail)).unwrap();
                match sh.events().recv_deadline(Instant::now() + LIMIT) {
                    Ok(Event::ShellReady { .. }) => {}
                    other => panic!("shell not ready: {other:?}"),
                }
                let t = Instant::now();
                sh.restore(&request).unwrap();
                (t, running_and_first_answer(sh))
            };
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            samples[k].0.push(ms(running - t));
            samples[k].1.push(ms(answered - t));
        }
    }
    let report = |name: &str, v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let m = percentile(v, 50);
        println!(
            "  {name:<42} median {m:6.2} ms  p10 {:6.2}  p90 {:6.2}  (n={})",
            percentile(v, 10),
            percentile(v, 90),
            v.len()
        );
        m
    };
    let names = [
        "fresh firerunner --load_dir",
        "restore asked of a ready shell",
        "fresh, jailed",
        "ready shell, jailed",
    ];
    for (what, pick) in [
        ("vCPUs running (firerunner's ready)", 0),
        ("the guest's first answer", 1),
    ] {
        println!("restore of a 128 MiB testguest snapshot → {what}, interleaved:");
        let m: Vec<f64> = samples
            .iter_mut()
            .zip(names)
            .map(|(s, name)| report(name, if pick == 0 { &mut s.0 } else { &mut s.1 }))
            .collect();
        println!(
            "  shell / fresh: x{:.2}; jailed shell / jailed fresh: x{:.2}; jailed shell - unjailed fresh: {:+.2} ms",
            m[1] / m[0],
            m[3] / m[2],
            m[3] - m[0]
        );
    }
}
