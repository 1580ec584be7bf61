//! Port I/O through the TSS I/O bitmap at IOPL 0 after a restore
//! (testguest's `ioport=bitmap`, tests/guest/CONTRACT.md).
//!
//! A restore writes TR back as KVM reports it: busy (type 11). Hardware
//! and this machine's KVM check the I/O bitmap whatever TR's type; QEMU
//! TCG (the emulated KVM host of DESIGN.md) accepts only an available TSS
//! there, so a bitmap-checked `in`/`out` of a restored VM takes #GP. The
//! Linux agents no longer rely on the bitmap; this test keeps the path
//! exercised: the SnapFaaS workflow (boot, language snapshot, diff
//! snapshot, restore base + diff) with the guest doing all its port I/O
//! after the diff point through a bitmap that grants only its own ports,
//! and refusing the others with #GP. A refused port outside the probe is
//! reported by the guest and ends the VM with a triple fault.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{app_image, firerunner, run_with_deadline, testguest, Outcome, Scratch};
use serde_json::{json, Value};
use snapvm::vmm::persist::MicrovmState;

const LIMIT: Duration = Duration::from_secs(120);
/// The guest's lines when every check of `ioport=bitmap` passed.
const BITMAP_OK: [&str; 4] = [
    "ioport bitmap: iopl 0, tr 0x30 gdt type 11, tss limit 255 iomap 104, granted 0x3f0 0x3f8-0x3ff 0x64",
    "ioport bitmap: port 0x3f1 (not granted): #GP",
    "ioport bitmap: port 0x4c0 (beyond the TSS limit): #GP",
    "ioport bitmap ok",
];
/// The start of the core's report of a refused port outside the probes.
const REFUSED_REPORT: &str = "#GP at bitmap port I/O (port 0x3f1, TR 0x30, GDT type 11) at 0x";

fn rootfs(s: &Scratch) -> PathBuf {
    s.file("rootfs.img", &[0x5a; 64 << 10])
}

/// singlevm on testguest: `args`, `input` on stdin, the console kept in
/// `scratch/<console>`. Returns the outcome and the guest's console lines.
fn singlevm(s: &Scratch, args: &[&str], input: &str, console: &str) -> (Outcome, Vec<String>) {
    let log = s.path(console);
    let mut all: Vec<&str> = args.to_vec();
    let log_arg = log.display().to_string();
    all.extend(["--console", log_arg.as_str()]);
    let out = common::run_singlevm(s, &all, input, LIMIT);
    (out, console_lines(&log))
}

/// The `testguest: ` lines of a console file, prefix removed.
fn console_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("testguest: "))
        .map(str::to_string)
        .collect()
}

fn responses(out: &Outcome) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// The console shows every bitmap check passing and no fault report.
fn assert_bitmap_ok(what: &str, console: &[String], stderr: &str) {
    let ours: Vec<&str> = console
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("ioport") || l.starts_with("#GP") || l.starts_with("exception"))
        .collect();
    assert_eq!(
        ours,
        BITMAP_OK,
        "{what}: bitmap port I/O\nconsole:\n{}\nstderr:\n{stderr}",
        console.join("\n")
    );
}

fn ok(what: &str, out: &Outcome) {
    assert_eq!(
        out.code(),
        Some(0),
        "{what}: singlevm failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn bitmap_port_io_works_booted_and_after_a_restore() {
    let s = Scratch::new("ioport-workflow");
    let root = rootfs(&s);
    let app = app_image(&s, "app.img", &["fn=hello", "ioport=bitmap"]);
    let refused = app_image(&s, "refused.img", &["fn=hello", "ioport=bitmap-refused"]);
    let (r, a) = (root.display().to_string(), app.display().to_string());
    let (base, diff) = (s.path("base"), s.path("diff"));
    let (b, d) = (base.display().to_string(), diff.display().to_string());
    let requests = "{\"name\":\"bitmap\"}\n{}\n";
    let expected = vec![
        json!({"message": "hello, bitmap"}),
        json!({"message": "hello, world"}),
    ];

    // A booted VM (its own ltr: TR is whatever the CPU made of it).
    let (booted, console) = singlevm(&s, &["--rootfs", &r, "--appfs", &a], requests, "boot.log");
    ok("booted", &booted);
    assert_bitmap_ok("booted", &console, &booted.stderr);
    assert_eq!(responses(&booted), expected);

    // Language snapshot (no app), then the diff snapshot with the app.
    let (out, _) = singlevm(
        &s,
        &["--rootfs", &r, "--dump_dir", &b, "--force_exit"],
        "",
        "language.log",
    );
    ok("language snapshot", &out);
    let (out, console) = singlevm(
        &s,
        &[
            "--rootfs",
            &r,
            "--appfs",
            &a,
            "--load_dir",
            &b,
            "--dump_dir",
            &d,
            "--force_exit",
        ],
        "",
        "diff.log",
    );
    ok("diff snapshot", &out);
    assert!(diff.join("snapshot.json").is_file(), "{}", out.stderr);
    // The case runs after the diff point: never before a snapshot of it.
    assert!(
        console.iter().all(|l| !l.starts_with("ioport")),
        "{console:?}"
    );
    // What the restores below write back: KVM reports the loaded TR busy.
    for dir in [&base, &diff] {
        let (state, _) = MicrovmState::read(dir).expect("read snapshot");
        let tr = state.vcpus[0].sregs.tr;
        eprintln!(
            "{}: saved TR selector {:#x} type {} present {}",
            dir.display(),
            tr.selector,
            tr.type_,
            tr.present
        );
        assert_eq!(
            (tr.selector, tr.type_, tr.present),
            (0x30, 11, 1),
            "{}: the restore is meant to run under a busy TR",
            dir.display()
        );
    }

    // Restored from base + diff (both spellings): the case runs in the
    // restored VM only, then the VM serves exactly like the booted one.
    let comma = format!("{b},{d}");
    for (what, load) in [
        ("base,diff", vec!["--load_dir", comma.as_str()]),
        ("--diff_dirs", vec!["--load_dir", &b, "--diff_dirs", &d]),
    ] {
        let mut args = vec!["--rootfs", r.as_str(), "--appfs", a.as_str()];
        args.extend(load);
        let (out, console) = singlevm(&s, &args, requests, "restored.log");
        ok(what, &out);
        assert!(
            !console
                .iter()
                .any(|l| l == "boot done" || l.starts_with("app loaded")),
            "{what}: the restored VM re-ran its boot:\n{}",
            console.join("\n")
        );
        assert_bitmap_ok(what, &console, &out.stderr);
        assert_eq!(responses(&out), expected, "{what}");
    }

    // Restored from the language snapshot alone: the app loads after the
    // restore, and the case still works there.
    let (out, console) = singlevm(
        &s,
        &["--rootfs", &r, "--appfs", &a, "--load_dir", &b],
        requests,
        "base-only.log",
    );
    ok("base only", &out);
    assert_bitmap_ok("base only", &console, &out.stderr);
    assert_eq!(responses(&out), expected);

    // A refused port outside the probes, in a restored VM: reported by
    // the guest, and the VM ends (triple fault: firerunner exit 2) at once
    // instead of singlevm waiting for a guest that never connects.
    let refused = refused.display().to_string();
    let (out, console) = singlevm(
        &s,
        &["--rootfs", &r, "--appfs", &refused, "--load_dir", &b],
        requests,
        "refused.log",
    );
    assert_ne!(out.code(), Some(0), "refused port: singlevm succeeded");
    assert!(
        console.iter().any(|l| l.starts_with(REFUSED_REPORT)),
        "refused port: no report\n{}",
        console.join("\n")
    );
    assert!(
        out.stderr.contains("exit status: 2") && out.stderr.contains("TripleFault"),
        "refused port: {}",
        out.stderr
    );
}

#[test]
fn a_refused_port_is_reported_and_ends_a_booted_vm() {
    let s = Scratch::new("ioport-refused");
    let root = rootfs(&s);
    let app = app_image(&s, "refused.img", &["fn=hello", "ioport=bitmap-refused"]);
    let mut cmd = Command::new(firerunner());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&root)
        .arg("--appfs")
        .arg(&app)
        .arg("--vsock_uds")
        .arg(s.path("vm.vsock"));
    let out = run_with_deadline(cmd, LIMIT);
    let lines = out.guest_lines();
    assert_eq!(out.code(), Some(2), "not a triple fault:\n{}", out.stdout);
    // Every check passed first, then the unprobed read was refused.
    let at = lines
        .iter()
        .position(|l| *l == "ioport bitmap ok")
        .unwrap_or_else(|| panic!("no ok line:\n{}", out.stdout));
    assert_eq!(
        lines[at + 1],
        "ioport bitmap: reading port 0x3f1 unprobed",
        "{}",
        out.stdout
    );
    assert!(lines[at + 2].starts_with(REFUSED_REPORT), "{}", out.stdout);
    assert_eq!(lines.len(), at + 3, "{}", out.stdout);
}
