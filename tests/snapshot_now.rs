//! Snapshots on demand (the control channel's `snapshot` command) on real
//! KVM with testguest's `count`, whose answers depend only on how many
//! requests the VM has served: a VM snapshotted mid-life and restored goes
//! on counting where it was, full snapshots of booted VMs and diff layers
//! of restored ones alike, jailed or not; refusals leave the VM serving.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{app_image, firerunner, testguest, Scratch};
use serde_json::Value;
use snapvm::control::{AfterSnapshot, Command, Event};
use snapvm::jail::JailOptions;
use snapvm::launcher::{self, Launch, VmProcess};

const LIMIT: Duration = Duration::from_secs(60);

struct Vm {
    process: VmProcess,
    agent: UnixStream,
}

impl Vm {
    fn start(s: &Scratch, args: &[&str], jail: Option<JailOptions>) -> Vm {
        let rootfs = s.file("rootfs.img", &[7u8; 4096]);
        let mut vm_args: Vec<std::ffi::OsString> = vec![
            "--kernel".into(),
            testguest().into(),
            "--rootfs".into(),
            rootfs.into(),
        ];
        vm_args.extend(args.iter().map(Into::into));
        let launch = Launch {
            firerunner: PathBuf::from(firerunner()),
            vm_args,
            console: None,
            jail,
            network: false,
        };
        let mut process = VmProcess::spawn(&launch).expect("spawn firerunner");
        let agent = match process.wait_for_guest(LIMIT) {
            Ok(a) => a,
            Err(e) => panic!("{args:?}: {e}\n{}", process.failure_detail()),
        };
        launcher::handshake(&agent, Some(Instant::now() + LIMIT)).expect("handshake");
        Vm { process, agent }
    }

    fn call(&mut self, request: &str) -> Value {
        let body = self
            .process
            .call(
                &self.agent,
                request.as_bytes(),
                Some(Instant::now() + LIMIT),
            )
            .unwrap_or_else(|e| panic!("{request}: {e:?}\n{}", self.process.failure_detail()));
        serde_json::from_slice(&body).unwrap()
    }

    fn count(&mut self) -> Value {
        self.call("{}")
    }

    /// Sends `snapshot` and returns its answer: the directory written, or
    /// the reason it was not.
    fn snapshot(&self, name: &str, then: AfterSnapshot) -> Result<String, String> {
        self.process
            .command(&Command::Snapshot {
                name: name.into(),
                then,
            })
            .unwrap();
        let deadline = Instant::now() + LIMIT;
        loop {
            match self.process.events().recv_deadline(deadline) {
                Ok(Event::SnapshotWritten { dir, .. }) => return Ok(dir),
                Ok(Event::SnapshotFailed { reason, .. }) => return Err(reason),
                Ok(_) => {}
                Err(e) => panic!("no answer to snapshot {name:?}: {e}"),
            }
        }
    }

    fn exits_0(mut self) {
        let status = self.process.wait_for_exit(LIMIT).unwrap();
        assert!(
            status.success(),
            "{status}: {}",
            self.process.failure_detail()
        );
    }
}

/// What `count` answers as the VM's nth request, n = 1..=upto, from a VM
/// that never stopped.
fn reference(s: &Scratch, app: &Path, upto: usize) -> Vec<Value> {
    let mut vm = Vm::start(s, &["--appfs", app.to_str().unwrap()], None);
    (0..upto).map(|_| vm.count()).collect()
}

fn layers(dirs: &[&Path]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Boot, count, snapshot (resume), count, snapshot (exit); restore the
/// first snapshot and count on; diff layers of that restored VM, stacked.
fn counts_across_snapshots(s: &Scratch, jail: Option<JailOptions>) {
    let app = app_image(s, "count.img", &["fn=count"]);
    let want = reference(s, &app, 6);
    let a = app.to_str().unwrap();
    let snaps = s.path("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let d = snaps.to_str().unwrap();

    let mut vm = Vm::start(s, &["--appfs", a, "--snapshot_dir", d], jail.clone());
    assert_eq!(vm.count(), want[0]);
    assert_eq!(vm.count(), want[1]);
    vm.snapshot("two", AfterSnapshot::Resume).unwrap();
    // The VM runs on, on the same connection.
    assert_eq!(vm.count(), want[2]);
    vm.snapshot("three", AfterSnapshot::Exit).unwrap();
    vm.exits_0();

    // A full snapshot: the restored VM has served 2 requests.
    let two = snaps.join("two");
    let mut vm = Vm::start(
        s,
        &[
            "--appfs",
            a,
            "--load_dir",
            &layers(&[&two]),
            "--snapshot_dir",
            d,
        ],
        jail.clone(),
    );
    assert_eq!(vm.count(), want[2]);
    // A diff layer over `two`, then one over both.
    vm.snapshot("two+1", AfterSnapshot::Resume).unwrap();
    assert_eq!(vm.count(), want[3]);
    vm.snapshot("two+2", AfterSnapshot::Exit).unwrap();
    vm.exits_0();

    let (d1, d2) = (snaps.join("two+1"), snaps.join("two+2"));
    for (stack, next) in [
        (vec![two.as_path(), d1.as_path()], 3),
        (vec![two.as_path(), d1.as_path(), d2.as_path()], 4),
        (vec![snaps.join("three").as_path()], 3),
    ]
    .iter()
    .map(|(st, n)| (st.iter().map(|p| p.to_path_buf()).collect::<Vec<_>>(), *n))
    {
        let refs: Vec<&Path> = stack.iter().map(PathBuf::as_path).collect();
        let mut vm = Vm::start(
            s,
            &["--appfs", a, "--load_dir", &layers(&refs)],
            jail.clone(),
        );
        assert_eq!(vm.count(), want[next], "restored from {stack:?}");
        assert_eq!(vm.count(), want[next + 1], "restored from {stack:?}");
    }
    // Only the diff layers' own pages are in them.
    let full = std::fs::metadata(two.join("memory")).unwrap();
    assert_eq!(full.len(), 128 << 20);
    for diff in [&d1, &d2] {
        let blocks = std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(diff.join("memory")).unwrap(),
        );
        assert!(
            blocks * 512 < 8 << 20,
            "{}: {} KiB on disk",
            diff.display(),
            blocks / 2
        );
    }
}

#[test]
fn a_vm_snapshotted_on_demand_counts_on_where_it_was() {
    let s = Scratch::new("snapnow");
    counts_across_snapshots(&s, None);
}

#[test]
fn a_jailed_vm_snapshots_on_demand_into_its_snapshot_dir() {
    let s = Scratch::new("snapnow-jail");
    let jail = JailOptions {
        jailer: PathBuf::from(env!("CARGO_BIN_EXE_jailer")),
        base: s.path("jails"),
        uid_base: 710_000 + (std::process::id() % 10_000) * 16,
        uid_count: 16,
        vm_overhead_mib: snapvm::multivm::config::DEFAULT_VM_OVERHEAD_MIB,
    };
    counts_across_snapshots(&s, Some(jail));
}

/// testguest's function `f`, snapshots going to `snaps`.
fn with_snapshot_dir(s: &Scratch, f: &str, snaps: &Path) -> Vm {
    let app = app_image(s, &format!("{f}.img"), &[&format!("fn={f}")]);
    let (a, d) = (app.to_str().unwrap(), snaps.to_str().unwrap());
    Vm::start(s, &["--appfs", a, "--snapshot_dir", d], None)
}

/// A request in flight (the guest sleeping in it) when the snapshot is
/// taken: the VM resumes and answers it; a vCPU spinning in user space is
/// paused too.
#[test]
fn busy_vcpus_are_paused_wherever_they_are() {
    let s = Scratch::new("snapnow-busy");
    let snaps = s.path("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let vm = with_snapshot_dir(&s, "sleep", &snaps);
    let agent = vm.agent.try_clone().unwrap();
    let started = Instant::now();
    let sleeper = std::thread::spawn(move || {
        snapvm::protocol::write_frame(&mut &agent, br#"{"ms": 1500}"#).unwrap();
        snapvm::protocol::read_frame(&mut &agent).unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    vm.snapshot("mid-request", AfterSnapshot::Resume).unwrap();
    let answer: Value = serde_json::from_slice(&sleeper.join().unwrap()).unwrap();
    assert_eq!(answer["slept_ms"], 1500, "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(snaps.join("mid-request/snapshot.json").is_file());

    let vm = with_snapshot_dir(&s, "spin", &snaps);
    snapvm::protocol::write_frame(&mut &vm.agent, b"{}").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vm.snapshot("spinning", AfterSnapshot::Exit).unwrap();
    vm.exits_0();
    assert!(snaps.join("spinning/snapshot.json").is_file());
}

/// Refusals answer `snapshot_failed` with the reason and leave the VM
/// serving: a bad name, an existing snapshot, no --snapshot_dir, and a VM
/// that records its working set.
#[test]
fn refused_snapshots_leave_the_vm_serving() {
    let s = Scratch::new("snapnow-refused");
    let app = app_image(&s, "count.img", &["fn=count"]);
    let a = app.to_str().unwrap();
    let snaps = s.path("snaps");
    std::fs::create_dir_all(snaps.join("taken")).unwrap();
    let d = snaps.to_str().unwrap();
    let mut vm = Vm::start(&s, &["--appfs", a, "--snapshot_dir", d], None);
    let mut n = 0;
    for (name, why) in [
        ("../escape", "not one plain file name"),
        ("a/b", "not one plain file name"),
        ("", "not one plain file name"),
        (".hidden", "not one plain file name"),
        ("taken", "already exists"),
    ] {
        let e = vm.snapshot(name, AfterSnapshot::Exit).unwrap_err();
        assert!(e.contains(why), "{name:?}: {e}");
        n += 1;
        assert_eq!(vm.count()["count"], n, "after {name:?}");
    }
    assert!(!s.path("escape").exists());

    let mut vm = Vm::start(&s, &["--appfs", a], None);
    let e = vm.snapshot("x", AfterSnapshot::Exit).unwrap_err();
    assert!(e.contains("without --snapshot_dir"), "{e}");
    assert_eq!(vm.count()["count"], 1);

    // A working set being recorded: refused.
    let base = s.path("base");
    let booted = Vm::start(&s, &["--appfs", a, "--snapshot_dir", d], None);
    booted.snapshot("base", AfterSnapshot::Exit).unwrap();
    booted.exits_0();
    std::fs::rename(snaps.join("base"), &base).unwrap();
    let b = base.to_str().unwrap();
    let mut vm = Vm::start(
        &s,
        &[
            "--appfs",
            a,
            "--load_dir",
            b,
            "--dump_ws",
            "--snapshot_dir",
            d,
        ],
        None,
    );
    let e = vm.snapshot("ws", AfterSnapshot::Exit).unwrap_err();
    assert!(e.contains("working set"), "{e}");
    assert_eq!(vm.count()["count"], 1);
}
