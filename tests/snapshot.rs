//! Snapshots on real KVM with testguest: firerunner writes one at the
//! guest's snapshot point (`--dump_dir`), a restore (`--load_dir`, lazy or
//! `--copy_base`) answers exactly like a booted VM, the saved RIP is past
//! the guest's `outb`, SMP snapshots restore, clones get their own seeds,
//! every bad snapshot is refused before anything runs, and a writer killed
//! half way leaves nothing that loads. Diff layers (a snapshot of a
//! restored VM) hold exactly the pages written since the restore, stack
//! on their base byte for byte, serve like a boot, and refuse a wrong base.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    app_image, firerunner, run_with_deadline, run_with_input, singlevm, testguest, Scratch,
};
use serde_json::{json, Value};
use snapvm::snapshot::format;
use snapvm::snapshot::hash::xxh64;
use snapvm::vmm::persist::MicrovmState;

const LIMIT: Duration = Duration::from_secs(120);

/// A rootfs with content worth identifying (testguest reads its first
/// sector and size only).
fn rootfs(s: &Scratch) -> PathBuf {
    let data: Vec<u8> = (0..64u32 << 10).map(|i| (i * 31 % 251) as u8).collect();
    s.file("rootfs.img", &data)
}

/// firerunner on testguest with these disks, its console in
/// `scratch/<name>-console.log` and its vsock at `scratch/<name>.vsock`.
fn firerunner_on(s: &Scratch, rootfs: &Path, app: &Path, name: &str) -> Command {
    let mut cmd = Command::new(firerunner());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(rootfs)
        .arg("--appfs")
        .arg(app)
        .arg("--console")
        .arg(s.path(&format!("{name}-console.log")))
        .arg("--vsock_uds")
        .arg(s.path(&format!("{name}.vsock")));
    cmd
}

/// Boots testguest with `--dump_dir dir` and expects the snapshot.
fn dump(s: &Scratch, dir: &Path, rootfs: &Path, app: &Path, extra: &[&str]) -> common::Outcome {
    let mut cmd = firerunner_on(s, rootfs, app, "dump");
    cmd.arg("--dump_dir")
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "info");
    let out = run_with_deadline(cmd, LIMIT);
    assert_eq!(out.code(), Some(0), "snapshot failed:\n{}", out.stderr);
    assert!(dir.join("snapshot.json").is_file() && dir.join("memory").is_file());
    out
}

fn lines(out: &common::Outcome) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// singlevm over `input`; `load` restores instead of booting.
fn serve(
    s: &Scratch,
    rootfs: &Path,
    app: &Path,
    load: Option<&Path>,
    extra: &[&str],
    input: &str,
) -> common::Outcome {
    let mut args = vec![
        "--rootfs".to_string(),
        rootfs.display().to_string(),
        "--appfs".to_string(),
        app.display().to_string(),
    ];
    if let Some(dir) = load {
        args.push("--load_dir".into());
        args.push(dir.display().to_string());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    run_singlevm(s, &args, input)
}

/// singlevm on testguest with `args` over `input`, expecting success (as
/// common::run_singlevm, with firerunner's log at info level).
fn run_singlevm(
    s: &Scratch,
    args: &[impl AsRef<std::ffi::OsStr> + std::fmt::Debug],
    input: &str,
) -> common::Outcome {
    let mut cmd = Command::new(singlevm());
    cmd.arg("--kernel")
        .arg(testguest())
        .args(args)
        .env("TMPDIR", &s.0)
        .env("RUST_LOG", "info")
        .env_remove("XDG_RUNTIME_DIR");
    let out = run_with_input(cmd, input.as_bytes().to_vec(), LIMIT);
    assert_eq!(
        out.code(),
        Some(0),
        "singlevm {args:?} failed:\n{}",
        out.stderr
    );
    out
}

/// XXH64 and mtime of every file in a snapshot directory.
fn fingerprint(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = entries
        .map(|e| {
            let p = e.unwrap().path();
            let meta = std::fs::metadata(&p).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                xxh64(&std::fs::read(&p).unwrap()),
                meta.modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_restored_vm_answers_exactly_like_a_booted_one() {
    let s = Scratch::new("snap-same");
    let root = rootfs(&s);
    let snap = s.path("snap");
    let base_app = app_image(&s, "echo.img", &["fn=echo"]);
    let out = dump(&s, &snap, &root, &base_app, &[]);
    assert!(out.stderr.contains("snapshot written to"), "{}", out.stderr);
    let before = fingerprint(&snap);
    // Let host time pass: the restored kvmclock must follow it.
    std::thread::sleep(Duration::from_millis(1500));

    let cases: [(&str, &str); 4] = [
        ("echo", "{\"a\":[1,2,{\"b\":\"ü\"}]}\n7\n\"x\"\n"),
        ("hello", "{\"name\":\"snap\"}\n{}\n"),
        ("touch", "{\"mib\":4}\n{\"mib\":1}\n"),
        ("fail", "{}\n"),
    ];
    for (func, input) in cases {
        let app = app_image(&s, &format!("{func}.img"), &[&format!("fn={func}")]);
        let booted = serve(&s, &root, &app, None, &[], input);
        for extra in [&[][..], &["--copy_base"][..]] {
            let restored = serve(&s, &root, &app, Some(&snap), extra, input);
            assert_eq!(
                lines(&restored),
                lines(&booted),
                "{func} {extra:?}: restored and booted answers differ\n{}",
                restored.stderr
            );
            // It restored (no boot), re-ran nothing before the snapshot
            // point, and saw the second one only.
            let err = &restored.stderr;
            assert!(err.contains("restore phases (us)"), "{err}");
            assert!(!err.contains("guest boot done"), "{err}");
            let points = err
                .lines()
                .filter(|l| l.contains("] guest snapshot point") && l.contains("after start"))
                .count();
            assert_eq!(points, 1, "{err}");
            let clock = err
                .lines()
                .find_map(|l| l.split("kvmclock advanced by ").nth(1))
                .unwrap_or_else(|| panic!("no kvmclock line: {err}"));
            let advanced_ms: u64 = clock.split(' ').next().unwrap().parse().unwrap();
            let off_us: i64 = clock
                .split("guest clock is ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .unwrap()
                .parse()
                .unwrap();
            assert!(advanced_ms >= 1500, "{clock}");
            assert!(off_us.abs() < 1_000_000, "{clock}");
        }
    }
    assert_eq!(
        fingerprint(&snap),
        before,
        "a restore modified the snapshot"
    );
}

#[test]
fn the_saved_rip_is_past_the_outb() {
    let s = Scratch::new("snap-rip");
    let root = rootfs(&s);
    let app = app_image(&s, "hello.img", &["fn=hello"]);
    let snap = s.path("snap");
    dump(&s, &snap, &root, &app, &[]);
    let (state, _) = MicrovmState::read(&snap).unwrap();
    let mem = std::fs::File::open(snap.join("memory")).unwrap();
    let rip = state.vcpus[0].regs.rip;
    let mut code = [0u8; 2];
    // testguest identity-maps RAM, so the RIP is a physical address.
    mem.read_exact_at(&mut code, rip - 1).unwrap();
    // `out dx, al` (0xee) is the guest's outb to port 0x3f0: RIP is right
    // after it, and the instruction there is not another out.
    assert_eq!(code[0], 0xee, "byte before rip {rip:#x}: {code:x?}");
    assert_ne!(code[1], 0xee);
    assert_eq!(state.vcpus[0].regs.rax & 0xff, 124, "al holds the 124");
    assert_eq!(state.vcpus[0].regs.rdx & 0xffff, 0x3f0, "dx holds the port");
}

#[test]
fn two_and_four_vcpu_snapshots_restore_and_serve() {
    for n in ["2", "4"] {
        let s = Scratch::new("snap-smp");
        let root = rootfs(&s);
        let app = app_image(&s, "hello.img", &["fn=hello"]);
        let snap = s.path("snap");
        dump(&s, &snap, &root, &app, &["--vcpu_count", n]);
        let (state, _) = MicrovmState::read(&snap).unwrap();
        assert_eq!(state.vcpus.len().to_string(), n);
        let out = serve(
            &s,
            &root,
            &app,
            Some(&snap),
            &["--vcpu_count", n],
            "{\"name\":\"smp\"}\n{}\n",
        );
        assert_eq!(
            lines(&out),
            vec![
                json!({"message": "hello, smp"}),
                json!({"message": "hello, world"})
            ],
            "{n} vCPUs:\n{}",
            out.stderr
        );
    }
}

#[test]
fn clones_restored_at_once_answer_with_their_own_seeds() {
    let s = Scratch::new("snap-clones");
    let root = rootfs(&s);
    let app = app_image(&s, "random.img", &["fn=random"]);
    let snap = s.path("snap");
    dump(&s, &snap, &root, &app, &[]);
    let started_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let runs: Vec<_> = (0..2)
        .map(|i| {
            let s = Scratch::new(&format!("snap-clone{i}"));
            let (root, app, snap) = (root.clone(), app.clone(), snap.clone());
            std::thread::spawn(move || {
                let id = (200 + i).to_string();
                let out = serve(&s, &root, &app, Some(&snap), &["--id", &id], "{}\n{}\n");
                lines(&out)
            })
        })
        .collect();
    let answers: Vec<Vec<Value>> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    let mut randoms = Vec::new();
    for a in &answers {
        assert_eq!(a.len(), 2, "{a:?}");
        for r in a {
            randoms.push(r["random"].as_str().unwrap().to_string());
            let rt = r["init_realtime_ns"].as_u64().unwrap();
            assert!(rt >= started_ns && rt < started_ns + 60_000_000_000, "{r}");
        }
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(
        randoms.len(),
        4,
        "clones repeated random values: {answers:?}"
    );
}

/// Runs a restore of `dir` that must be refused with one line naming `what`,
/// before anything ran.
fn refused(s: &Scratch, dir: &Path, root: &Path, app: &Path, extra: &[&str], what: &str) {
    let console = s.path("refused-console.log");
    let _ = std::fs::remove_file(&console);
    let before = fingerprint(dir);
    let mut cmd = firerunner_on(s, root, app, "refused");
    cmd.arg("--load_dir").arg(dir).args(extra);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{extra:?}: {}", out.stderr);
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{extra:?}: not one line: {err}");
    assert!(
        err.contains(what),
        "{extra:?}: {err:?} does not mention {what:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Nothing ran: no console output.
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(console_text.is_empty(), "the guest ran: {console_text}");
    assert_eq!(
        fingerprint(dir),
        before,
        "a refused restore modified the snapshot"
    );
}

/// A copy of `snap` at `name`, with its state file edited by `edit`.
fn variant(
    s: &Scratch,
    snap: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<u8>, &Path),
) -> PathBuf {
    let dir = s.path(name);
    std::fs::create_dir(&dir).unwrap();
    for f in ["snapshot.json", "memory"] {
        std::fs::copy(snap.join(f), dir.join(f)).unwrap();
    }
    let mut state = std::fs::read(dir.join("snapshot.json")).unwrap();
    edit(&mut state, &dir);
    std::fs::write(dir.join("snapshot.json"), state).unwrap();
    dir
}

#[test]
fn bad_snapshots_are_refused_before_anything_runs() {
    let s = Scratch::new("snap-refuse");
    let root = rootfs(&s);
    let app = app_image(&s, "echo.img", &["fn=echo"]);
    let snap = s.path("snap");
    dump(&s, &snap, &root, &app, &[]);

    let corrupt = variant(&s, &snap, "corrupt", |b, _| {
        // Flip one digit inside the state (the vCPU registers).
        let at = b.windows(8).position(|w| w == b"\"regs\":[").unwrap() + 8;
        b[at] = if b[at] == b'1' { b'2' } else { b'1' };
    });
    refused(&s, &corrupt, &root, &app, &[], "checksum does not match");
    let template = s.file("template.json", b"{}");
    refused(
        &s,
        &snap,
        &root,
        &app,
        &["--cpu_template", template.to_str().unwrap()],
        "--cpu_template cannot be used with --load_dir",
    );
    let truncated = variant(&s, &snap, "truncated", |b, _| b.truncate(b.len() / 2));
    refused(&s, &truncated, &root, &app, &[], "truncated or corrupt");
    let empty = variant(&s, &snap, "empty", |b, _| b.clear());
    refused(&s, &empty, &root, &app, &[], "truncated or corrupt");
    let short_mem = variant(&s, &snap, "short-memory", |_, dir| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory"))
            .unwrap();
        f.set_len(64 << 20).unwrap();
    });
    refused(&s, &short_mem, &root, &app, &[], "memory file");
    let newer = variant(&s, &snap, "newer", |b, _| {
        let text = String::from_utf8(b.clone()).unwrap();
        let (this, next) = (format::VERSION, format::VERSION + 1);
        let edited = text.replacen(
            &format!("\"version\":{this},"),
            &format!("\"version\":{next},"),
            1,
        );
        assert_ne!(edited, text);
        *b = edited.into_bytes();
    });
    refused(&s, &newer, &root, &app, &[], "newer snapvm");
    let devices = variant(&s, &snap, "devices", |b, _| {
        let mut state = format::state_value(b).unwrap();
        state["shape"]["devices"].as_array_mut().unwrap().pop();
        *b = format::seal_value(format::VERSION, &state).unwrap();
    });
    refused(&s, &devices, &root, &app, &[], "its devices are");
    refused(&s, &snap, &root, &app, &["--mem_size", "256"], "--mem_size");
    refused(
        &s,
        &snap,
        &root,
        &app,
        &["--vcpu_count", "2"],
        "--vcpu_count",
    );
    let other_root = s.file("other.img", &vec![7u8; 64 << 10]);
    refused(
        &s,
        &snap,
        &other_root,
        &app,
        &[],
        "not the image the snapshot was taken with",
    );
    let small_root = s.file("small.img", &[7u8; 4096]);
    refused(&s, &snap, &small_root, &app, &[], "4096 bytes");
    refused(&s, &s.path("missing"), &root, &app, &[], "snapshot.json");
}

#[test]
fn a_writer_killed_half_way_leaves_nothing_that_loads() {
    let s = Scratch::new("snap-kill");
    let root = rootfs(&s);
    let app = app_image(&s, "hello.img", &["fn=hello"]);
    let snap = s.path("snap");
    let mut child = firerunner_on(&s, &root, &app, "stalled")
        .arg("--dump_dir")
        .arg(&snap)
        .env("RUST_LOG", "warn")
        .env(snapvm::vmm::capture::hooks::STALL_ENV, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the memory file is written and the writer stalls.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("stalling") {
                let _ = tx.send(());
            }
        }
    });
    let stalled = rx.recv_timeout(Duration::from_secs(60));
    child.kill().unwrap();
    child.wait().unwrap();
    stalled.expect("the writer did not reach the stall point");

    let tmp = PathBuf::from(format!("{}.tmp-{pid}", snap.display()));
    assert!(!snap.exists(), "a half snapshot appeared at its final path");
    assert!(tmp.join("memory").exists(), "the writer was not half way");
    refused(&s, &snap, &root, &app, &[], "snapshot.json");
    refused(&s, &tmp, &root, &app, &[], "snapshot.json");

    // The next writer replaces the leftovers and its snapshot loads.
    dump(&s, &snap, &root, &app, &[]);
    assert!(
        !tmp.exists(),
        "the dead writer's directory was not cleaned up"
    );
    let out = serve(&s, &root, &app, Some(&snap), &[], "{}\n");
    assert_eq!(lines(&out), vec![json!({"message": "hello, world"})]);
}

/// The language snapshot of the SnapFaaS workflow: booted with an empty
/// appfs, taken at the first snapshot point, into `name`.
fn language_snapshot(s: &Scratch, root: &Path, name: &str) -> PathBuf {
    let dir = s.path(name);
    dump(s, &dir, root, &s.file("empty.img", b""), &[]);
    dir
}

/// The sum of a layer's range lengths: the bytes of RAM it holds.
fn held(layer: &format::MemoryLayer) -> u64 {
    layer.ranges.iter().map(|r| r.1).sum()
}

/// Runs firerunner restoring `layers` (comma list) with `--dump_dir diff`
/// and RAM dumped to `ram` at the snapshot point; the guest's agent
/// connects first (`diffpoint=after_init`), gets an init frame and
/// answers it, so the diff follows vsock traffic both ways.
fn dump_diff_after_vsock(
    s: &Scratch,
    layers: &str,
    diff: &Path,
    ram: &Path,
    root: &Path,
    app: &Path,
) {
    let listener = std::os::unix::net::UnixListener::bind(s.path("diff.vsock_1234")).unwrap();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let init = snapvm::protocol::init_frame(&[7; 32], 1);
        snapvm::protocol::write_frame(&mut conn, init.to_string().as_bytes()).unwrap();
        // The guest answers and takes its snapshot; whether the answer
        // leaves the VM before firerunner exits is a race, so hold the
        // connection until then and return what came.
        let mut got = Vec::new();
        while let Ok(v) = snapvm::protocol::read_json(&mut conn) {
            got.push(v);
        }
        got
    });
    let mut cmd = firerunner_on(s, root, app, "diff");
    cmd.arg("--load_dir")
        .arg(layers)
        .arg("--dump_dir")
        .arg(diff)
        .env(snapvm::vmm::capture::hooks::DUMP_RAM_ENV, ram)
        .env("RUST_LOG", "info");
    let out = run_with_deadline(cmd, LIMIT);
    assert_eq!(out.code(), Some(0), "diff snapshot failed:\n{}", out.stderr);
    let answers = host.join().unwrap();
    assert!(
        answers.len() <= 1 && answers.iter().all(|a| *a == json!({"ready": true})),
        "{answers:?}"
    );
    assert!(
        out.stderr.contains("diff snapshot written"),
        "{}",
        out.stderr
    );
}

/// Guest RAM as the layers' memory files rebuild it: each layer's ranges
/// over the ones below, zero where no layer holds a page.
fn rebuild(layers: &[(&Path, &format::MemoryLayer)], size: usize) -> Vec<u8> {
    let mut ram = vec![0u8; size];
    for (dir, layer) in layers {
        let f = std::fs::File::open(dir.join("memory")).unwrap();
        for &(off, len) in &layer.ranges {
            f.read_exact_at(&mut ram[off as usize..(off + len) as usize], off)
                .unwrap();
        }
    }
    ram
}

#[test]
fn a_diff_layer_plus_its_base_rebuild_ram_byte_for_byte() {
    let s = Scratch::new("diff-complete");
    let root = rootfs(&s);
    // The language snapshot: booted with an empty appfs.
    let base = language_snapshot(&s, &root, "base");
    // Restored with the app: the guest reads its appfs (block DMA), writes
    // 4 MiB at load, and takes an init frame over vsock before its 124.
    // (`preload`: the guest reads 256 KiB of its appfs into pages only the
    // device writes, which the VMM's own dirty bitmap must catch.)
    let mut image = b"fn=touch\nmib=4\ndiffpoint=after_init\npreload=256\n".to_vec();
    image.resize(512, 0);
    image.extend((0..256u32 << 10).map(|i| (i % 251) as u8 ^ 0x5a));
    image.truncate(256 << 10);
    let app = s.file("touch.img", &image);
    let (diff, ram) = (s.path("diff"), s.path("ram.bin"));
    let base_arg = base.display().to_string();
    dump_diff_after_vsock(&s, &base_arg, &diff, &ram, &root, &app);
    let console = std::fs::read_to_string(s.path("diff-console.log")).unwrap();
    assert!(
        console.contains("testguest: vdb: config changed: sectors 512"),
        "{console}"
    );
    assert!(
        console.contains("testguest: preload 262144 bytes"),
        "{console}"
    );
    assert!(
        console.contains("testguest: app loaded: touch"),
        "{console}"
    );

    let (b, b_sum) = MicrovmState::read(&base).unwrap();
    let (d, _) = MicrovmState::read(&diff).unwrap();
    assert_eq!(d.memory.layers.len(), 2);
    assert_eq!(
        d.memory.layers[0].state_checksum.as_deref(),
        Some(b_sum.as_str())
    );
    assert_eq!(d.memory.layers[0].ranges, b.memory.layers[0].ranges);
    assert_eq!(d.memory.layers[1].dir, Path::new("."));
    let expected = std::fs::read(&ram).unwrap();
    assert_eq!(expected.len(), 128 << 20);
    let rebuilt = rebuild(
        &[(&base, &b.memory.layers[0]), (&diff, &d.memory.layers[1])],
        expected.len(),
    );
    let first_bad = rebuilt.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_bad, None,
        "base + diff differ from RAM at that offset"
    );
    // The preloaded appfs is in RAM (so the comparison covered pages only
    // the device wrote).
    let at = (0..expected.len())
        .step_by(4096)
        .find(|&p| expected[p..].starts_with(&image[..4096]));
    let at = at.expect("the preloaded appfs is not in guest RAM");
    assert_eq!(&expected[at..at + image.len()], &image[..]);
    // The diff holds the app's 4 MiB and not much else.
    let own = held(&d.memory.layers[1]);
    assert!((4 << 20..5 << 20).contains(&own), "diff holds {own} bytes");

    // A second diff on top of the first: three layers rebuild RAM too.
    let top = s.path("top");
    let layers = format!("{},{}", base.display(), diff.display());
    std::fs::remove_file(s.path("diff.vsock_1234")).unwrap();
    dump_diff_after_vsock(&s, &layers, &top, &ram, &root, &app);
    let (t, _) = MicrovmState::read(&top).unwrap();
    assert_eq!(t.memory.layers.len(), 3);
    let expected = std::fs::read(&ram).unwrap();
    let rebuilt = rebuild(
        &[
            (&base, &b.memory.layers[0]),
            (&diff, &d.memory.layers[1]),
            (&top, &t.memory.layers[2]),
        ],
        expected.len(),
    );
    assert!(rebuilt == expected, "base + diff + top differ from RAM");
}

#[test]
fn the_snapfaas_workflow_serves_like_a_boot() {
    let s = Scratch::new("diff-workflow");
    let root = rootfs(&s);
    let snaps = s.path("S");
    std::fs::create_dir(&snaps).unwrap();
    let (base, diff) = (snaps.join("base"), snaps.join("diff/hello"));
    let hello = app_image(&s, "hello.img", &["fn=hello"]);
    let r = root.display().to_string();
    let run = |args: &[&str], input: &str| {
        run_singlevm(&s, &[&["--rootfs", r.as_str()][..], args].concat(), input)
    };
    let (b, d) = (base.display().to_string(), diff.display().to_string());
    let h = hello.display().to_string();
    // Verbatim: language snapshot, diff snapshot, then serve from both.
    run(&["--dump_dir", &b, "--force_exit"], "");
    run(
        &[
            "--appfs",
            &h,
            "--load_dir",
            &b,
            "--dump_dir",
            &d,
            "--force_exit",
        ],
        "",
    );
    let requests = "{\"name\":\"snap\"}\n{}\n[1]\n";
    let booted = run(&["--appfs", &h], requests);
    let stacked = run(
        &["--appfs", &h, "--load_dir", &b, "--diff_dirs", &d],
        requests,
    );
    assert_eq!(lines(&stacked), lines(&booted));
    assert_eq!(
        lines(&booted)[0],
        json!({"message": "hello, snap"}),
        "{}",
        booted.stdout
    );
    // The diff is mapped over the base, and says how.
    assert!(
        stacked.stderr.contains("diff layer 1: ") && stacked.stderr.contains("ranges mapped"),
        "{}",
        stacked.stderr
    );
    // The other spellings: BASE,DIFF and eager copies of both layers.
    let comma = format!("{b},{d}");
    for extra in [
        vec!["--load_dir", &comma],
        vec!["--load_dir", &comma, "--copy_base", "--copy_diff"],
    ] {
        let mut args = vec!["--appfs", &h];
        args.extend(extra);
        assert_eq!(lines(&run(&args, requests)), lines(&booted), "{args:?}");
    }
    // Loading the app changed far fewer pages than booting wrote.
    let (bs, _) = MicrovmState::read(&base).unwrap();
    let (ds, _) = MicrovmState::read(&diff).unwrap();
    let (base_bytes, diff_bytes) = (held(&bs.memory.layers[0]), held(&ds.memory.layers[1]));
    assert!(
        diff_bytes * 4 < base_bytes,
        "diff {diff_bytes} bytes vs base {base_bytes}"
    );
    // A restore never changes a layer.
    let before = (fingerprint(&base), fingerprint(&diff));
    run(
        &["--appfs", &h, "--load_dir", &b, "--diff_dirs", &d],
        "{}\n",
    );
    assert_eq!((fingerprint(&base), fingerprint(&diff)), before);
}

#[test]
fn touch_16_mib_gives_a_16_mib_diff_that_serves_like_a_boot() {
    let s = Scratch::new("diff-touch");
    let root = rootfs(&s);
    let base = language_snapshot(&s, &root, "base");
    let app = app_image(&s, "touch.img", &["fn=touch", "mib=16"]);
    let diff = s.path("diff");
    let out = dump(
        &s,
        &diff,
        &root,
        &app,
        &["--load_dir", &base.display().to_string()],
    );
    let (d, _) = MicrovmState::read(&diff).unwrap();
    let own = held(&d.memory.layers[1]);
    assert!(own >= 16 << 20, "diff holds {own} bytes: {}", out.stderr);
    let requests = "{}\n{\"mib\": 4}\n";
    let booted = serve(&s, &root, &app, None, &[], requests);
    let stacked = serve(
        &s,
        &root,
        &app,
        Some(&base),
        &["--diff_dirs", &diff.display().to_string()],
        requests,
    );
    assert_eq!(lines(&stacked), lines(&booted));
    assert_eq!(lines(&booted)[0]["touched_mib"], 16);
}

#[test]
fn a_layer_stacked_on_the_wrong_base_is_refused() {
    let s = Scratch::new("diff-refuse");
    let root = rootfs(&s);
    let base = language_snapshot(&s, &root, "base");
    // Same guest, same disks, taken a moment later: another snapshot.
    let other = language_snapshot(&s, &root, "other");
    let app = app_image(&s, "echo.img", &["fn=echo"]);
    let diff = s.path("diff");
    dump(
        &s,
        &diff,
        &root,
        &app,
        &["--load_dir", &base.display().to_string()],
    );
    let d = diff.display().to_string();
    refused(
        &s,
        &other,
        &root,
        &app,
        &["--diff_dirs", &d],
        "parent is not the given one",
    );
    refused(
        &s,
        &diff,
        &root,
        &app,
        &[],
        "diff snapshot on top of 1 layer",
    );
    let o = other.display().to_string();
    refused(
        &s,
        &base,
        &root,
        &app,
        &["--diff_dirs", &o],
        "full snapshot",
    );
    // A diff layer whose memory file is cut short is refused too.
    let cut = variant(&s, &diff, "cut", |_, dir| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
    });
    let c = cut.display().to_string();
    refused(&s, &base, &root, &app, &["--diff_dirs", &c], "memory");
}

#[test]
fn an_app_that_fails_to_load_is_never_snapshotted() {
    let s = Scratch::new("snap-appfail");
    let root = rootfs(&s);
    let empty = app_image(&s, "empty.img", &[]);
    let base = s.path("base");
    dump(&s, &base, &root, &empty, &[]);
    let app = app_image(&s, "nosuch.img", &["fn=nosuch"]);
    let diff = s.path("diff");
    // Restored with an app it cannot load, the guest writes 125 and then
    // reaches its diff snapshot point (124): firerunner must end with the
    // app-failure code and write nothing.
    for _ in 0..5 {
        let mut cmd = firerunner_on(&s, &root, &app, "appfail");
        cmd.arg("--load_dir")
            .arg(&base)
            .arg("--dump_dir")
            .arg(&diff);
        let out = run_with_deadline(cmd, LIMIT);
        assert_eq!(out.code(), Some(4), "{}", out.stderr);
        assert!(!diff.exists(), "a snapshot was written for a failed app");
    }
}

/// Page faults firerunner (`pid`) has taken so far: minflt + majflt.
fn faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is
    // field 3, minflt 10, majflt 12.
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    rest[7].parse::<u64>().unwrap() + rest[9].parse::<u64>().unwrap()
}

/// Restores with `args` (layers and modes), plays the controller — init
/// frame, then `request` — and returns the response and the page faults
/// firerunner took while serving it. With `--load_ws` the request waits
/// until firerunner logs that the working set is in place (its prefetch
/// races the vCPU; this measures the request, not that race).
fn first_request_faults(
    s: &Scratch,
    root: &Path,
    app: &Path,
    args: &[&str],
    request: &Value,
) -> (Value, u64) {
    let _ = std::fs::remove_file(s.path("ws.vsock_1234"));
    let listener = std::os::unix::net::UnixListener::bind(s.path("ws.vsock_1234")).unwrap();
    let mut cmd = firerunner_on(s, root, app, "ws");
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let (prefetched_tx, prefetched) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("working set prefetched") {
                let _ = prefetched_tx.send(());
            }
        }
    });
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    let init = snapvm::protocol::init_frame(&[9; 32], 1);
    snapvm::protocol::write_frame(&mut conn, init.to_string().as_bytes()).unwrap();
    assert_eq!(
        snapvm::protocol::read_json(&mut conn).unwrap(),
        json!({"ready": true})
    );
    if args.contains(&"--load_ws") {
        prefetched
            .recv_timeout(LIMIT)
            .expect("firerunner never logged the working set prefetched");
    }
    let before = faults(child.id());
    snapvm::protocol::write_frame(&mut conn, request.to_string().as_bytes()).unwrap();
    let response = snapvm::protocol::read_json(&mut conn).unwrap();
    let taken = faults(child.id()) - before;
    child.kill().unwrap();
    child.wait().unwrap();
    (response, taken)
}

#[test]
fn a_recorded_working_set_loads_eagerly_and_serves_like_lazy_and_boot() {
    let s = Scratch::new("ws");
    let root = rootfs(&s);
    let base = language_snapshot(&s, &root, "base");
    let diff = s.path("diff");
    let app = app_image(&s, "touch.img", &["fn=touch", "mib=16"]);
    let b = base.display().to_string();
    dump(&s, &diff, &root, &app, &["--load_dir", &b]);
    let d = diff.display().to_string();

    // Record: serve one request with --dump_ws (into the top layer).
    let out = serve(
        &s,
        &root,
        &app,
        Some(&base),
        &["--diff_dirs", &d, "--dump_ws"],
        "{}\n",
    );
    assert_eq!(lines(&out)[0]["touched_mib"], 16, "{}", out.stderr);
    let identity = format::checksum(&diff).unwrap();
    let set = snapvm::snapshot::ws::read(&diff, 128 << 20, &identity).unwrap();
    let bytes = set.pages() * 4096;
    assert!(
        (16 << 20..=18 << 20).contains(&bytes),
        "working set of {bytes} bytes"
    );
    // Every range is inside RAM (`read` checks it) and 32 MiB.. is in it.
    let touched = set
        .ranges()
        .iter()
        .filter(|r| r.ram_offset >= 32 << 20 && r.ram_offset < 48 << 20)
        .map(|r| r.len)
        .sum::<u64>();
    assert_eq!(touched, 16 << 20);

    // The same answers from a boot, a lazy restore and a --load_ws one.
    let requests = "{}\n{\"mib\": 4}\n{}\n";
    let booted = serve(&s, &root, &app, None, &[], requests);
    for extra in [
        &["--diff_dirs", &d][..],
        &["--diff_dirs", &d, "--load_ws"],
        &["--diff_dirs", &d, "--load_ws", "--copy_diff"],
        &["--diff_dirs", &d, "--load_ws", "--copy_diff", "--copy_base"],
    ] {
        let restored = serve(&s, &root, &app, Some(&base), extra, requests);
        assert_eq!(lines(&restored), lines(&booted), "{extra:?}");
    }

    // Faults during the first request: --load_ws takes at most a tenth.
    let layers = format!("{b},{d}");
    let (lazy_resp, lazy) =
        first_request_faults(&s, &root, &app, &["--load_dir", &layers], &json!({}));
    let (ws_resp, ws) = first_request_faults(
        &s,
        &root,
        &app,
        &["--load_dir", &layers, "--load_ws"],
        &json!({}),
    );
    assert_eq!(ws_resp, lazy_resp);
    assert!(lazy >= 4096, "lazy restore took only {lazy} faults");
    assert!(ws * 10 <= lazy, "--load_ws took {ws} faults, lazy {lazy}");

    // A working set recorded on another stack is refused; so is recording
    // without a controller to say when the request is done.
    let other = s.path("other");
    dump(&s, &other, &root, &app, &["--load_dir", &b]);
    for f in ["ws", "ws.json"] {
        std::fs::copy(diff.join(f), other.join(f)).unwrap();
    }
    let o = other.display().to_string();
    refused(
        &s,
        &base,
        &root,
        &app,
        &["--diff_dirs", &o, "--load_ws"],
        "belongs to another snapshot",
    );
    refused(
        &s,
        &base,
        &root,
        &app,
        &["--diff_dirs", &d, "--dump_ws"],
        "needs a controller",
    );
}

#[test]
fn app_state_survives_a_snapshot_taken_between_requests() {
    let s = Scratch::new("snap-count");
    let root = rootfs(&s);
    let app = app_image(&s, "count.img", &["fn=count", "snapshot_after=3"]);
    let five = "{}\n".repeat(5);
    // A VM that is never snapshotted (no --dump_dir: its 124s are ignored).
    let reference = lines(&serve(&s, &root, &app, None, &[], &five));
    let counts: Vec<u64> = reference
        .iter()
        .filter_map(|r| r["count"].as_u64())
        .collect();
    assert_eq!(counts, [1, 2, 3, 4, 5]);

    // Restored from the language snapshot with the app, the VM's next
    // snapshot point comes after its third answer; the rest of the input
    // then finds the VM gone (singlevm exits 1).
    let base = language_snapshot(&s, &root, "base");
    let diff = s.path("diff");
    let mut cmd = Command::new(singlevm());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&root)
        .arg("--appfs")
        .arg(&app)
        .arg("--load_dir")
        .arg(&base)
        .arg("--dump_dir")
        .arg(&diff)
        .env("TMPDIR", &s.0)
        .env_remove("XDG_RUNTIME_DIR");
    let out = run_with_input(cmd, five.into_bytes(), LIMIT);
    let answered = lines(&out);
    assert_eq!(answered[..3], reference[..3], "{}", out.stderr);
    assert!(answered[3]["error"].is_string(), "{answered:?}");
    assert!(diff.join("snapshot.json").is_file(), "{}", out.stderr);

    // Restored, it goes on where it stopped: the 4th and 5th answers, with
    // the memory the 3rd request left.
    let d = diff.display().to_string();
    let restored = serve(
        &s,
        &root,
        &app,
        Some(&base),
        &["--diff_dirs", &d],
        "{}\n{}\n",
    );
    assert_eq!(lines(&restored), reference[3..]);
}
