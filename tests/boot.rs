//! firerunner boots testguest on real KVM: SMP, memory above 4 GiB, the
//! command line, exits, and every bad input the CLI can get.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{firerunner, run_testguest, run_with_deadline, testguest, Scratch};

fn boot(scratch: &Scratch, vcpus: u32, mem: u32, args: &str) -> common::Outcome {
    let rootfs = scratch.file("rootfs.img", &[0u8; 4096]);
    run_testguest(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--vcpu_count",
        &vcpus.to_string(),
        "--mem_size",
        &mem.to_string(),
        "--kernel_args",
        args,
    ])
}

fn apic_ids(out: &common::Outcome) -> Vec<u32> {
    out.guest_lines()
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("cpu ")?;
            let mut w = rest.split_whitespace();
            let _index = w.next()?;
            (w.next()? == "apic").then_some(())?;
            let id = w.next()?.parse().ok()?;
            (w.next()? == "online").then_some(id)
        })
        .collect()
}

#[test]
fn every_vcpu_comes_online_with_its_own_apic_id() {
    for n in [1u32, 2, 4] {
        let s = Scratch::new("smp");
        let out = boot(&s, n, 128, "testguest.exit=reboot");
        assert_eq!(
            out.code(),
            Some(0),
            "{n} vCPUs: {}\n{}",
            out.stdout,
            out.stderr
        );
        let lines = out.guest_lines();
        assert!(
            lines.contains(&format!("cpus: {n}").as_str()),
            "{}",
            out.stdout
        );
        let ids = apic_ids(&out);
        assert_eq!(ids.len(), n as usize, "{}", out.stdout);
        let distinct: BTreeSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), n as usize, "APIC ids not distinct: {ids:?}");
        assert!(lines.contains(&"boot done"), "{}", out.stdout);
    }
}

#[test]
fn memory_above_4g_is_usable() {
    let s = Scratch::new("highmem");
    let small = boot(&s, 1, 128, "testguest.exit=reboot");
    assert_eq!(small.code(), Some(0), "{}", small.stderr);
    assert!(
        small.guest_lines().contains(&"highmem: none"),
        "{}",
        small.stdout
    );

    let big = boot(&s, 1, 4096, "testguest.exit=reboot");
    assert_eq!(big.code(), Some(0), "{}", big.stderr);
    let line = big
        .guest_lines()
        .into_iter()
        .find(|l| l.starts_with("highmem: ok at 0x"))
        .unwrap_or_else(|| panic!("no highmem line:\n{}", big.stdout));
    let addr = u64::from_str_radix(line.trim_start_matches("highmem: ok at 0x"), 16).unwrap();
    // RAM past the 3 GiB below the hole continues at 4 GiB: 1 GiB of it.
    assert!((4u64 << 30..5u64 << 30).contains(&addr), "{addr:#x}");
}

#[test]
fn the_guest_sees_the_exact_command_line() {
    let s = Scratch::new("cmdline");
    let args = "testguest.exit=reboot  foo=bar,baz quiet x=\"a b\"";
    let out = boot(&s, 1, 128, args);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let seen = out
        .guest_lines()
        .into_iter()
        .find_map(|l| l.strip_prefix("cmdline: "))
        .unwrap_or_else(|| panic!("no cmdline line:\n{}", out.stdout))
        .to_string();
    // The user's arguments come first, verbatim; device announcements follow.
    assert!(seen.starts_with(args.trim()), "{seen:?}");
    let rest = seen[args.trim().len()..].trim();
    assert!(
        rest.split(' ')
            .all(|w| w.is_empty() || w.starts_with("virtio_mmio.device=")),
        "{rest:?}"
    );
}

#[test]
fn guest_reset_and_triple_fault_end_with_documented_codes() {
    let s = Scratch::new("exits");
    let reset = boot(&s, 2, 128, "testguest.exit=reboot");
    assert_eq!(reset.code(), Some(0), "{}", reset.stderr);
    let fault = boot(&s, 1, 128, "testguest.exit=triplefault");
    assert_eq!(fault.code(), Some(2), "{}\n{}", fault.stdout, fault.stderr);
    assert!(fault.stderr.contains("triple fault"), "{}", fault.stderr);
}

#[test]
fn the_default_vsock_socket_is_removed_at_exit() {
    // Without --vsock_uds the listener goes to $TMPDIR; nothing stays there.
    let s = Scratch::new("vsock-default");
    let tmp = Scratch::new("vsock-default-tmp");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let mut cmd = Command::new(firerunner());
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--kernel_args", "testguest.exit=reboot"])
        .env("TMPDIR", &tmp.0);
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(tmp.entries(), Vec::<String>::new());
}

#[test]
fn sigterm_stops_the_vm_with_code_143() {
    let s = Scratch::new("sigterm");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let console = s.path("console.log");
    let mut child = Command::new(firerunner())
        .arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--console")
        .arg(&console)
        .args(["--kernel_args", "testguest.exit=halt"])
        .spawn()
        .unwrap();
    // Wait until the guest has booted, then ask firerunner to stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("testguest: boot done")
    {
        assert!(std::time::Instant::now() < deadline, "guest did not boot");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
}

/// Runs firerunner with `args` and expects a one-line error naming `what`.
fn refused(s: &Scratch, args: &[&str], what: &str) {
    let before = s.entries();
    let mut cmd = Command::new(firerunner());
    cmd.args(args);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{args:?}: {}", out.stderr);
    let stderr = out.stderr.trim();
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: not one line: {stderr}"
    );
    assert!(
        stderr.contains(what),
        "{args:?}: {stderr:?} does not mention {what:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(s.entries(), before, "{args:?} left files behind");
}

#[test]
fn bad_input_is_refused_with_one_clear_line() {
    let s = Scratch::new("bad");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let notkernel = s.file("notkernel", b"#!/bin/sh\necho not a kernel\n");
    let r = rootfs.to_str().unwrap();
    let tg = testguest().to_str().unwrap();
    let console = s.path("console.log");
    let c = console.to_str().unwrap();
    refused(
        &s,
        &[
            "--kernel",
            "/nonexistent/vmlinux",
            "--rootfs",
            r,
            "--console",
            c,
        ],
        "/nonexistent/vmlinux",
    );
    refused(
        &s,
        &[
            "--kernel",
            notkernel.to_str().unwrap(),
            "--rootfs",
            r,
            "--console",
            c,
        ],
        "neither an ELF",
    );
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            "/nonexistent/rootfs.img",
            "--console",
            c,
        ],
        "/nonexistent/rootfs.img",
    );
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            r,
            "--appfs",
            "/nonexistent/app.img",
            "--console",
            c,
        ],
        "/nonexistent/app.img",
    );
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            r,
            "--mem_size",
            "0",
            "--console",
            c,
        ],
        "memory size",
    );
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            r,
            "--mem_size",
            "100000000",
            "--console",
            c,
        ],
        "host",
    );
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            r,
            "--vcpu_count",
            "0",
            "--console",
            c,
        ],
        "--vcpu_count",
    );
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            r,
            "--vcpu_count",
            "4096",
            "--console",
            c,
        ],
        "--vcpu_count",
    );
    let long = "x".repeat(3000);
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            r,
            "--kernel_args",
            &long,
            "--console",
            c,
        ],
        "command line",
    );
    refused(
        &s,
        &[
            "--kernel",
            tg,
            "--rootfs",
            r,
            "--diff_dirs",
            "/tmp/snap",
            "--console",
            c,
        ],
        "--diff_dirs needs --load_dir",
    );
    refused(
        &s,
        &["--kernel", tg, "--rootfs", r, "--copy_base", "--console", c],
        "--copy_base needs --load_dir",
    );
}

#[test]
fn missing_or_forbidden_kvm_is_a_clear_error() {
    let s = Scratch::new("nokvm");
    let rootfs = s.file("rootfs.img", &[0u8; 512]);
    let empty = s.file("not-kvm", b"");
    // Hide /dev/kvm behind an ordinary file in a private mount namespace.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /dev/kvm && exec {} --kernel {} --rootfs {}",
            empty.display(),
            firerunner(),
            testguest().display(),
            rootfs.display()
        ));
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("/dev/kvm"), "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);

    // An unprivileged user may not open /dev/kvm here (mode 0600, root).
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        firerunner(),
        "--kernel",
    ])
    .arg(testguest())
    .arg("--rootfs")
    .arg(&rootfs);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot open /dev/kvm"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("ermission denied"), "{}", out.stderr);
}
