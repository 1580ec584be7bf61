//! virtio-net on real KVM and a real TAP: testguest (`testguest.net=1`)
//! sends a frame and echoes the one it gets back; a networked VM's
//! snapshot restores only with a network card.
//!
//! Every test makes its own network namespace (`ip netns add`) holding a
//! TAP, runs firerunner inside it (`ip netns exec`), and deletes it on
//! drop — on failure too — so nothing reaches the host's network. The
//! test's end of the wire is an AF_PACKET socket made inside that
//! namespace. Needs root, `ip`, and the tun module.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{app_image, firerunner, ip, run_with_deadline, singlevm, testguest, Scratch};

const LIMIT: Duration = Duration::from_secs(120);
const TAP: &str = "tap0";
const MAC: &str = "06:11:22:33:44:55";
const ETHERTYPE: u16 = 0x88b5;

/// A network namespace with TAP `tap0` (up, vnet_hdr), deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("snapvm-net-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ns.exec_ip(&["tuntap", "add", TAP, "mode", "tap", "vnet_hdr"]);
        ns.exec_ip(&["link", "set", TAP, "up"]);
        ns
    }

    fn exec_ip(&self, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.0, "ip"];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// `firerunner ARGS` inside the namespace.
    fn firerunner(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, firerunner()]);
        cmd
    }

    /// A packet socket on the TAP's interface, made inside the namespace
    /// (a socket stays in the namespace it was made in).
    fn wire(&self) -> Wire {
        Wire::open_in(&self.0, TAP)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Wire(OwnedFd);

impl Wire {
    /// A packet socket on `iface` of the named network namespace, as
    /// soon as both exist (within [`LIMIT`]).
    fn open_in(netns: &str, iface: &'static str) -> Self {
        let path = format!("/run/netns/{netns}");
        let deadline = Instant::now() + LIMIT;
        let wait = |what: &str, ready: &dyn Fn() -> bool| {
            while !ready() {
                assert!(Instant::now() < deadline, "no {what}");
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        wait(&path, &|| Path::new(&path).exists());
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open the netns");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let name = std::ffi::CString::new(iface).unwrap();
                // SAFETY: `name` is NUL-terminated.
                wait(
                    iface,
                    &|| unsafe { libc::if_nametoindex(name.as_ptr()) } != 0,
                );
                Wire::open(iface)
            })
            .join()
            .expect("wire thread")
        })
    }

    fn open(iface: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new open socket nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: `name` is NUL-terminated.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no {iface} in the namespace");
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: `sa` is a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        Wire(fd)
    }

    fn send(&self, payload: &[u8]) {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x06, 0, 0, 0, 0, 0x99]);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend_from_slice(payload);
        // SAFETY: `f` is valid for its length.
        let n = unsafe { libc::send(self.0.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
    }

    /// The next test frame on the wire within `wait`: (source MAC, payload).
    fn recv(&self, wait: Duration) -> Option<([u8; 6], Vec<u8>)> {
        let end = Instant::now() + wait;
        let mut buf = vec![0u8; 70000];
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32 + 1) } <= 0 {
                continue;
            }
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            // Our own frames come back as outgoing packets: skip them.
            if n > 14
                && buf[12..14] == ETHERTYPE.to_be_bytes()
                && buf[6..12] != [6, 0, 0, 0, 0, 0x99]
            {
                let src = buf[6..12].try_into().unwrap();
                return Some((src, buf[14..n as usize].to_vec()));
            }
        }
    }
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let v: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

fn rootfs(s: &Scratch) -> std::path::PathBuf {
    s.file("rootfs.img", &[0x5a; 4096])
}

/// What one `testguest.net=MODE` run left: the console, firerunner's
/// stderr and exit code, the guest's first test frame and its echo of ours.
struct Exchange {
    console: String,
    stderr: String,
    code: Option<i32>,
    first: Option<([u8; 6], Vec<u8>)>,
    echo: Option<([u8; 6], Vec<u8>)>,
}

fn exchange(mode: &str, rust_log: &str) -> Exchange {
    let s = Scratch::new("net-frames");
    let ns = Netns::new();
    let wire = ns.wire();
    let mut cmd = ns.firerunner();
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(rootfs(&s))
        .args(["--tap", TAP, "--mac", MAC])
        .arg("--kernel_args")
        .arg(format!(
            "console=ttyS0 testguest.net={mode} testguest.exit=reboot"
        ))
        .env("RUST_LOG", rust_log)
        .arg("--vsock_uds")
        .arg(s.path("v.vsock"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn firerunner");
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let first = wire.recv(Duration::from_secs(60));
    if first.is_some() {
        wire.send(b"ping 42");
    }
    let echo = wire.recv(Duration::from_secs(30));
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let lines = lines.join().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    Exchange {
        console: lines.join("\n"),
        stderr,
        code: status.code(),
        first,
        echo,
    }
}

/// The frames of a good exchange went both ways and the VM ended cleanly.
fn check_exchange(x: &Exchange) {
    let (console, stderr) = (&x.console, &x.stderr);
    assert!(
        console.contains(&format!("testguest: net: mac {MAC}")),
        "{console}\n{stderr}"
    );
    assert_eq!(
        x.first,
        Some((mac_bytes(MAC), b"hello from testguest".to_vec())),
        "the guest's frame on the TAP\n{console}\n{stderr}"
    );
    assert!(
        console.contains("testguest: net: received 7 bytes: ping 42"),
        "{console}"
    );
    assert_eq!(x.echo, Some((mac_bytes(MAC), b"echo: ping 42".to_vec())));
    assert_eq!(x.code, Some(0), "{console}\n{stderr}");
}

#[test]
fn frames_cross_between_the_guest_and_the_tap() {
    check_exchange(&exchange("1", "warn"));
}

#[test]
fn hostile_tx_chains_are_dropped_and_a_corrupt_ring_needs_a_reset() {
    let x = exchange("hostile", "snapvm::vmm::devices::virtio::net=debug,warn");
    // No malformed chain put a frame on the wire: the first test frame
    // there is the one sent after the device was reset.
    check_exchange(&x);
    for case in [
        "short", "writable", "outside", "oversize", "loop", "bad-next",
    ] {
        assert!(
            x.console
                .contains(&format!("testguest: net: hostile {case}: used id 0 len 0")),
            "{case}\n{}",
            x.console
        );
    }
    assert!(
        x.console.contains("testguest: net: needs reset 1"),
        "{}",
        x.console
    );
    assert!(
        x.stderr.contains("tx available ring is corrupt"),
        "{}",
        x.stderr
    );
    let drops = x.stderr.matches("tx frame dropped").count();
    assert_eq!(drops, 6, "one log line per bad chain:\n{}", x.stderr);
}
/// Boots testguest with a network card, drives it, and snapshots at the
/// guest's first snapshot point.
fn networked_snapshot(s: &Scratch, ns: &Netns, dir: &Path) {
    let mut cmd = ns.firerunner();
    cmd.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(rootfs(s))
        .arg("--appfs")
        .arg(app_image(s, "app.img", &["fn=hello"]))
        .args(["--network", &format!("{TAP}/{MAC}")])
        .args(["--kernel_args", "console=ttyS0 testguest.net=1"])
        .arg("--console")
        .arg(s.path("dump-console.log"))
        .arg("--vsock_uds")
        .arg(s.path("dump.vsock"))
        .arg("--dump_dir")
        .arg(dir);
    let wire = ns.wire();
    // The guest waits for a frame before it reaches its snapshot point.
    let feeder = std::thread::spawn(move || {
        if wire.recv(Duration::from_secs(60)).is_some() {
            wire.send(b"before the snapshot");
        }
    });
    let out = run_with_deadline(cmd, LIMIT);
    feeder.join().unwrap();
    assert_eq!(out.code(), Some(0), "snapshot failed:\n{}", out.stderr);
    let console = std::fs::read_to_string(s.path("dump-console.log")).unwrap();
    assert!(console.contains("testguest: net: echoed"), "{console}");
    let state = std::fs::read_to_string(dir.join("snapshot.json")).unwrap();
    assert!(
        state.contains(r#""kind":"net""#),
        "no net device in the snapshot"
    );
}

#[test]
fn a_networked_snapshot_restores_only_with_a_network_card() {
    let s = Scratch::new("net-snap");
    let ns = Netns::new();
    let dir = s.path("snap");
    networked_snapshot(&s, &ns, &dir);

    let restore = |extra: &[&str], name: &str| {
        let mut cmd = ns.firerunner();
        cmd.arg("--kernel")
            .arg(testguest())
            .arg("--rootfs")
            .arg(rootfs(&s))
            .arg("--appfs")
            .arg(s.path("app.img"))
            .arg("--load_dir")
            .arg(&dir)
            .arg("--console")
            .arg(s.path(&format!("{name}-console.log")))
            .arg("--vsock_uds")
            .arg(s.path(&format!("{name}.vsock")))
            .args(extra);
        run_with_deadline(cmd, LIMIT)
    };
    let out = restore(&[], "bare");
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("net:net") && out.stderr.contains("this VM has ["),
        "{}",
        out.stderr
    );

    // With the card, the restored guest runs on to its diff snapshot
    // point, and the diff records the card too.
    let diff = s.path("diff");
    let diff_arg = diff.display().to_string();
    let out = restore(
        &["--tap", TAP, "--mac", MAC, "--dump_dir", &diff_arg],
        "net",
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let state = std::fs::read_to_string(diff.join("snapshot.json")).unwrap();
    assert!(
        state.contains(r#""kind":"net""#),
        "no net device in the diff"
    );
}

#[test]
fn tap_flags_are_checked_before_the_vm_starts() {
    let s = Scratch::new("net-flags");
    let ns = Netns::new();
    let run = |extra: &[&str]| {
        let mut cmd = ns.firerunner();
        cmd.arg("--kernel")
            .arg(testguest())
            .arg("--rootfs")
            .arg(rootfs(&s))
            .arg("--vsock_uds")
            .arg(s.path("f.vsock"))
            .args(extra);
        run_with_deadline(cmd, LIMIT)
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["--tap", TAP, "--mac", "01:00:5e:00:00:01"],
            "invalid MAC address",
        ),
        (&["--network", "tap0"], "expected TAP/MAC"),
        (&["--tap", "bad/name"], "TAP name"),
    ];
    for (args, msg) in cases {
        let out = run(args);
        assert_eq!(out.code(), Some(1), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(msg), "{args:?}: {}", out.stderr);
    }
    // A TAP in use by another VM (no multi-queue): one clear error.
    let mut busy = ns.firerunner();
    busy.arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(rootfs(&s))
        .args(["--tap", TAP])
        .args(["--kernel_args", "console=ttyS0 testguest.exit=halt"])
        .arg("--vsock_uds")
        .arg(s.path("busy.vsock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut first = busy.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = run(&["--tap", TAP]);
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot attach to TAP tap0"),
        "{}",
        out.stderr
    );
}

/// A one-slot uid range per test of `singlevm --net`, so that the VM's
/// namespace is known: `snapvm-<uid>` (src/network.rs).
fn net_uid(test: u32) -> u32 {
    980_000 + (std::process::id() % 1000) * 8 + test
}

/// `singlevm --net` on testguest in jail slot `uid`.
fn net_singlevm(s: &Scratch, uid: u32, extra: &[&str]) -> Command {
    let mut cmd = Command::new(singlevm());
    cmd.arg("--net")
        .arg("--kernel")
        .arg(testguest())
        .arg("--rootfs")
        .arg(rootfs(s))
        .arg("--jail_dir")
        .arg(s.path("jails"))
        .args(["--jail_uid_base", &uid.to_string(), "--jail_uid_count", "1"])
        .args(extra)
        .env("TMPDIR", &s.0);
    cmd
}

fn ip_out(args: &[&str]) -> (bool, String) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Neither the VM's namespace nor its uplink is left.
fn assert_no_network(uid: u32) {
    assert!(
        !Path::new(&format!("/run/netns/snapvm-{uid}")).exists(),
        "namespace snapvm-{uid} left"
    );
    assert!(
        !ip_out(&["link", "show", &format!("snv{uid}")]).0,
        "uplink snv{uid} left"
    );
}

#[test]
fn singlevm_net_gives_the_vm_a_namespace_of_its_own_and_removes_it() {
    let s = Scratch::new("net-singlevm");
    let uid = net_uid(0);
    let ns = format!("snapvm-{uid}");
    let app = app_image(&s, "hello.img", &["fn=hello"]);
    let mut cmd = net_singlevm(&s, uid, &["--kernel_args", "console=ttyS0 testguest.net=1"]);
    cmd.arg("--appfs")
        .arg(&app)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut vm = cmd.spawn().expect("spawn singlevm");
    // Open before the guest boots (the VM starts once its namespace is
    // complete), to catch its first frame.
    let wire = Wire::open_in(&ns, "vm0");
    // The namespace is complete once its uplink has its address.
    let deadline = Instant::now() + LIMIT;
    while !ip_out(&["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .1
        .contains("10.2")
    {
        if Instant::now() > deadline || vm.try_wait().unwrap().is_some() {
            let _ = vm.kill();
            let out = vm.wait_with_output().unwrap();
            panic!(
                "no namespace {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The layout every clone relies on: the gateway's address and MAC.
    let (_, link) = ip_out(&["-n", &ns, "-o", "link", "show", "vm0"]);
    assert!(link.contains("02:00:ac:10:00:01"), "{link}");
    let (_, addr) = ip_out(&["-n", &ns, "-4", "-o", "addr", "show", "vm0"]);
    assert!(addr.contains("172.16.0.1/30"), "{addr}");
    let (_, routes) = ip_out(&["-n", &ns, "route"]);
    assert!(routes.contains("default via 10.2"), "{routes}");
    let (_, host) = ip_out(&["-4", "-o", "addr", "show", &format!("snv{uid}")]);
    assert!(host.contains("10.2"), "{host}");
    let rules = Command::new("nft")
        .args(["list", "table", "inet", "snapvm"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rules.stdout).contains("iifname \"snv*\" drop"),
        "the host's rules are not loaded"
    );

    // Frames cross between the jailed VM and the TAP in its namespace.
    let first = wire.recv(Duration::from_secs(60));
    assert_eq!(
        first,
        Some((
            mac_bytes("06:00:ac:10:00:02"),
            b"hello from testguest".to_vec()
        ))
    );
    wire.send(b"ping 42");
    assert_eq!(
        wire.recv(Duration::from_secs(30)),
        Some((mac_bytes("06:00:ac:10:00:02"), b"echo: ping 42".to_vec()))
    );

    // The VM serves, then stops with its input; its network goes with it.
    let mut stdin = vm.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"{}\n").unwrap();
    drop(stdin);
    let out = vm.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("hello"), "{stdout}");
    assert_no_network(uid);
}

#[test]
fn a_vm_network_that_cannot_be_made_is_one_clear_error_and_leaves_nothing() {
    let s = Scratch::new("net-refused");
    let uid = net_uid(1);
    let run = |cmd: Command| {
        let out = run_with_deadline(cmd, LIMIT);
        assert_eq!(out.code(), Some(1), "{}", out.stderr);
        assert_no_network(uid);
        out.stderr
    };

    // Unjailed: the namespace is named after the jail slot.
    let err = run(net_singlevm(&s, uid, &["--no_jail"]));
    assert!(err.contains("only in a jail"), "{err}");

    // The uplink's name is taken.
    struct Dummy(String);
    impl Drop for Dummy {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let name = format!("snv{uid}");
    ip(&["tuntap", "add", &name, "mode", "tap"]);
    let dummy = Dummy(name.clone());
    let out = run_with_deadline(net_singlevm(&s, uid, &[]), LIMIT);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("make the uplink {name}")) && out.stderr.contains("exists"),
        "{}",
        out.stderr
    );
    assert!(!Path::new(&format!("/run/netns/snapvm-{uid}")).exists());
    drop(dummy);
    assert_no_network(uid);

    // No permission: not root.
    let mut cmd = Command::new("setpriv");
    let vm = net_singlevm(&s, uid, &[]);
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(vm.get_program())
        .args(vm.get_args())
        .env("TMPDIR", "/tmp");
    let err = run(cmd);
    assert!(err.contains("needs root"), "{err}");
}
