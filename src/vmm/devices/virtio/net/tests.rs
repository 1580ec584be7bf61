//! Tests of the virtio-net device on a real TAP. Each test runs on a
//! thread of its own that first enters a fresh network namespace, so its
//! TAP never appears on the host's network and vanishes with the thread;
//! the test's end of the wire is an AF_PACKET socket on that TAP.

use super::*;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

const MEM_SIZE: usize = 4 << 20;
const RXQ: u64 = 0;
const TXQ: u64 = 0x10000;
const BUF: u64 = 0x10_0000;
const OUTSIDE: u64 = 0x1000_0000;
/// An ethertype for local experiments (IEEE 802): frames of the tests,
/// told apart from whatever else the kernel sends on the TAP.
const ETHERTYPE: u16 = 0x88b5;
const TAP: &str = "snaptest0";

/// Runs `f` on a thread inside a new network namespace.
fn in_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): the tests run as root");
        f()
    })
    .join()
    .expect("test thread");
}

/// The test's end of the TAP: a packet socket bound to it.
struct Wire(OwnedFd);

impl Wire {
    /// Brings `TAP` up (so it carries frames) and binds a socket to it.
    fn open() -> Self {
        // The child inherits this thread's network namespace.
        let st = std::process::Command::new("ip")
            .args(["link", "set", TAP, "up"])
            .status()
            .unwrap();
        assert!(st.success());
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new, open socket that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: `name` is a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0);
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: `sa` is a sockaddr_ll of the size given, alive across the call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        Self(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is a valid buffer of the length given.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next test frame the TAP's interface received, if one comes
    /// within `wait`.
    fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
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
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32 + 1) };
            if r <= 0 {
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
            if n > 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }
}

/// A test frame: broadcast, from `src`, `len` bytes in all.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x06, 0, 0, 0, 0, seed]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((14..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

struct Rig {
    /// Leaked: the mock queues borrow it (a few MiB per test).
    mem: &'static GuestMemoryMmap,
    vqs: [MockSplitQueue<'static, GuestMemoryMmap>; 2],
    net: Net,
    irq: Arc<Interrupt>,
    next: [u16; 2],
}

/// One descriptor: (address, length, device-writable).
type D = (u64, u32, bool);

impl Rig {
    fn new() -> Self {
        Self::on(TAP)
    }

    fn on(tap: &str) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let mut net = Net::new(&TapSource::Name(tap.into()), Some(DEFAULT_MAC)).unwrap();
        let vqs = [RXQ, TXQ].map(|a| MockSplitQueue::create(mem, GuestAddress(a), QUEUE_SIZE));
        let queues = vqs.iter().map(|vq| vq.create_queue().unwrap()).collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        net.activate(ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: irq.clone(),
            acked_features: net.device_features(),
        })
        .unwrap();
        Self {
            mem,
            vqs,
            net,
            irq,
            next: [0; 2],
        }
    }

    fn vq(&self, q: usize) -> &MockSplitQueue<'static, GuestMemoryMmap> {
        &self.vqs[q]
    }

    /// Makes a chain available on queue `q`; returns its head.
    fn add(&mut self, q: usize, descs: &[D]) -> u16 {
        let start = self.next[q];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = (start + i as u16 + 1) % QUEUE_SIZE;
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq(q).add_desc_chains(&raw, start).unwrap();
        self.next[q] = (start + descs.len() as u16) % QUEUE_SIZE;
        start
    }

    fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let vq = self.vq(q);
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = vq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// Sends a frame with a (junk) header from guest memory at BUF.
    fn guest_send(&mut self, f: &[u8], descs: &[D]) {
        let mut bytes = vec![0x5a; VNET_HDR_LEN];
        bytes.extend_from_slice(f);
        self.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        self.add(TX_QUEUE, descs);
        self.net.queue_notify(TX_QUEUE);
    }

    /// Runs rx until it stops getting frames from the TAP or `until` holds.
    fn rx_until(&mut self, until: impl Fn(&Self) -> bool) -> RxEnd {
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let r = self.net.process_rx();
            if until(self) || Instant::now() > end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn a_frame_the_guest_sends_reaches_the_tap_without_its_header() {
    in_netns(|| {
        let mut r = Rig::new();
        let w = Wire::open();
        let f = frame(1000, 1);
        // Header and frame split over three descriptors.
        let total = (VNET_HDR_LEN + f.len()) as u32;
        r.guest_send(
            &f,
            &[
                (BUF, 5, false),
                (BUF + 5, 300, false),
                (BUF + 305, total - 305, false),
            ],
        );
        assert_eq!(r.used(TX_QUEUE), [(0, 0)]);
        assert_eq!(r.irq.status() & INT_USED_RING, INT_USED_RING);
        assert_eq!(w.recv(Duration::from_secs(2)).as_deref(), Some(&f[..]));
        // The largest frame allowed passes too.
        let big = frame(MAX_FRAME_LEN - VNET_HDR_LEN, 2);
        r.guest_send(&big, &[(BUF, MAX_FRAME_LEN as u32, false)]);
        assert_eq!(r.net.dropped(), 0);
    });
}

#[test]
fn a_frame_written_to_the_tap_reaches_the_guest() {
    in_netns(|| {
        let mut r = Rig::new();
        let w = Wire::open();
        // The kernel may send frames of its own (IPv6): fill the ring with
        // buffers, and look for ours.
        for i in 0..64u64 {
            r.add(RX_QUEUE, &[(BUF + i * 0x800, 0x800, true)]);
        }
        let f = frame(600, 3);
        w.send(&f);
        let want = (VNET_HDR_LEN + f.len()) as u32;
        r.rx_until(|r| r.used(RX_QUEUE).iter().any(|&(_, len)| len == want));
        let (id, _) = *r
            .used(RX_QUEUE)
            .iter()
            .find(|&&(_, len)| len == want)
            .expect("the frame reached the guest");
        let got = r.guest(BUF + u64::from(id) * 0x800, want as usize);
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[10] = 1; // num_buffers
        assert_eq!(&got[..VNET_HDR_LEN], &hdr);
        assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
        assert_eq!(r.irq.status() & INT_USED_RING, INT_USED_RING);
    });
}

#[test]
fn without_buffers_the_frame_waits_and_the_tap_is_not_polled() {
    in_netns(|| {
        let mut r = Rig::new();
        let w = Wire::open();
        let f = frame(200, 4);
        w.send(&f);
        // A frame is read, then waits: the TAP must leave the event loop.
        assert_eq!(r.rx_until(|r| r.net.rx_len.is_some()), RxEnd::NoBuffers);
        assert!(r.used(RX_QUEUE).is_empty());
        assert_eq!(r.net.process_rx(), RxEnd::NoBuffers);
        // Buffers arrive: the waiting frame is delivered first.
        for i in 0..64u64 {
            r.add(RX_QUEUE, &[(BUF + i * 0x800, 0x800, true)]);
        }
        let want = (VNET_HDR_LEN + f.len()) as u32;
        r.rx_until(|r| r.used(RX_QUEUE).iter().any(|&(_, len)| len == want));
        assert!(r.used(RX_QUEUE).iter().any(|&(_, len)| len == want));
        assert_eq!(r.net.dropped(), 0);
    });
}

#[test]
fn malformed_tx_chains_are_dropped_and_returned() {
    in_netns(|| {
        let mut r = Rig::new();
        let w = Wire::open();
        let f = frame(100, 5);
        let n = (VNET_HDR_LEN + f.len()) as u32;
        let cases: &[(&str, Vec<D>)] = &[
            ("shorter than the header", vec![(BUF, 8, false)]),
            ("device-writable", vec![(BUF, n, true)]),
            ("outside guest memory", vec![(OUTSIDE, n, false)]),
            (
                "straddling the end of memory",
                vec![(MEM_SIZE as u64 - 10, n, false)],
            ),
            (
                "longer than the cap",
                vec![(BUF, MAX_FRAME_LEN as u32, false), (BUF, 1, false)],
            ),
            (
                "4 GiB",
                vec![(BUF, u32::MAX, false), (BUF, u32::MAX, false)],
            ),
        ];
        for (i, (what, chain)) in cases.iter().enumerate() {
            r.guest_send(&f, chain);
            assert_eq!(r.used(TX_QUEUE).len(), i + 1, "{what}");
            assert_eq!(r.used(TX_QUEUE)[i].1, 0, "{what}");
            assert_eq!(r.net.dropped(), i as u64 + 1, "{what}");
        }
        // A descriptor loop: 0 -> 1 -> 0.
        let start = r.next[TX_QUEUE];
        let raw = [
            RawDescriptor::from(Descriptor::new(
                BUF,
                16,
                VRING_DESC_F_NEXT as u16,
                start + 1,
            )),
            RawDescriptor::from(Descriptor::new(BUF, 16, VRING_DESC_F_NEXT as u16, start)),
        ];
        r.vq(TX_QUEUE).add_desc_chains(&raw, start).unwrap();
        r.next[TX_QUEUE] += 2;
        r.net.queue_notify(TX_QUEUE);
        assert_eq!(r.net.dropped(), cases.len() as u64 + 1);
        assert!(w.recv(Duration::from_millis(300)).is_none());
        assert!(!r.irq.needs_reset());
        // Still works.
        r.guest_send(&f, &[(BUF, n, false)]);
        assert_eq!(w.recv(Duration::from_secs(2)).as_deref(), Some(&f[..]));
    });
}

#[test]
fn bad_rx_buffers_are_returned_empty_and_small_ones_drop_the_frame() {
    in_netns(|| {
        let mut r = Rig::new();
        let w = Wire::open();
        let f = frame(1000, 6);
        w.send(&f);
        assert_eq!(r.rx_until(|r| r.net.rx_len.is_some()), RxEnd::NoBuffers);
        // Read-only and out-of-memory buffers: returned unused, the frame waits.
        r.add(RX_QUEUE, &[(BUF, 0x800, false)]);
        r.add(RX_QUEUE, &[(OUTSIDE, 0x800, true)]);
        assert_eq!(r.net.process_rx(), RxEnd::NoBuffers);
        assert_eq!(r.used(RX_QUEUE), [(0, 0), (1, 0)]);
        assert!(r.net.rx_len.is_some());
        // Too small a buffer: the frame is dropped.
        let before = r.net.dropped();
        r.add(RX_QUEUE, &[(BUF, 64, true)]);
        r.net.process_rx();
        assert_eq!(r.used(RX_QUEUE)[2], (2, 0));
        assert_eq!(r.net.dropped(), before + 1);
        assert!(!r.irq.needs_reset());
    });
}

#[test]
fn a_corrupt_available_index_breaks_the_device_until_reset() {
    in_netns(|| {
        let mut r = Rig::new();
        r.vq(TX_QUEUE).avail().idx().store(QUEUE_SIZE + 1);
        r.net.queue_notify(TX_QUEUE);
        assert!(r.irq.needs_reset());
        assert!(r.net.save().unwrap().broken);
        assert_eq!(r.net.process_rx(), RxEnd::Idle);
        r.net.reset();
        assert_eq!(r.net.process_rx(), RxEnd::Idle);
    });
}

#[test]
fn state_round_trip_and_a_new_mac_is_announced() {
    in_netns(|| {
        let r = Rig::new();
        let s = r.net.save().unwrap();
        assert_eq!(s.mac, DEFAULT_MAC);
        assert_eq!(s.tap, TAP);
        let mut other = Rig::on("snaptest1");
        other.net.restore(&s).unwrap();
        assert_eq!(other.net.config_generation(), s.config_generation);
        let mac: Mac = "06:11:22:33:44:55".parse().unwrap();
        let moved = NetState { mac, ..s.clone() };
        other.irq.ack(u32::MAX);
        other.net.restore(&moved).unwrap();
        assert_eq!(other.net.config_generation(), s.config_generation + 1);
        assert_eq!(other.irq.status() & INT_CONFIG_CHANGE, INT_CONFIG_CHANGE);
        let mut c = [0u8; 8];
        other.net.read_config(0, &mut c);
        assert_eq!(
            &c[..6],
            &DEFAULT_MAC.0,
            "the device keeps the MAC it was given"
        );
        assert_eq!(&c[6..], &[0, 0]);
    });
}

#[test]
fn without_a_mac_given_a_restore_keeps_the_snapshots() {
    in_netns(|| {
        let mac: Mac = "06:11:22:33:44:55".parse().unwrap();
        let s = NetState {
            mac,
            config_generation: 3,
            broken: false,
            tap: TAP.into(),
        };
        let mut net = Net::new(&TapSource::Name(TAP.into()), None).unwrap();
        assert_eq!(net.mac(), DEFAULT_MAC);
        net.restore(&s).unwrap();
        assert_eq!((net.mac(), net.config_generation()), (mac, 3));
        let mut c = [0u8; 6];
        net.read_config(0, &mut c);
        assert_eq!(c, mac.0);
    });
}

#[test]
fn macs_and_tap_names() {
    let m: Mac = "06:00:AC:10:00:02".parse().unwrap();
    assert_eq!(m, DEFAULT_MAC);
    assert_eq!(m.to_string(), "06:00:ac:10:00:02");
    for bad in [
        "",
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "01:00:5e:00:00:01",
        "6:0:ac:10:0:2",
        "zz:00:00:00:00:00",
    ] {
        assert!(bad.parse::<Mac>().is_err(), "{bad}");
    }
    for bad in ["", "a/b", "x y", "waytoolongforaniface", ".."] {
        assert!(
            matches!(
                Net::new(&TapSource::Name(bad.into()), None),
                Err(NetError::Tap(TapError::Name(_)))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn an_inherited_descriptor_must_be_an_attached_tap() {
    use std::os::fd::IntoRawFd;
    let not_tap = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
    let closed = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
    // SAFETY: `closed` is this test's own descriptor, closed once.
    unsafe { libc::close(closed) };
    // An unattached /dev/net/tun descriptor is no TAP either.
    let unattached = std::fs::File::open("/dev/net/tun").map(IntoRawFd::into_raw_fd);
    for fd in [Some(-1), Some(closed), Some(not_tap), unattached.ok()]
        .into_iter()
        .flatten()
    {
        match Net::new(&TapSource::Fd(fd), None) {
            Err(NetError::Tap(TapError::BadFd { fd: f, .. })) => assert_eq!(f, fd),
            Err(e) => panic!("fd {fd}: {e}"),
            Ok(_) => panic!("fd {fd} was taken for a TAP"),
        }
    }
}
