//! virtio-vsock driver: stream sockets with credit-based flow control.
//!
//! Queues: rx (0), tx (1), event (2). Every packet is a 44-byte header
//! descriptor, plus a data descriptor for payload (rx buffers always have
//! one). Each connection has a receive ring (its size is the `buf_alloc`
//! we advertise; `fwd_cnt` counts what the application consumed) and a
//! transmit ring drained as far as the peer's credit allows.
//!
//! The driver is polled: `poll` takes completed buffers and packets,
//! `flush` sends what is pending. Both return whether they did anything.

use crate::mem;
use crate::virtio::{Buf, Device, VirtQueue};

pub const HOST_CID: u64 = 2;
pub const HDR_LEN: usize = 44;
pub const HDR_STRIDE: usize = 64;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUT_RCV: u32 = 1;
pub const SHUT_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

const RX_BUFS: usize = 64;
const RX_BUF_SIZE: usize = 16 << 10;
const TX_SLOTS: usize = 64;
pub const TX_BUF_SIZE: usize = 16 << 10;
const EVENT_BUFS: usize = 4;

/// Connection slots: slot 0 is for the one connection we initiate (the
/// agent), the others for connections the host opens to our listeners.
pub const MAX_CONNS: usize = 40;
const OUTBOUND_RING: usize = 256 << 10;
const INBOUND_RING: usize = 64 << 10;
const MAX_LISTENERS: usize = 8;
const RST_QUEUE: usize = 32;

/// Local ports whose packets the driver leaves to `hostile=` cases: it
/// counts them in `raw_seen` and never answers them itself.
pub const RAW_PORTS: core::ops::Range<u32> = 40000..50000;

#[derive(Clone, Copy, Default)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    fn read(p: *const u8) -> Hdr {
        // SAFETY: p points at a HDR_LEN-byte header buffer we own; the
        // fields are little-endian and may be unaligned.
        unsafe {
            let u64_at = |o: usize| u64::from_le(core::ptr::read_unaligned(p.add(o) as *const u64));
            let u32_at = |o: usize| u32::from_le(core::ptr::read_unaligned(p.add(o) as *const u32));
            let u16_at = |o: usize| u16::from_le(core::ptr::read_unaligned(p.add(o) as *const u16));
            Hdr {
                src_cid: u64_at(0),
                dst_cid: u64_at(8),
                src_port: u32_at(16),
                dst_port: u32_at(20),
                len: u32_at(24),
                kind: u16_at(28),
                op: u16_at(30),
                flags: u32_at(32),
                buf_alloc: u32_at(36),
                fwd_cnt: u32_at(40),
            }
        }
    }

    fn write(&self, p: *mut u8) {
        // SAFETY: p points at a HDR_LEN-byte header buffer we own.
        unsafe {
            core::ptr::write_unaligned(p as *mut u64, self.src_cid.to_le());
            core::ptr::write_unaligned(p.add(8) as *mut u64, self.dst_cid.to_le());
            core::ptr::write_unaligned(p.add(16) as *mut u32, self.src_port.to_le());
            core::ptr::write_unaligned(p.add(20) as *mut u32, self.dst_port.to_le());
            core::ptr::write_unaligned(p.add(24) as *mut u32, self.len.to_le());
            core::ptr::write_unaligned(p.add(28) as *mut u16, self.kind.to_le());
            core::ptr::write_unaligned(p.add(30) as *mut u16, self.op.to_le());
            core::ptr::write_unaligned(p.add(32) as *mut u32, self.flags.to_le());
            core::ptr::write_unaligned(p.add(36) as *mut u32, self.buf_alloc.to_le());
            core::ptr::write_unaligned(p.add(40) as *mut u32, self.fwd_cnt.to_le());
        }
    }
}

/// A byte ring over memory from the bump allocator.
pub struct Ring {
    buf: *mut u8,
    cap: usize,
    head: usize,
    pub len: usize,
}

impl Ring {
    const fn none() -> Ring {
        Ring { buf: core::ptr::null_mut(), cap: 0, head: 0, len: 0 }
    }

    fn alloc(cap: usize) -> Ring {
        Ring { buf: mem::alloc(cap, 4096).as_mut_ptr(), cap, head: 0, len: 0 }
    }

    pub fn free(&self) -> usize {
        self.cap - self.len
    }

    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// Appends as much of `data` as fits; returns how much.
    fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free());
        let tail = (self.head + self.len) % self.cap.max(1);
        let first = n.min(self.cap - tail);
        // SAFETY: [tail, tail+first) and [0, n-first) are inside the ring's
        // buffer and hold no unread bytes (n <= free space).
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.buf.add(tail), first);
            core::ptr::copy_nonoverlapping(data.as_ptr().add(first), self.buf, n - first);
        }
        self.len += n;
        n
    }

    /// Moves up to `out.len()` bytes out; returns how many.
    fn pop(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        let first = n.min(self.cap - self.head);
        // SAFETY: [head, head+first) and [0, n-first) hold unread bytes.
        unsafe {
            core::ptr::copy_nonoverlapping(self.buf.add(self.head), out.as_mut_ptr(), first);
            core::ptr::copy_nonoverlapping(self.buf, out.as_mut_ptr().add(first), n - first);
        }
        self.consume(n);
        n
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.head = (self.head + n) % self.cap.max(1);
        self.len -= n;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Free,
    /// REQUEST sent (or to be sent), waiting for RESPONSE.
    Connecting,
    Connected,
    /// Our SHUTDOWN is out; waiting for the peer's RST.
    Closing,
}

pub struct Conn {
    pub state: State,
    /// Bumped whenever the slot is (re)used, so holders notice a reset.
    pub gen: u32,
    /// Application tag (which listener accepted it, or the agent).
    pub kind: u8,
    /// Application scratch (e.g. a byte count).
    pub user: u64,
    pub local_port: u32,
    pub peer_cid: u64,
    pub peer_port: u32,
    /// SHUT_* flags the peer sent.
    pub peer_shut: u32,
    pub rx: Ring,
    pub tx: Ring,
    fwd_cnt: u32,
    rx_cnt: u32,
    last_fwd_sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    credit_requested: bool,
    need_rst: bool,
    want_shutdown: bool,
}

impl Conn {
    const fn new() -> Conn {
        Conn {
            state: State::Free,
            gen: 0,
            kind: 0,
            user: 0,
            local_port: 0,
            peer_cid: 0,
            peer_port: 0,
            peer_shut: 0,
            rx: Ring::none(),
            tx: Ring::none(),
            fwd_cnt: 0,
            rx_cnt: 0,
            last_fwd_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            credit_requested: false,
            need_rst: false,
            want_shutdown: false,
        }
    }

    fn open(&mut self, ring: usize, kind: u8, local_port: u32, peer_cid: u64, peer_port: u32) {
        if self.rx.cap == 0 {
            self.rx = Ring::alloc(ring);
            self.tx = Ring::alloc(ring);
        }
        self.rx.clear();
        self.tx.clear();
        self.gen = self.gen.wrapping_add(1);
        self.kind = kind;
        self.user = 0;
        self.local_port = local_port;
        self.peer_cid = peer_cid;
        self.peer_port = peer_port;
        self.peer_shut = 0;
        self.fwd_cnt = 0;
        self.rx_cnt = 0;
        self.last_fwd_sent = 0;
        self.peer_buf_alloc = 0;
        self.peer_fwd_cnt = 0;
        self.tx_cnt = 0;
        self.need_request = false;
        self.need_response = false;
        self.need_credit_update = false;
        self.credit_requested = false;
        self.need_rst = false;
        self.want_shutdown = false;
    }

    /// Bytes the peer may still send us before our ring is full.
    fn peer_credit(&self) -> u32 {
        (self.peer_buf_alloc).wrapping_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// After the application consumed data: tell the peer about the space
    /// when its view of our free space dropped below half the ring.
    fn consumed(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        let cap = self.rx.cap as u32;
        let peer_view_used = self.rx_cnt.wrapping_sub(self.last_fwd_sent);
        if self.fwd_cnt != self.last_fwd_sent && cap.saturating_sub(peer_view_used) < cap / 2 {
            self.need_credit_update = true;
        }
    }

    /// Whether this connection may still send.
    pub fn can_send(&self) -> bool {
        self.state == State::Connected && self.peer_shut & SHUT_RCV == 0 && !self.want_shutdown
    }
}

pub struct Vsock {
    dev: Device,
    rxq: VirtQueue,
    txq: VirtQueue,
    evq: VirtQueue,
    pub cid: u64,
    rx_hdrs: *mut u8,
    rx_data: *mut u8,
    rx_of_head: [u8; 1024],
    tx_hdrs: *mut u8,
    tx_data: *mut u8,
    tx_free: [u8; TX_SLOTS],
    tx_nfree: usize,
    tx_of_head: [u8; 1024],
    ev_bufs: *mut u8,
    ev_of_head: [u8; 1024],
    pub conns: [Conn; MAX_CONNS],
    listeners: [(u32, u8); MAX_LISTENERS],
    nlisteners: usize,
    rsts: [(u64, u32, u32); RST_QUEUE],
    nrsts: usize,
    next_port: u32,
    /// TRANSPORT_RESET events seen.
    pub resets: u32,
    /// Packets received for [`RAW_PORTS`], by op (index 0: unknown ops).
    pub raw_seen: [u32; 8],
    /// The last packet received for [`RAW_PORTS`].
    pub raw_last: Hdr,
}

impl Vsock {
    pub fn new(mut dev: Device) -> Result<Vsock, &'static str> {
        dev.init(0)?;
        let rxq = dev.setup_queue(0, (2 * RX_BUFS) as u16)?;
        let txq = dev.setup_queue(1, (2 * TX_SLOTS) as u16)?;
        let evq = dev.setup_queue(2, EVENT_BUFS as u16)?;
        let mut v = Vsock {
            cid: dev.config_u64(0),
            dev,
            rxq,
            txq,
            evq,
            rx_hdrs: mem::alloc(RX_BUFS * HDR_STRIDE, 4096).as_mut_ptr(),
            rx_data: mem::alloc(RX_BUFS * RX_BUF_SIZE, 4096).as_mut_ptr(),
            rx_of_head: [0; 1024],
            tx_hdrs: mem::alloc(TX_SLOTS * HDR_STRIDE, 4096).as_mut_ptr(),
            tx_data: mem::alloc(TX_SLOTS * TX_BUF_SIZE, 4096).as_mut_ptr(),
            tx_free: [0; TX_SLOTS],
            tx_nfree: 0,
            tx_of_head: [0; 1024],
            ev_bufs: mem::alloc_zeroed(EVENT_BUFS * 8, 64).as_mut_ptr(),
            ev_of_head: [0; 1024],
            conns: [const { Conn::new() }; MAX_CONNS],
            listeners: [(0, 0); MAX_LISTENERS],
            nlisteners: 0,
            rsts: [(0, 0, 0); RST_QUEUE],
            nrsts: 0,
            next_port: 1024,
            resets: 0,
            raw_seen: [0; 8],
            raw_last: Hdr::default(),
        };
        for (i, slot) in v.tx_free.iter_mut().enumerate() {
            *slot = i as u8;
        }
        v.tx_nfree = TX_SLOTS.min(usize::from(v.txq.size()) / 2);
        let nrx = RX_BUFS.min(usize::from(v.rxq.size()) / 2);
        for i in 0..nrx {
            v.post_rx(i);
        }
        for i in 0..EVENT_BUFS.min(usize::from(v.evq.size())) {
            v.post_event(i);
        }
        v.dev.driver_ok();
        v.rxq.notify();
        v.evq.notify();
        Ok(v)
    }

    fn post_rx(&mut self, i: usize) {
        // SAFETY: i < RX_BUFS; both areas were sized for RX_BUFS buffers.
        let (h, d) = unsafe { (self.rx_hdrs.add(i * HDR_STRIDE), self.rx_data.add(i * RX_BUF_SIZE)) };
        if let Some(head) = self.rxq.add(&[Buf::inp(h, HDR_LEN), Buf::inp(d, RX_BUF_SIZE)]) {
            self.rx_of_head[usize::from(head)] = i as u8;
        }
    }

    fn post_event(&mut self, i: usize) {
        // SAFETY: i < EVENT_BUFS; the area holds EVENT_BUFS 8-byte slots.
        let p = unsafe { self.ev_bufs.add(i * 8) };
        if let Some(head) = self.evq.add(&[Buf::inp(p, 4)]) {
            self.ev_of_head[usize::from(head)] = i as u8;
        }
    }

    /// `hostile=` cases: sends header `h` as given, from a header
    /// descriptor of `hdr_len` bytes (at most HDR_STRIDE), followed by
    /// `data` when given (any address and length; `Buf::out` of the slot
    /// buffer from `slot_data` for real bytes). False when no tx slot is
    /// free: poll and retry.
    pub fn send_raw(&mut self, h: &Hdr, hdr_len: usize, data: Option<Buf>) -> bool {
        let Some(s) = self.take_tx_slot() else { return false };
        // SAFETY: s < TX_SLOTS; the slot's header area is HDR_STRIDE bytes.
        let hp = unsafe { self.tx_hdrs.add(s * HDR_STRIDE) };
        h.write(hp);
        let hdr = Buf::out(hp, hdr_len.min(HDR_STRIDE));
        let head = match data {
            Some(d) => self.txq.add(&[hdr, d]),
            None => self.txq.add(&[hdr]),
        };
        match head {
            Some(head) => {
                self.tx_of_head[usize::from(head)] = s as u8;
                self.txq.notify();
                true
            }
            None => {
                self.tx_free[self.tx_nfree] = s as u8;
                self.tx_nfree += 1;
                false
            }
        }
    }

    /// A buffer of `len` (at most TX_BUF_SIZE) bytes of `byte` for
    /// `send_raw`, in memory only the hostile cases use.
    pub fn raw_data(len: usize, byte: u8) -> Buf {
        use core::sync::atomic::{AtomicPtr, Ordering};
        static BUF: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
        let mut p = BUF.load(Ordering::Relaxed);
        if p.is_null() {
            p = mem::alloc(TX_BUF_SIZE, 4096).as_mut_ptr();
            BUF.store(p, Ordering::Relaxed);
        }
        let n = len.min(TX_BUF_SIZE);
        // SAFETY: p holds TX_BUF_SIZE bytes.
        unsafe { core::ptr::write_bytes(p, byte, n) };
        Buf::out(p, n)
    }

    pub fn listen(&mut self, port: u32, kind: u8) {
        if self.nlisteners < MAX_LISTENERS {
            self.listeners[self.nlisteners] = (port, kind);
            self.nlisteners += 1;
        }
    }

    /// Starts a connection to the host from slot 0; returns its generation.
    pub fn connect(&mut self, port: u32, kind: u8) -> u32 {
        self.cid = self.dev.config_u64(0);
        let local = self.next_port;
        self.next_port = if self.next_port >= 0x7fff_ffff { 1024 } else { self.next_port + 1 };
        let c = &mut self.conns[0];
        c.open(OUTBOUND_RING, kind, local, HOST_CID, port);
        c.state = State::Connecting;
        c.need_request = true;
        c.gen
    }

    /// Moves up to `out.len()` received bytes of connection `slot` out.
    pub fn read(&mut self, slot: usize, out: &mut [u8]) -> usize {
        let c = &mut self.conns[slot];
        let n = c.rx.pop(out);
        if n > 0 {
            c.consumed(n);
        }
        n
    }

    /// Drops up to `n` received bytes; returns how many.
    pub fn discard(&mut self, slot: usize, n: usize) -> usize {
        let c = &mut self.conns[slot];
        let n = n.min(c.rx.len);
        c.rx.consume(n);
        if n > 0 {
            c.consumed(n);
        }
        n
    }

    /// Queues bytes for sending; returns how many fit.
    pub fn write(&mut self, slot: usize, data: &[u8]) -> usize {
        let c = &mut self.conns[slot];
        if !c.can_send() {
            return 0;
        }
        c.tx.push(data)
    }

    /// Half-closes both ways once everything queued is sent.
    pub fn shutdown(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if c.state == State::Connected {
            c.want_shutdown = true;
        }
    }

    /// Whether everything queued for sending has been sent and the device
    /// has given every transmit buffer back.
    pub fn tx_idle(&self) -> bool {
        self.tx_nfree == TX_SLOTS && self.nrsts == 0 && self.conns.iter().all(|c| c.tx.len == 0)
    }

    /// Takes used buffers and handles incoming packets and events.
    pub fn poll(&mut self) -> bool {
        let mut progress = self.dev.ack_interrupt() != 0;
        while let Some((head, _)) = self.txq.pop_used() {
            let slot = self.tx_of_head[usize::from(head)];
            self.tx_free[self.tx_nfree] = slot;
            self.tx_nfree += 1;
            progress = true;
        }
        // Events first: after a transport reset, packets must be judged
        // against the new state.
        let mut reposted = false;
        while let Some((head, len)) = self.evq.pop_used() {
            let i = usize::from(self.ev_of_head[usize::from(head)]);
            // SAFETY: i < EVENT_BUFS, the slot is 8 bytes.
            let id = unsafe { core::ptr::read_unaligned(self.ev_bufs.add(i * 8) as *const u32) };
            if len >= 4 && u32::from_le(id) == EVENT_TRANSPORT_RESET {
                self.transport_reset();
            }
            self.post_event(i);
            reposted = true;
            progress = true;
        }
        if reposted {
            self.evq.notify();
        }
        let mut reposted = false;
        while let Some((head, len)) = self.rxq.pop_used() {
            let i = usize::from(self.rx_of_head[usize::from(head)]);
            // SAFETY: i < RX_BUFS; header and data buffers of that index.
            let (h, d) = unsafe { (self.rx_hdrs.add(i * HDR_STRIDE), self.rx_data.add(i * RX_BUF_SIZE)) };
            if len as usize >= HDR_LEN {
                let hdr = Hdr::read(h);
                let n = (hdr.len as usize).min(len as usize - HDR_LEN).min(RX_BUF_SIZE);
                // SAFETY: the device wrote n <= RX_BUF_SIZE bytes there and
                // gave the buffer back (it is in the used ring).
                let data = unsafe { core::slice::from_raw_parts(d, n) };
                self.packet(&hdr, data);
            }
            self.post_rx(i);
            reposted = true;
            progress = true;
        }
        if reposted {
            self.rxq.notify();
        }
        progress
    }

    fn transport_reset(&mut self) {
        self.resets = self.resets.wrapping_add(1);
        for c in self.conns.iter_mut() {
            c.state = State::Free;
        }
        self.nrsts = 0;
        self.cid = self.dev.config_u64(0);
    }

    fn queue_rst(&mut self, peer_cid: u64, peer_port: u32, local_port: u32) {
        if self.nrsts < RST_QUEUE {
            self.rsts[self.nrsts] = (peer_cid, peer_port, local_port);
            self.nrsts += 1;
        }
    }

    fn packet(&mut self, h: &Hdr, data: &[u8]) {
        if RAW_PORTS.contains(&h.dst_port) {
            let op = usize::from(h.op);
            self.raw_seen[if op < 8 { op } else { 0 }] += 1;
            self.raw_last = *h;
            return;
        }
        if h.kind != TYPE_STREAM {
            if h.op != OP_RST {
                self.queue_rst(h.src_cid, h.src_port, h.dst_port);
            }
            return;
        }
        let found = self.conns.iter().position(|c| {
            c.state != State::Free && c.local_port == h.dst_port && c.peer_port == h.src_port && c.peer_cid == h.src_cid
        });
        let Some(slot) = found else {
            if h.op == OP_REQUEST {
                self.accept(h);
            } else if h.op != OP_RST {
                self.queue_rst(h.src_cid, h.src_port, h.dst_port);
            }
            return;
        };
        let c = &mut self.conns[slot];
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        match h.op {
            OP_RESPONSE => {
                if c.state == State::Connecting {
                    c.state = State::Connected;
                } else {
                    c.need_rst = true;
                }
            }
            // Never more than our credit allows; a peer that overruns it
            // loses the excess.
            OP_RW if c.state == State::Connected || c.state == State::Closing => {
                let n = c.rx.push(data);
                c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.need_credit_update = true,
            OP_SHUTDOWN => {
                c.peer_shut |= h.flags & (SHUT_RCV | SHUT_SEND);
                if c.state == State::Closing && c.peer_shut == SHUT_RCV | SHUT_SEND {
                    c.need_rst = true;
                }
            }
            OP_RST => c.state = State::Free,
            _ => {}
        }
    }

    fn accept(&mut self, h: &Hdr) {
        let Some(&(_, kind)) = self.listeners[..self.nlisteners].iter().find(|l| l.0 == h.dst_port) else {
            self.queue_rst(h.src_cid, h.src_port, h.dst_port);
            return;
        };
        // A free slot, else one that is only waiting for the peer's RST.
        let slot = (1..MAX_CONNS)
            .find(|&i| self.conns[i].state == State::Free)
            .or_else(|| (1..MAX_CONNS).find(|&i| self.conns[i].state == State::Closing));
        let Some(slot) = slot else {
            self.queue_rst(h.src_cid, h.src_port, h.dst_port);
            return;
        };
        let c = &mut self.conns[slot];
        c.open(INBOUND_RING, kind, h.dst_port, h.src_cid, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.state = State::Connected;
        c.need_response = true;
    }

    fn take_tx_slot(&mut self) -> Option<usize> {
        if self.tx_nfree == 0 || self.txq.num_free() < 2 {
            return None;
        }
        self.tx_nfree -= 1;
        Some(usize::from(self.tx_free[self.tx_nfree]))
    }

    /// Sends one packet from tx slot `s` (header + `len` bytes already in
    /// the slot's data buffer).
    fn send(&mut self, s: usize, h: &Hdr) {
        // SAFETY: s < TX_SLOTS; header and data areas of that slot.
        let (hp, dp) = unsafe { (self.tx_hdrs.add(s * HDR_STRIDE), self.tx_data.add(s * TX_BUF_SIZE)) };
        h.write(hp);
        let head = if h.len > 0 {
            self.txq.add(&[Buf::out(hp, HDR_LEN), Buf::out(dp, h.len as usize)])
        } else {
            self.txq.add(&[Buf::out(hp, HDR_LEN)])
        };
        match head {
            Some(head) => self.tx_of_head[usize::from(head)] = s as u8,
            None => {
                // Cannot happen: take_tx_slot checked for 2 descriptors.
                self.tx_free[self.tx_nfree] = s as u8;
                self.tx_nfree += 1;
            }
        }
    }

    /// A control or data packet for connection `slot`; false if no tx slot.
    fn send_conn(&mut self, slot: usize, op: u16, flags: u32, payload: usize) -> bool {
        let Some(s) = self.take_tx_slot() else { return false };
        let cid = self.cid;
        let c = &mut self.conns[slot];
        if payload > 0 {
            // SAFETY: s < TX_SLOTS; payload <= TX_BUF_SIZE (caller).
            let out = unsafe { core::slice::from_raw_parts_mut(self.tx_data.add(s * TX_BUF_SIZE), payload) };
            c.tx.pop(out);
            c.tx_cnt = c.tx_cnt.wrapping_add(payload as u32);
        }
        let h = Hdr {
            src_cid: cid,
            dst_cid: c.peer_cid,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len: payload as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: c.rx.cap as u32,
            fwd_cnt: c.fwd_cnt,
        };
        c.last_fwd_sent = c.fwd_cnt;
        c.need_credit_update = false;
        self.send(s, &h);
        true
    }

    /// Sends whatever is pending, as far as tx slots and credit allow.
    pub fn flush(&mut self) -> bool {
        let mut sent = false;
        while self.nrsts > 0 {
            let Some(s) = self.take_tx_slot() else { break };
            self.nrsts -= 1;
            let (peer_cid, peer_port, local_port) = self.rsts[self.nrsts];
            let h = Hdr {
                src_cid: self.cid,
                dst_cid: peer_cid,
                src_port: local_port,
                dst_port: peer_port,
                kind: TYPE_STREAM,
                op: OP_RST,
                ..Hdr::default()
            };
            self.send(s, &h);
            sent = true;
        }
        for slot in 0..MAX_CONNS {
            sent |= self.flush_conn(slot);
        }
        if sent {
            self.txq.notify();
        }
        sent
    }

    fn flush_conn(&mut self, slot: usize) -> bool {
        let mut sent = false;
        let c = &self.conns[slot];
        if c.state == State::Free {
            return false;
        }
        if c.need_rst {
            if self.send_conn(slot, OP_RST, 0, 0) {
                self.conns[slot].state = State::Free;
                return true;
            }
            return false;
        }
        if c.need_request {
            if !self.send_conn(slot, OP_REQUEST, 0, 0) {
                return false;
            }
            self.conns[slot].need_request = false;
            sent = true;
        }
        if self.conns[slot].need_response {
            if !self.send_conn(slot, OP_RESPONSE, 0, 0) {
                return sent;
            }
            self.conns[slot].need_response = false;
            sent = true;
        }
        loop {
            let c = &self.conns[slot];
            if c.state != State::Connected || c.tx.len == 0 {
                break;
            }
            let credit = c.peer_credit() as usize;
            if credit == 0 {
                if !c.credit_requested && self.send_conn(slot, OP_CREDIT_REQUEST, 0, 0) {
                    self.conns[slot].credit_requested = true;
                    sent = true;
                }
                break;
            }
            let n = c.tx.len.min(credit).min(TX_BUF_SIZE);
            if !self.send_conn(slot, OP_RW, 0, n) {
                break;
            }
            sent = true;
        }
        let c = &self.conns[slot];
        if c.need_credit_update && c.state != State::Connecting && self.send_conn(slot, OP_CREDIT_UPDATE, 0, 0) {
            sent = true;
        }
        let c = &self.conns[slot];
        if c.want_shutdown && c.tx.len == 0 && c.state == State::Connected
            && self.send_conn(slot, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND, 0)
        {
            let c = &mut self.conns[slot];
            c.state = State::Closing;
            if c.peer_shut == SHUT_RCV | SHUT_SEND {
                c.need_rst = true;
            }
            sent = true;
        }
        sent
    }
}
