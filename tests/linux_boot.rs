//! Linux boot conformance: firerunner boots the `test` variant of our guest
//! kernel (scripts/build-kernel.sh --variant test) with a small ext4 root
//! disk (no initrd) and an app disk, and Linux's own drivers — which we did
//! not write — must find our devices as the spec describes them:
//!
//! - both virtio-blk disks probed with the right sizes, and read-only: the
//!   root is mounted `rw` on the command line and Linux must fall back to a
//!   read-only mount, and the driver must have accepted VIRTIO_BLK_F_RO on
//!   both disks (firerunner's activation log);
//! - the virtio-vsock device bound to its driver;
//! - the ext4 root mounted and `Run /init`.
//!
//! Any warning or error our devices log on the way fails the test: every
//! deviation is our bug. The test takes minutes on our emulating CI host, so
//! it is `#[ignore]`d; `scripts/linux-boot-test.sh` runs it. Environment:
//! `SNAPVM_LINUX_KERNEL` (a vmlinux to use instead of building one),
//! `SNAPVM_LINUX_BOOT_TIMEOUT` (seconds, default 1200),
//! `SNAPVM_LINUX_BOOT_CONSOLE` (where the guest console goes; kept; by
//! default a temporary file kept only on failure).

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{firerunner, Scratch};

/// Root disk: 8 MiB of ext4.
const ROOT_SECTORS: u64 = 16384;
/// App disk: 1.5 MiB, so the two disks tell apart by size.
const APP_SECTORS: u64 = 3072;
/// VIRTIO_BLK_F_RO.
const BLK_F_RO: u64 = 1 << 5;
/// What the DESIGN.md notes say Linux needs on our emulating CI host: no
/// xsave, no fsgsbase, and popcnt, smap, smep, invpcid, pcid and rdpid
/// hidden. `rw` so that the read-only disk shows in the root mount;
/// `debug` so the driver core's "bound device" lines reach the console.
const KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 noxsave nofsgsbase \
     clearcpuid=151,308,295,298,145,534 root=/dev/vda rw rootfstype=ext4 init=/init debug";

struct Milestone {
    what: &'static str,
    pattern: String,
}

fn milestones() -> Vec<Milestone> {
    let m = |what, pattern: &str| Milestone {
        what,
        pattern: pattern.to_string(),
    };
    vec![
        m("kernel started", "Linux version"),
        m(
            "virtio-mmio devices announced",
            "Registering device virtio-mmio.2 at",
        ),
        m(
            "vda (rootfs) probed, right size",
            &format!("[vda] {ROOT_SECTORS} 512-byte logical blocks"),
        ),
        m(
            "vdb (appfs) probed, right size",
            &format!("[vdb] {APP_SECTORS} 512-byte logical blocks"),
        ),
        m(
            "virtio-blk bound to vda",
            "bound device virtio0 to driver virtio_blk",
        ),
        m(
            "virtio-blk bound to vdb",
            "bound device virtio1 to driver virtio_blk",
        ),
        m(
            "virtio-vsock bound",
            "bound device virtio2 to driver vmw_vsock_virtio_transport",
        ),
        m("ext4 root mounted", "EXT4-fs (vda): mounted filesystem"),
        m(
            "root mounted read-only (asked rw)",
            "VFS: Mounted root (ext4 filesystem) readonly on device",
        ),
        m("Run /init", "Run /init as init process"),
    ]
}

/// Console lines that end the test at once.
const FATAL: &[&str] = &[
    "Kernel panic",
    "probe with driver",
    "BUG:",
    "Oops",
    "general protection fault",
    "invalid opcode",
];

/// The vmlinux to boot.
fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("SNAPVM_LINUX_KERNEL") {
        return PathBuf::from(k);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-kernel.sh");
    eprintln!(
        "linux_boot: building (or finding cached) the test kernel; the first build takes minutes"
    );
    let out = Command::new("bash")
        .arg(&script)
        .args(["--variant", "test"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-kernel.sh");
    assert!(out.status.success(), "building the test kernel failed");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
    PathBuf::from(stdout.lines().last().expect("a path").trim())
}

/// A static x86_64 ELF for /init, no libc: ioperm(0x3f0, 1, 1), then
/// `outb 123` to the control port (boot done), then pause() forever. (On our
/// CI host system calls from guest user mode do not work; the test ends at
/// `Run /init` either way.)
fn init_elf() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb8, 0xad, 0x00, 0x00, 0x00, // mov eax, 173 (ioperm)
        0xbf, 0xf0, 0x03, 0x00, 0x00, // mov edi, 0x3f0
        0xbe, 0x01, 0x00, 0x00, 0x00, // mov esi, 1
        0xba, 0x01, 0x00, 0x00, 0x00, // mov edx, 1
        0x0f, 0x05,                   // syscall
        0x66, 0xba, 0xf0, 0x03,       // mov dx, 0x3f0
        0xb0, 0x7b,                   // mov al, 123
        0xee,                         // out dx, al
        0xb8, 0x22, 0x00, 0x00, 0x00, // loop: mov eax, 34 (pause)
        0x0f, 0x05,                   // syscall
        0xeb, 0xf7,                   // jmp loop
    ];
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let size = HEADERS + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes()); // ehsize phentsize phnum shentsize shnum shstrndx
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, BASE, BASE, size, size, 0x1000u64] {
        e.extend_from_slice(&v.to_le_bytes()); // offset vaddr paddr filesz memsz align
    }
    assert_eq!(e.len() as u64, HEADERS);
    e.extend_from_slice(code);
    e
}

/// An ext4 image of ROOT_SECTORS sectors holding /init and mount points.
fn rootfs(scratch: &Scratch) -> PathBuf {
    let dir = scratch.path("root");
    for d in ["dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    let init = dir.join("init");
    std::fs::write(&init, init_elf()).expect("write /init");
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let img = scratch.path("rootfs.ext4");
    let mkfs = ["mkfs.ext4", "/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4"]
        .into_iter()
        .find(|m| {
            Command::new(m)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .expect("mkfs.ext4 (e2fsprogs) is needed");
    let status = Command::new(mkfs)
        .args(["-q", "-F", "-L", "snapvm-test", "-d"])
        .arg(&dir)
        .arg(&img)
        .arg(format!("{}k", ROOT_SECTORS / 2))
        .status()
        .expect("run mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 failed");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), ROOT_SECTORS * 512);
    img
}

/// The app disk: a testguest-style manifest, padded to APP_SECTORS sectors.
fn appfs(scratch: &Scratch) -> PathBuf {
    let mut img = b"fn=hello\n".to_vec();
    img.resize((APP_SECTORS * 512) as usize, 0);
    scratch.file("appfs.img", &img)
}

/// The guest's printk timestamp at the start of `line`, if any.
fn printk_time(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split(']').next()?.trim().parse().ok()
}

#[test]
#[ignore = "boots Linux: minutes on an emulating host; run scripts/linux-boot-test.sh"]
fn linux_boots_to_init_on_our_devices() {
    let kernel = kernel();
    let scratch = Scratch::new("linux-boot");
    let root = rootfs(&scratch);
    let app = appfs(&scratch);
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cpu-templates/no-cx16.json");
    let timeout = Duration::from_secs(
        std::env::var("SNAPVM_LINUX_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1200),
    );
    let (console, keep_console) = match std::env::var_os("SNAPVM_LINUX_BOOT_CONSOLE") {
        Some(p) => (PathBuf::from(p), true),
        None => (
            std::env::temp_dir().join(format!("snapvm-linux-boot-{}.log", std::process::id())),
            false,
        ),
    };
    let _ = std::fs::remove_file(&console);

    let mut cmd = Command::new(firerunner());
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--rootfs")
        .arg(&root)
        .arg("--appfs")
        .arg(&app)
        .arg("--cpu_template")
        .arg(&template)
        .args(["--kernel_args", KERNEL_ARGS, "--mem_size", "128"])
        .arg("--console")
        .arg(&console)
        .arg("--vsock_uds")
        .arg(scratch.path("vsock"))
        .env("RUST_LOG", "info,snapvm::vmm::devices=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    eprintln!(
        "linux_boot: booting {} (console: {})",
        kernel.display(),
        console.display()
    );
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn firerunner");
    let stderr = Arc::new(Mutex::new(String::new()));
    let reader = {
        let mut pipe = child.stderr.take().expect("stderr");
        let stderr = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };

    let milestones = milestones();
    let mut seen: Vec<Option<(Duration, Option<f64>)>> = vec![None; milestones.len()];
    let failure: Option<String> = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        for (i, m) in milestones.iter().enumerate() {
            if seen[i].is_none() {
                if let Some(line) = text.lines().find(|l| l.contains(&m.pattern)) {
                    let t = start.elapsed();
                    eprintln!("linux_boot: {:>7.1} s  {}", t.as_secs_f64(), m.what);
                    seen[i] = Some((t, printk_time(line)));
                }
            }
        }
        if seen.iter().all(Option::is_some) {
            break None;
        }
        if let Some(l) = text.lines().find(|l| FATAL.iter().any(|f| l.contains(f))) {
            break Some(format!("the guest failed: {l}"));
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(format!("firerunner exited early ({status})"));
        }
        if start.elapsed() > timeout {
            break Some(format!("no `Run /init` within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Let firerunner's log catch up, then stop the VM.
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let log = stderr.lock().unwrap().clone();

    // Device side: the drivers accepted read-only disks and started vsock,
    // and our devices had nothing to complain about.
    let activated = |ty: u32| -> Vec<u64> {
        let needle = format!("device type {ty} activated; driver features 0x");
        log.lines()
            .filter_map(|l| l.split(&needle).nth(1))
            .filter_map(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .collect()
    };
    let mut problems = Vec::new();
    if let Some(f) = failure {
        problems.push(f);
    }
    for (m, s) in milestones.iter().zip(&seen) {
        if s.is_none() {
            problems.push(format!("never saw: {} ({:?})", m.what, m.pattern));
        }
    }
    let blk = activated(2);
    if blk.len() != 2 || blk.iter().any(|f| f & BLK_F_RO == 0) {
        problems.push(format!(
            "expected two virtio-blk activations with VIRTIO_BLK_F_RO accepted, got features {blk:x?}"
        ));
    }
    if activated(19).len() != 1 {
        problems.push("the virtio-vsock device was not activated exactly once".into());
    }
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains("snapvm::vmm"))
        .collect();
    if !complaints.is_empty() {
        problems.push(format!("our VMM complained:\n{}", complaints.join("\n")));
    }

    eprintln!("linux_boot: milestones (wall time since firerunner start / guest printk time):");
    for (m, s) in milestones.iter().zip(&seen) {
        match s {
            Some((t, Some(g))) => {
                eprintln!("  {:>7.1} s  [{g:>10.3}]  {}", t.as_secs_f64(), m.what)
            }
            Some((t, None)) => eprintln!("  {:>7.1} s  [{:>10}]  {}", t.as_secs_f64(), "", m.what),
            None => eprintln!("  {:>9}  [{:>10}]  {}", "-", "", m.what),
        }
    }
    if problems.is_empty() {
        if !keep_console {
            let _ = std::fs::remove_file(&console);
        }
        return;
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    let log_lines: Vec<&str> = log.lines().collect();
    let log_tail = log_lines[log_lines.len().saturating_sub(40)..].join("\n");
    panic!(
        "Linux boot conformance failed:\n- {}\n\nconsole (kept at {}), last lines:\n{tail}\n\nfirerunner log, last lines:\n{log_tail}",
        problems.join("\n- "),
        console.display()
    );
}
