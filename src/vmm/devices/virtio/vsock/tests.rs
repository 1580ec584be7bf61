//! Device tests: a mock driver (virtio-queue's `MockSplitQueue` over real
//! guest memory) talks to the device, whose backend uses real Unix sockets
//! in a temporary directory and runs under a real event manager.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::packet::*;
use super::*;
use crate::vmm::event_loop::EventManager;
use crate::vmm::memory;

const GUEST_CID: u64 = 3;
const QSIZE: u16 = QUEUE_SIZE;
/// Payload room of each rx buffer (Linux posts 4 KiB).
const RX_PAYLOAD: u32 = 4096;

// Guest memory layout of the mock driver.
const RXQ_RING: u64 = 0x1_0000;
const TXQ_RING: u64 = 0x2_0000;
const EVQ_RING: u64 = 0x3_0000;
/// Used rings live apart from the mock's layout: `MockSplitQueue` places
/// the used ring `len` bytes after the avail ring's start, on top of the
/// avail ring's upper entries (virtio-queue 0.18 `SplitQueueRing::end`
/// counts elements, not bytes).
const USED_RING_OFFSET: u64 = 0x8000;
const RX_BUFS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const TX_BUFS: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
/// Tx chains use two descriptors each.
const TX_SLOTS: u16 = QSIZE / 2;
const EV_BUFS: u64 = 0x180_0000;
/// Our guest's own receive window, unless a test says otherwise.
const GUEST_BUF_ALLOC: u32 = 1 << 20;

fn test_mem() -> GuestMemoryMmap {
    memory::create(32).unwrap()
}

/// The event-loop side of the device, as the transport would register it.
struct Subscriber(Arc<Mutex<Vsock>>);

impl MutEventSubscriber for Subscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.0.lock().unwrap().backend_event(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.lock().unwrap().init_backend(ops);
    }
}

/// A received packet.
#[derive(Debug, Clone)]
struct Rx {
    hdr: Header,
    data: Vec<u8>,
}

/// The guest driver plus the host side of the test.
struct T<'a> {
    mem: &'a GuestMemoryMmap,
    _dir: TempDir,
    uds: PathBuf,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager,
    rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    txq: MockSplitQueue<'a, GuestMemoryMmap>,
    evq: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_posted: u16,
    rx_seen: u16,
    tx_posted: u16,
    tx_seen: u16,
    ev_posted: u16,
    ev_seen: u16,
    /// Repost an rx buffer for every one the device used.
    auto_refill: bool,
    /// Received packets not yet looked at.
    inbox: std::collections::VecDeque<Rx>,
    interrupt: Arc<Interrupt>,
}

impl<'a> T<'a> {
    /// An activated device with 64 rx buffers posted.
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mut t = Self::inactive(mem);
        t.activate();
        t.post_rx(64);
        t
    }

    fn inactive(mem: &'a GuestMemoryMmap) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/snapvm-vsock").unwrap();
        let uds = dir.as_path().join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(Subscriber(dev.clone()))));
        Self {
            mem,
            _dir: dir,
            uds,
            dev,
            em,
            rxq: MockSplitQueue::create(mem, GuestAddress(RXQ_RING), QSIZE),
            txq: MockSplitQueue::create(mem, GuestAddress(TXQ_RING), QSIZE),
            evq: MockSplitQueue::create(mem, GuestAddress(EVQ_RING), QSIZE),
            rx_posted: 0,
            rx_seen: 0,
            tx_posted: 0,
            tx_seen: 0,
            ev_posted: 0,
            ev_seen: 0,
            auto_refill: true,
            inbox: Default::default(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        }
    }

    fn activate(&mut self) {
        let queues = [RXQ_RING, TXQ_RING, EVQ_RING]
            .into_iter()
            .zip([&self.rxq, &self.txq, &self.evq])
            .map(|(ring, mock)| {
                let mut q: Queue = mock.create_queue().unwrap();
                let used = ring + USED_RING_OFFSET;
                q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
                q
            })
            .collect();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        };
        self.dev.lock().unwrap().activate(ctx).unwrap();
    }

    fn host_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.host_path(port)).unwrap()
    }

    fn notify(&self, queue: usize) {
        self.dev.lock().unwrap().queue_notify(queue);
    }

    fn push_avail(q: &MockSplitQueue<'a, GuestMemoryMmap>, posted: &mut u16, head: u16) {
        q.avail()
            .ring()
            .ref_at(usize::from(*posted % QSIZE))
            .unwrap()
            .store(head);
        *posted = posted.wrapping_add(1);
        q.avail().idx().store(*posted);
    }

    /// Posts `n` rx buffers (one descriptor: header + 4 KiB) and notifies.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let slot = self.rx_posted % QSIZE;
            let desc = SplitDescriptor::new(
                RX_BUFS + u64::from(slot) * RX_SLOT,
                HEADER_SIZE as u32 + RX_PAYLOAD,
                VRING_DESC_F_WRITE as u16,
                0,
            );
            self.rxq
                .desc_table()
                .store(slot, RawDescriptor::from(desc))
                .unwrap();
            Self::push_avail(&self.rxq, &mut self.rx_posted, slot);
        }
        self.notify(RX_QUEUE);
    }

    /// Puts a raw descriptor chain on the tx queue (no notification).
    /// `descs`: (addr, len, flags); NEXT is filled in.
    fn push_tx_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let slot = self.tx_posted % TX_SLOTS;
        let first = slot * 2;
        assert!(descs.len() <= 2);
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT as u16, idx + 1)
            } else {
                (flags, 0)
            };
            let desc = SplitDescriptor::new(addr, len, flags, next);
            self.txq
                .desc_table()
                .store(idx, RawDescriptor::from(desc))
                .unwrap();
        }
        Self::push_avail(&self.txq, &mut self.tx_posted, first);
    }

    /// The tx slot's buffer address the next chain will use.
    fn tx_buf(&self) -> u64 {
        TX_BUFS + u64::from(self.tx_posted % TX_SLOTS) * TX_SLOT
    }

    /// Queues a packet (header descriptor + data descriptor) without notifying.
    fn queue_packet(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        let base = self.tx_buf();
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(base))
            .unwrap();
        if data.is_empty() {
            self.push_tx_chain(&[(base, HEADER_SIZE as u32, 0)]);
        } else {
            let data_addr = base + 0x100;
            self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
            self.push_tx_chain(&[
                (base, HEADER_SIZE as u32, 0),
                (data_addr, data.len() as u32, 0),
            ]);
        }
    }

    /// Sends a packet from the guest and lets the device process it.
    fn send(&mut self, hdr: Header, data: &[u8]) {
        self.queue_packet(hdr, data);
        self.notify(TX_QUEUE);
    }

    /// The used ring's idx of the queue whose rings start at `ring`.
    fn used_idx(&self, ring: u64) -> u16 {
        self.mem
            .read_obj(GuestAddress(ring + USED_RING_OFFSET + 2))
            .unwrap()
    }

    /// Used ring entry `i` (id, len).
    fn used_elem(&self, ring: u64, i: u16) -> (u32, u32) {
        let at = ring + USED_RING_OFFSET + 4 + 8 * u64::from(i % QSIZE);
        let id = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// Tx chains the device returned since the last call.
    fn tx_used(&mut self) -> usize {
        let idx = self.used_idx(TXQ_RING);
        let n = idx.wrapping_sub(self.tx_seen);
        self.tx_seen = idx;
        usize::from(n)
    }

    /// Packets received and not yet looked at.
    fn rx(&mut self) -> Vec<Rx> {
        let mut out: Vec<Rx> = self.inbox.drain(..).collect();
        out.extend(self.read_used_rx());
        out
    }

    /// Packets the device put on the rx queue since the last call.
    fn read_used_rx(&mut self) -> Vec<Rx> {
        let idx = self.used_idx(RXQ_RING);
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let (id, len) = self.used_elem(RXQ_RING, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BUFS + u64::from(id) * RX_SLOT;
            let mut b = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&b);
            assert!(len as usize >= HEADER_SIZE, "short rx packet");
            assert_eq!(len as usize, HEADER_SIZE + hdr.len as usize);
            assert!(hdr.len <= RX_PAYLOAD);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64))
                .unwrap();
            out.push(Rx { hdr, data });
        }
        if self.auto_refill && !out.is_empty() {
            self.post_rx(out.len());
        }
        out
    }

    /// Runs the event loop for a moment.
    fn pump(&mut self) {
        for _ in 0..20 {
            if self.em.run_with_timeout(5).unwrap() == 0 {
                break;
            }
        }
    }

    /// Pumps until `f` returns `Some`, collecting rx packets; panics after
    /// `secs` seconds.
    fn wait_for<R>(&mut self, secs: u64, mut f: impl FnMut(&mut Self, Vec<Rx>) -> Option<R>) -> R {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let pkts = self.rx();
            if let Some(r) = f(self, pkts) {
                return r;
            }
            assert!(Instant::now() < deadline, "timed out");
            self.pump();
        }
    }

    /// Waits for the next rx packet that is not a credit update.
    fn next_rx(&mut self) -> Rx {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            while let Some(p) = self.inbox.pop_front() {
                if p.hdr.op != OP_CREDIT_UPDATE {
                    return p;
                }
            }
            let new = self.read_used_rx();
            if new.is_empty() {
                assert!(Instant::now() < deadline, "timed out waiting for a packet");
                self.pump();
            }
            self.inbox.extend(new);
        }
    }

    /// Waits for the next rx packet of any kind.
    fn next_rx_any(&mut self) -> Rx {
        self.wait_for(5, |t, pkts| {
            t.inbox.extend(pkts);
            t.inbox.pop_front()
        })
    }

    /// Forgets the rings' contents, as a driver re-initialising after a
    /// device reset.
    fn reinit_rings(&mut self) {
        for (q, ring) in [
            (&self.rxq, RXQ_RING),
            (&self.txq, TXQ_RING),
            (&self.evq, EVQ_RING),
        ] {
            q.avail().idx().store(0);
            self.mem
                .write_obj(0u16, GuestAddress(ring + USED_RING_OFFSET + 2))
                .unwrap();
        }
        self.rx_posted = 0;
        self.rx_seen = 0;
        self.tx_posted = 0;
        self.tx_seen = 0;
        self.ev_posted = 0;
        self.ev_seen = 0;
        self.inbox.clear();
    }

    fn events(&mut self) -> Vec<u32> {
        let idx = self.used_idx(EVQ_RING);
        let mut out = Vec::new();
        while self.ev_seen != idx {
            let (slot, len) = self.used_elem(EVQ_RING, self.ev_seen);
            self.ev_seen = self.ev_seen.wrapping_add(1);
            assert_eq!(len, 4);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(EV_BUFS + u64::from(slot) * 0x100))
                .unwrap();
            out.push(id);
        }
        out
    }

    fn post_event_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let slot = self.ev_posted % QSIZE;
            let addr = EV_BUFS + u64::from(slot) * 0x100;
            self.mem
                .write_obj(0xffff_ffffu32, GuestAddress(addr))
                .unwrap();
            let desc = SplitDescriptor::new(addr, 4, VRING_DESC_F_WRITE as u16, 0);
            self.evq
                .desc_table()
                .store(slot, RawDescriptor::from(desc))
                .unwrap();
            Self::push_avail(&self.evq, &mut self.ev_posted, slot);
        }
    }

    fn conn_count(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }

    /// Guest connects from `guest_port` to host port `port` where a
    /// listener waits; returns the accepted host stream.
    fn guest_connect(&mut self, listener: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
        self.send(guest_hdr(OP_REQUEST, guest_port, port), &[]);
        let (host, _) = listener.accept().unwrap();
        let rsp = self.next_rx();
        assert_eq!(rsp.hdr.op, OP_RESPONSE, "{rsp:?}");
        assert_eq!((rsp.hdr.src_port, rsp.hdr.dst_port), (port, guest_port));
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host
    }
}

/// A guest packet header from the guest's CID to the host.
fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// Reads a host stream until EOF (with the stream's read timeout).
fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn new_rejects_reserved_cids() {
    let dir = TempDir::new_with_prefix("/tmp/snapvm-vsock").unwrap();
    let path = dir.as_path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = Vsock::new(cid, &path).err().expect("reserved CID accepted");
        assert!(matches!(err, VsockError::ReservedCid(c) if c == cid));
        assert!(err.to_string().contains("reserved"));
    }
    for cid in [3, MAX_GUEST_CID] {
        let dev = Vsock::new(cid, &path).unwrap();
        assert_eq!(dev.guest_cid(), cid);
    }
}

#[test]
fn listener_socket_lifecycle() {
    let dir = TempDir::new_with_prefix("/tmp/snapvm-vsock").unwrap();
    let path = dir.as_path().join("v.sock");
    // A stale socket file from a dead VMM is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(GUEST_CID, &path).unwrap();
    assert_eq!(dev.uds_path(), path);
    UnixStream::connect(&path).unwrap();
    drop(dev);
    assert!(!path.exists(), "socket file not removed on drop");
    // Anything else at the path is left alone.
    std::fs::write(&path, b"precious").unwrap();
    let err = Vsock::new(GUEST_CID, &path).err().unwrap();
    assert!(matches!(
        err,
        VsockError::Backend(MuxerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn device_identity_and_config() {
    let dir = TempDir::new_with_prefix("/tmp/snapvm-vsock").unwrap();
    let dev = Vsock::new(0x1234_5678, &dir.as_path().join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1);
    let mut b = [0xaau8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
    let mut hi = [0xaau8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut lo = [0u8; 4];
    dev.read_config(0, &mut lo);
    assert_eq!(u32::from_le_bytes(lo), 0x1234_5678);
    let mut past = [0xaau8; 4];
    dev.read_config(6, &mut past);
    assert_eq!(past, [0; 4]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn activation_checks_features_and_queues() {
    let mem = test_mem();
    let t = T::inactive(&mem);
    let mut dev = t.dev.lock().unwrap();
    let ctx = |features, n: usize| ActivateContext {
        mem: mem.clone(),
        queues: (0..n).map(|_| t.rxq.create_queue().unwrap()).collect(),
        interrupt: t.interrupt.clone(),
        acked_features: features,
    };
    assert!(matches!(
        dev.activate(ctx(0, 3)),
        Err(ActivateError::MissingFeatures(_))
    ));
    assert!(dev.activate(ctx(VIRTIO_F_VERSION_1, 2)).is_err());
    assert!(!dev.is_activated());
    dev.activate(ctx(VIRTIO_F_VERSION_1, 3)).unwrap();
    assert!(dev.is_activated());
    dev.reset();
    assert!(!dev.is_activated());
}

#[test]
fn guest_connects_and_data_flows_both_ways() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    t.send(guest_hdr(OP_REQUEST, 5000, 1234), &[]);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let rsp = t.next_rx();
    assert_eq!(rsp.hdr.op, OP_RESPONSE);
    assert_eq!(rsp.hdr.src_cid, HOST_CID);
    assert_eq!(rsp.hdr.dst_cid, GUEST_CID);
    assert_eq!((rsp.hdr.src_port, rsp.hdr.dst_port), (1234, 5000));
    assert_eq!(rsp.hdr.type_, TYPE_STREAM);
    assert_eq!(rsp.hdr.buf_alloc, CONN_BUF_ALLOC);
    assert_ne!(t.interrupt.status() & INT_USED_RING, 0);
    assert_eq!(t.conn_count(), 1);

    t.send(guest_hdr(OP_RW, 5000, 1234), b"hello from the guest");
    assert_eq!(read_exactly(&mut host, 20), b"hello from the guest");
    assert_eq!(t.tx_used(), 2);

    host.write_all(b"hello from the host").unwrap();
    let rw = t.next_rx();
    assert_eq!(rw.hdr.op, OP_RW);
    assert_eq!((rw.hdr.src_port, rw.hdr.dst_port), (1234, 5000));
    assert_eq!(rw.data, b"hello from the host");
    assert_eq!(rw.hdr.fwd_cnt, 20, "our fwd_cnt counts forwarded bytes");

    // A bigger transfer host → guest arrives complete and in order.
    let big = pattern(100_000, 7);
    host.write_all(&big).unwrap();
    let mut got = Vec::new();
    t.wait_for(5, |_, pkts| {
        for p in pkts {
            assert_eq!(p.hdr.op, OP_RW);
            got.extend_from_slice(&p.data);
        }
        (got.len() >= big.len()).then_some(())
    });
    assert_eq!(got, big);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    t.send(guest_hdr(OP_REQUEST, 5000, 4321), &[]);
    let rst = t.next_rx();
    assert_eq!(rst.hdr.op, OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (4321, 5000));
    assert_eq!((rst.hdr.src_cid, rst.hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(t.conn_count(), 0);
}

#[test]
fn host_connect_reaches_guest() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let mut host = UnixStream::connect(&t.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    let req = t.next_rx();
    assert_eq!(req.hdr.op, OP_REQUEST);
    assert_eq!((req.hdr.src_cid, req.hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.hdr.dst_port, 5000);
    assert_eq!(req.hdr.buf_alloc, CONN_BUF_ALLOC);
    let local = req.hdr.src_port;
    assert!(local >= 1024);

    // Data written before the guest accepted waits for the connection.
    host.write_all(b"early").unwrap();
    t.send(guest_hdr(OP_RESPONSE, 5000, local), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));
    let rw = t.next_rx();
    assert_eq!((rw.hdr.op, rw.data.as_slice()), (OP_RW, &b"early"[..]));

    t.send(guest_hdr(OP_RW, 5000, local), b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");

    // A second host connection to the same guest port gets its own port.
    let mut host2 = UnixStream::connect(&t.uds).unwrap();
    host2
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    host2.write_all(b"CONNECT 5000\n").unwrap();
    let req2 = t.next_rx();
    assert_eq!(req2.hdr.op, OP_REQUEST);
    assert_ne!(req2.hdr.src_port, local);
    // The guest refuses it: the host stream is closed.
    t.send(guest_hdr(OP_RST, 5000, req2.hdr.src_port), &[]);
    assert!(read_to_eof(&mut host2).is_empty());

    // The guest resets the first one: closed too.
    t.send(guest_hdr(OP_RST, 5000, local), &[]);
    assert!(read_to_eof(&mut host).is_empty());
    assert_eq!(t.conn_count(), 0);
}

#[test]
fn host_gives_up_before_the_guest_answers() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let mut host = UnixStream::connect(&t.uds).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let req = t.next_rx();
    assert_eq!(req.hdr.op, OP_REQUEST);
    drop(host);
    let rst = t.next_rx();
    assert_eq!(rst.hdr.op, OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (req.hdr.src_port, 77));
    assert_eq!(t.conn_count(), 0);
}

#[test]
fn guest_that_never_answers_times_out() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let mut host = UnixStream::connect(&t.uds).unwrap();
    host.write_all(b"CONNECT 78\n").unwrap();
    assert_eq!(t.next_rx().hdr.op, OP_REQUEST);
    let start = Instant::now();
    let rst = t.next_rx();
    assert_eq!(rst.hdr.op, OP_RST);
    assert!(start.elapsed() >= Duration::from_millis(1500));
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(read_to_eof(&mut host).is_empty());
}

#[test]
fn malformed_connect_lines_close_the_stream() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let bad: [&[u8]; 5] = [
        b"HELLO\n",
        b"CONNECT abc\n",
        b"CONNECT 4294967296\n",
        b"CONNECT\n",
        &[b'A'; 40],
    ];
    for line in bad {
        let mut host = UnixStream::connect(&t.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        host.write_all(line).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            t.pump();
            match host.read(&mut [0u8; 16]) {
                Ok(0) => break,
                Ok(_) => panic!("unexpected answer to {line:?}"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{e}"),
            }
            assert!(Instant::now() < deadline, "{line:?} not rejected");
        }
    }
    assert!(t.rx().is_empty());
    assert_eq!(t.conn_count(), 0);
}

#[test]
fn device_respects_guest_credit() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut req = guest_hdr(OP_REQUEST, 5000, 1234);
    req.buf_alloc = 8192;
    t.send(req, &[]);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(t.next_rx().hdr.op, OP_RESPONSE);

    let data = pattern(32 * 1024, 3);
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    let mut fwd_cnt = 0u32;
    let mut credit_requests = 0;
    while got.len() < data.len() {
        // Take everything the device sends within our credit.
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            t.pump();
            for p in t.rx() {
                match p.hdr.op {
                    OP_RW => got.extend_from_slice(&p.data),
                    OP_CREDIT_REQUEST => credit_requests += 1,
                    op => panic!("unexpected {}", op_name(op)),
                }
            }
            assert!(
                got.len() as u32 - fwd_cnt <= 8192,
                "device sent {} bytes with 8192 of credit",
                got.len() as u32 - fwd_cnt
            );
        }
        assert_eq!(got.len() as u32 - fwd_cnt, 8192, "window not filled");
        // The guest application read it all.
        fwd_cnt = got.len() as u32;
        let mut upd = guest_hdr(OP_CREDIT_UPDATE, 5000, 1234);
        upd.buf_alloc = 8192;
        upd.fwd_cnt = fwd_cnt;
        t.send(upd, &[]);
    }
    assert_eq!(got, data);
    assert!(credit_requests >= 1, "no CREDIT_REQUEST when starved");

    // CREDIT_REQUEST from the guest is answered with our counters.
    let mut creq = guest_hdr(OP_CREDIT_REQUEST, 5000, 1234);
    creq.buf_alloc = 8192;
    creq.fwd_cnt = fwd_cnt;
    t.send(creq, &[]);
    let upd = t.wait_for(5, |_, pkts| {
        pkts.into_iter().find(|p| p.hdr.op == OP_CREDIT_UPDATE)
    });
    assert_eq!(upd.hdr.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(upd.hdr.fwd_cnt, 0);
}

#[test]
fn guest_data_waits_for_a_slow_host_and_credit_is_returned() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut host = t.guest_connect(&listener, 5000, 1234);
    host.set_nonblocking(true).unwrap();

    // 5 x 64 KiB: more than the host socket takes, less than our credit
    // plus what the socket takes.
    let data = pattern(5 * 64 * 1024, 9);
    for chunk in data.chunks(64 * 1024) {
        t.send(guest_hdr(OP_RW, 5000, 1234), chunk);
    }
    assert_eq!(t.conn_count(), 1);
    assert!(t.rx().iter().all(|p| p.hdr.op != OP_RST));

    // The host reads slowly; the rest is flushed on EPOLLOUT, and the guest
    // hears about the space it gets back.
    let mut got = Vec::new();
    let mut updates = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() {
        let mut buf = [0u8; 16 * 1024];
        match host.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        t.pump();
        for p in t.rx() {
            assert_eq!(p.hdr.op, OP_CREDIT_UPDATE, "{p:?}");
            assert!(p.hdr.fwd_cnt as usize <= data.len());
            updates += 1;
        }
        assert!(Instant::now() < deadline, "stalled at {} bytes", got.len());
    }
    assert_eq!(got, data);
    assert!(updates >= 1, "no CREDIT_UPDATE while forwarding 320 KiB");
    t.send(guest_hdr(OP_CREDIT_REQUEST, 5000, 1234), &[]);
    let upd = t.next_rx_any();
    assert_eq!(upd.hdr.op, OP_CREDIT_UPDATE);
    assert_eq!(upd.hdr.fwd_cnt, data.len() as u32);
}

#[test]
fn guest_exceeding_our_credit_is_reset() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut host = t.guest_connect(&listener, 5000, 1234);
    // The host never reads; the guest ignores our credit.
    let chunk = pattern(64 * 1024, 1);
    let mut sent = 0;
    let rst = loop {
        t.send(guest_hdr(OP_RW, 5000, 1234), &chunk);
        sent += chunk.len();
        if let Some(p) = t.rx().into_iter().find(|p| p.hdr.op == OP_RST) {
            break p;
        }
        assert!(sent < 8 << 20, "never reset");
    };
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (1234, 5000));
    assert!(sent > CONN_BUF_ALLOC as usize);
    assert_eq!(t.conn_count(), 0);
    // The host sees what was forwarded, then EOF.
    let got = read_to_eof(&mut host);
    assert!(got.len() < sent);
}

#[test]
fn guest_shutdown_half_closes_then_closes() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut host = t.guest_connect(&listener, 5000, 1234);

    t.send(guest_hdr(OP_RW, 5000, 1234), b"last words");
    let mut sd = guest_hdr(OP_SHUTDOWN, 5000, 1234);
    sd.flags = SHUTDOWN_SEND;
    t.send(sd, &[]);
    // The host reads the data, then EOF; it may still write.
    assert_eq!(read_to_eof(&mut host), b"last words");
    host.write_all(b"reply").unwrap();
    let rw = t.next_rx();
    assert_eq!((rw.hdr.op, rw.data.as_slice()), (OP_RW, &b"reply"[..]));
    assert_eq!(t.conn_count(), 1);

    // Guest closes fully: we answer RST and close the host stream.
    sd.flags = SHUTDOWN_BOTH;
    t.send(sd, &[]);
    let rst = t.next_rx();
    assert_eq!(rst.hdr.op, OP_RST);
    assert_eq!(t.conn_count(), 0);
    host.set_nonblocking(true).unwrap();
    let mut failed = false;
    for _ in 0..100 {
        if host.write(&[0u8; 1024]).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "host stream still open");
}

#[test]
fn host_half_close_and_close_become_guest_shutdowns() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut host = t.guest_connect(&listener, 5000, 1234);

    host.write_all(b"bye").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    let rw = t.next_rx();
    assert_eq!((rw.hdr.op, rw.data.as_slice()), (OP_RW, &b"bye"[..]));
    let sd = t.next_rx();
    assert_eq!(sd.hdr.op, OP_SHUTDOWN);
    assert_eq!(sd.hdr.flags, SHUTDOWN_SEND);
    // Half-closed: the guest can still send.
    t.send(guest_hdr(OP_RW, 5000, 1234), b"still here");
    assert_eq!(read_exactly(&mut host, 10), b"still here");

    // The host closes entirely: the guest hears both directions are done.
    drop(host);
    let sd = t.next_rx();
    assert_eq!(sd.hdr.op, OP_SHUTDOWN);
    assert_eq!(sd.hdr.flags & SHUTDOWN_BOTH, SHUTDOWN_BOTH);
    assert_eq!(t.conn_count(), 1);
    // The guest acknowledges with RST.
    t.send(guest_hdr(OP_RST, 5000, 1234), &[]);
    assert_eq!(t.conn_count(), 0);
    t.pump();
    assert!(t.rx().is_empty(), "no RST answers an RST");
}

#[test]
fn host_close_without_guest_ack_times_out_with_rst() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let host = t.guest_connect(&listener, 5000, 1234);
    drop(host);
    let sd = t.next_rx();
    assert_eq!(sd.hdr.op, OP_SHUTDOWN);
    assert_eq!(sd.hdr.flags, SHUTDOWN_BOTH);
    let start = Instant::now();
    // Data the guest sent before it saw the SHUTDOWN is dropped quietly.
    t.send(guest_hdr(OP_RW, 5000, 1234), b"too late");
    assert!(t.rx().is_empty());
    assert_eq!(t.conn_count(), 1);
    let rst = t.next_rx();
    assert_eq!(rst.hdr.op, OP_RST);
    assert!(start.elapsed() >= Duration::from_millis(1500));
    assert_eq!(t.conn_count(), 0);
}

#[test]
fn transport_reset_posts_event_and_drops_connections() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut host = t.guest_connect(&listener, 5000, 1234);
    let _host2 = t.guest_connect(&listener, 5001, 1234);
    assert_eq!(t.conn_count(), 2);

    // No event buffer yet: the event waits for one.
    t.dev.lock().unwrap().send_transport_reset();
    assert_eq!(t.conn_count(), 0);
    assert!(read_to_eof(&mut host).is_empty());
    assert!(t.events().is_empty());
    t.post_event_buffers(2);
    t.notify(EVENT_QUEUE);
    assert_eq!(t.events(), vec![EVENT_TRANSPORT_RESET]);

    // With a buffer available it is posted at once, once.
    let _host3 = t.guest_connect(&listener, 5002, 1234);
    t.dev.lock().unwrap().send_transport_reset();
    assert_eq!(t.events(), vec![EVENT_TRANSPORT_RESET]);
    t.notify(EVENT_QUEUE);
    assert!(t.events().is_empty());
    assert_eq!(t.conn_count(), 0);

    // Packets for the old connections are answered with RST.
    t.send(guest_hdr(OP_RW, 5000, 1234), b"stale");
    assert_eq!(t.next_rx().hdr.op, OP_RST);
}

#[test]
fn transport_reset_right_after_activation() {
    let mem = test_mem();
    let mut t = T::inactive(&mem);
    t.post_event_buffers(1);
    t.activate();
    t.dev.lock().unwrap().send_transport_reset();
    assert_eq!(t.events(), vec![EVENT_TRANSPORT_RESET]);
    // Before activation it is kept until the driver is ready.
    let mem2 = test_mem();
    let mut t2 = T::inactive(&mem2);
    t2.dev.lock().unwrap().send_transport_reset();
    t2.post_event_buffers(1);
    t2.activate();
    t2.notify(EVENT_QUEUE);
    assert_eq!(t2.events(), vec![EVENT_TRANSPORT_RESET]);
}

fn expect_rst(t: &mut T<'_>, src_port: u32, dst_port: u32) {
    let p = t.next_rx();
    assert_eq!(p.hdr.op, OP_RST, "{p:?}");
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (src_port, dst_port));
}

#[test]
fn malformed_packets_are_reset_without_harm() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut host = t.guest_connect(&listener, 5000, 1234);

    // Unknown op on a live connection: reset, host stream closed.
    let mut bad = guest_hdr(42, 5000, 1234);
    t.send(bad, &[]);
    expect_rst(&mut t, 1234, 5000);
    assert!(read_to_eof(&mut host).is_empty());
    assert_eq!(t.conn_count(), 0);

    // OP_INVALID, seqpacket type, wrong source CID, unknown connection.
    bad.op = OP_INVALID;
    t.send(bad, &[]);
    expect_rst(&mut t, 1234, 5000);
    let mut seq = guest_hdr(OP_REQUEST, 5001, 1234);
    seq.type_ = 2;
    t.send(seq, &[]);
    expect_rst(&mut t, 1234, 5001);
    let mut spoof = guest_hdr(OP_REQUEST, 5002, 1234);
    spoof.src_cid = 99;
    t.send(spoof, &[]);
    expect_rst(&mut t, 1234, 5002);
    t.send(guest_hdr(OP_RW, 5003, 1234), b"who?");
    expect_rst(&mut t, 1234, 5003);
    // Another CID: the RST comes from that CID so the guest socket matches.
    let mut other = guest_hdr(OP_REQUEST, 5004, 80);
    other.dst_cid = 7;
    t.send(other, &[]);
    let p = t.next_rx();
    assert_eq!((p.hdr.op, p.hdr.src_cid, p.hdr.src_port), (OP_RST, 7, 80));
    // RST for an unknown connection: silence.
    t.send(guest_hdr(OP_RST, 5005, 1234), &[]);
    assert!(t.rx().is_empty());
    assert_eq!(t.conn_count(), 0);

    // len larger than the buffer: header says 1000, one descriptor of 54.
    let mut hdr = guest_hdr(OP_RW, 5006, 1234);
    hdr.len = 1000;
    let base = t.tx_buf();
    mem.write_slice(&hdr.to_bytes(), GuestAddress(base))
        .unwrap();
    t.push_tx_chain(&[(base, HEADER_SIZE as u32 + 10, 0)]);
    t.notify(TX_QUEUE);
    expect_rst(&mut t, 1234, 5006);
    // len larger than the data descriptor.
    hdr.src_port = 5007;
    let base = t.tx_buf();
    mem.write_slice(&hdr.to_bytes(), GuestAddress(base))
        .unwrap();
    t.push_tx_chain(&[(base, HEADER_SIZE as u32, 0), (base + 0x100, 10, 0)]);
    t.notify(TX_QUEUE);
    expect_rst(&mut t, 1234, 5007);
    // len beyond the protocol maximum.
    hdr.src_port = 5008;
    hdr.len = MAX_PKT_DATA + 1;
    let base = t.tx_buf();
    mem.write_slice(&hdr.to_bytes(), GuestAddress(base))
        .unwrap();
    t.push_tx_chain(&[
        (base, HEADER_SIZE as u32, 0),
        (base + 0x100, 0x10000 + 1, 0),
    ]);
    t.notify(TX_QUEUE);
    expect_rst(&mut t, 1234, 5008);

    // Unreadable chains are consumed and dropped: a short header, a
    // write-only header, a header outside guest memory, a data
    // descriptor outside guest memory.
    t.tx_used();
    let base = t.tx_buf();
    t.push_tx_chain(&[(base, HEADER_SIZE as u32 - 1, 0)]);
    t.push_tx_chain(&[(base, HEADER_SIZE as u32, VRING_DESC_F_WRITE as u16)]);
    t.push_tx_chain(&[(u64::MAX - 8, HEADER_SIZE as u32, 0)]);
    t.push_tx_chain(&[(0x1_0000_0000_0000, HEADER_SIZE as u32, 0)]);
    let mut h = guest_hdr(OP_RW, 5009, 1234);
    h.len = 16;
    let base = t.tx_buf();
    mem.write_slice(&h.to_bytes(), GuestAddress(base)).unwrap();
    t.push_tx_chain(&[(base, HEADER_SIZE as u32, 0), (u64::MAX - 4, 16, 0)]);
    t.notify(TX_QUEUE);
    assert_eq!(t.tx_used(), 5);
    // The last one had a readable header: its sender is reset.
    expect_rst(&mut t, 1234, 5009);
    assert!(t.rx().is_empty());

    // The device still works.
    let _host = t.guest_connect(&listener, 6000, 1234);
    assert!(!t.interrupt.needs_reset());
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    t.auto_refill = false;
    // Drain the good buffers first: 64 RSTs.
    for port in 0..64 {
        t.send(guest_hdr(OP_REQUEST, 7000 + port, 1), &[]);
    }
    assert_eq!(t.rx().len(), 64);
    // A read-only rx buffer and a too-short one, then a good one.
    for (len, flags) in [(HEADER_SIZE as u32 + 16, 0), (8, VRING_DESC_F_WRITE as u16)] {
        let slot = t.rx_posted % QSIZE;
        let desc = SplitDescriptor::new(RX_BUFS + u64::from(slot) * RX_SLOT, len, flags, 0);
        t.rxq
            .desc_table()
            .store(slot, RawDescriptor::from(desc))
            .unwrap();
        T::push_avail(&t.rxq, &mut t.rx_posted, slot);
    }
    t.send(guest_hdr(OP_REQUEST, 8000, 1), &[]);
    t.post_rx(1);
    assert_eq!(t.used_idx(RXQ_RING), 67);
    let lens: Vec<u32> = (64..67).map(|i| t.used_elem(RXQ_RING, i).1).collect();
    assert_eq!(lens, vec![0, 0, HEADER_SIZE as u32]);
}

#[test]
fn many_connections_at_once() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let n = 32u32;
    let mut hosts = Vec::new();
    for i in 0..n {
        t.send(guest_hdr(OP_REQUEST, 6000 + i, 1234), &[]);
        let (h, _) = listener.accept().unwrap();
        h.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        hosts.push(h);
    }
    let rsps = t.wait_for(5, |_, p| (!p.is_empty()).then_some(p));
    assert_eq!(rsps.len(), n as usize);
    assert!(rsps.iter().all(|p| p.hdr.op == OP_RESPONSE));
    assert_eq!(t.conn_count(), n as usize);
    for i in 0..n {
        t.send(
            guest_hdr(OP_RW, 6000 + i, 1234),
            format!("msg {i:02}").as_bytes(),
        );
    }
    // Accept order matches request order.
    for (i, h) in hosts.iter_mut().enumerate() {
        assert_eq!(read_exactly(h, 6), format!("msg {i:02}").as_bytes());
        h.write_all(format!("re {i:02}").as_bytes()).unwrap();
    }
    let mut replies = std::collections::HashMap::new();
    t.wait_for(5, |_, pkts| {
        for p in pkts {
            assert_eq!(p.hdr.op, OP_RW);
            replies.insert(p.hdr.dst_port, p.data);
        }
        (replies.len() == n as usize).then_some(())
    });
    for i in 0..n {
        assert_eq!(replies[&(6000 + i)], format!("re {i:02}").as_bytes());
    }
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    t.dev.lock().unwrap().set_max_connections(4);
    let listener = t.listen(1234);
    for i in 0..5 {
        t.send(guest_hdr(OP_REQUEST, 6000 + i, 1234), &[]);
    }
    let pkts = t.wait_for(5, |_, p| (p.len() >= 5).then_some(p));
    let ops: Vec<u16> = pkts.iter().map(|p| p.hdr.op).collect();
    assert_eq!(
        ops,
        [OP_RESPONSE, OP_RESPONSE, OP_RESPONSE, OP_RESPONSE, OP_RST]
    );
    assert_eq!(t.conn_count(), 4);
    // A host client beyond the limit is closed.
    let mut host = UnixStream::connect(&t.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    host.set_nonblocking(true).unwrap();
    loop {
        t.pump();
        match host.read(&mut [0u8; 8]) {
            Ok(0) => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline);
    }
    drop(listener);
}

#[test]
fn request_flood_is_throttled_not_dropped() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    t.auto_refill = false;
    // Use up the posted rx buffers.
    for i in 0..64 {
        t.send(guest_hdr(OP_REQUEST, 10_000 + i, 1), &[]);
    }
    assert_eq!(t.rx().len(), 64);
    assert_eq!(t.tx_used(), 64);
    // 300 more requests with no rx buffers: the device takes what it can
    // answer later and leaves the rest on the tx queue.
    for batch in 0..3 {
        for i in 0..100 {
            t.queue_packet(guest_hdr(OP_REQUEST, 20_000 + batch * 100 + i, 1), &[]);
        }
        t.notify(TX_QUEUE);
    }
    let taken = t.tx_used();
    assert!((200..300).contains(&taken), "took {taken}");
    // As the guest offers buffers, every request gets its RST.
    let mut rsts = 0;
    let mut rounds = 0;
    let mut seen = std::collections::HashSet::new();
    while rsts < 300 {
        rounds += 1;
        assert!(rounds <= 5, "only {rsts} RSTs");
        t.post_rx(64);
        let pkts = t.rx();
        assert!(pkts.iter().all(|p| p.hdr.op == OP_RST));
        rsts += pkts.len();
        seen.extend(pkts.iter().map(|p| p.hdr.dst_port));
    }
    assert_eq!(rsts, 300);
    assert!((20_000..20_300).all(|p| seen.contains(&p)));
    assert_eq!(taken + t.tx_used(), 300);
}

#[test]
fn device_reset_drops_connections_and_queues() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    let listener = t.listen(1234);
    let mut host = t.guest_connect(&listener, 5000, 1234);
    t.dev.lock().unwrap().reset();
    assert_eq!(t.conn_count(), 0);
    assert!(read_to_eof(&mut host).is_empty());
    // Host clients are still accepted while the driver is away; their
    // REQUEST goes out after the next activation.
    let mut client = UnixStream::connect(&t.uds).unwrap();
    client.write_all(b"CONNECT 5000\n").unwrap();
    t.pump();
    assert_eq!(t.conn_count(), 1);
    t.reinit_rings();
    t.activate();
    t.post_rx(4);
    let req = t.next_rx();
    assert_eq!((req.hdr.op, req.hdr.dst_port), (OP_REQUEST, 5000));
}

#[test]
fn idle_connections_do_not_spin_the_event_loop() {
    let mem = test_mem();
    let mut t = T::new(&mem);
    t.auto_refill = false;
    let listener = t.listen(1234);
    let mut req = guest_hdr(OP_REQUEST, 5000, 1234);
    req.buf_alloc = 4096;
    t.send(req, &[]);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(t.next_rx().hdr.op, OP_RESPONSE);

    // No credit left: the host socket stays readable but is not polled.
    host.write_all(&[1u8; 10_000]).unwrap();
    let pkts = t.wait_for(5, |_, p| (p.len() >= 2).then_some(p));
    assert_eq!((pkts[0].hdr.op, pkts[0].data.len()), (OP_RW, 4096));
    assert_eq!(pkts[1].hdr.op, OP_CREDIT_REQUEST);
    t.pump();
    assert_eq!(
        t.em.run_with_timeout(50).unwrap(),
        0,
        "spinning without credit"
    );

    // Credit but no rx buffers: the same.
    let mut upd = guest_hdr(OP_CREDIT_UPDATE, 5000, 1234);
    upd.buf_alloc = 1 << 20;
    upd.fwd_cnt = 4096;
    // Use up the remaining rx buffers with RSTs first.
    let free = 64 - 2 - 1;
    for i in 0..free {
        t.send(guest_hdr(OP_REQUEST, 9000 + i, 1), &[]);
    }
    assert_eq!(t.rx().len(), free as usize);
    t.send(upd, &[]);
    t.pump();
    assert_eq!(
        t.em.run_with_timeout(50).unwrap(),
        0,
        "spinning without rx buffers"
    );
    // Buffers arrive: the data flows again.
    t.post_rx(8);
    let mut got = 0;
    t.wait_for(5, |_, pkts| {
        got += pkts.iter().map(|p| p.data.len()).sum::<usize>();
        (got >= 10_000 - 4096).then_some(())
    });
}
