//! The committed seed corpora (`fuzz/corpus/<target>/`), as code: each
//! seed is a small, meaningful input in the target's format — a real
//! request, a connection that moves data, a driver bring-up — from which
//! the fuzzer mutates its way into the odd corners. Regenerate with
//!
//! ```text
//! cargo test --manifest-path fuzz/Cargo.toml --lib -- --ignored write_seeds
//! ```

use std::path::Path;

use snapvm::vmm::devices::virtio::mmio::regs;
use vm_memory::{Bytes, GuestAddress};

use crate::{
    bring_up, deliver_notifications, empty_memory, transport, write_reg, Kind, QueueSetup,
    GUEST_CID, HOST_PORT,
};

// Split-ring descriptor flags.
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// A guest-memory image under construction.
#[derive(Default)]
pub struct Image(Vec<u8>);

impl Image {
    pub fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let a = addr as usize;
        if self.0.len() < a + bytes.len() {
            self.0.resize(a + bytes.len(), 0);
        }
        self.0[a..a + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// Descriptor `i` of the table at `table`.
    pub fn desc(
        &mut self,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &d)
    }

    /// An available ring holding `heads`, with index `idx`.
    pub fn avail(&mut self, ring: u64, idx: u16, heads: &[u16]) -> &mut Self {
        self.put(ring + 2, &idx.to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            self.put(ring + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        self
    }

    /// The `u16` length and the bytes, as every target reads its image.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = (self.0.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(&self.0);
        v
    }
}

/// A control stream under construction.
#[derive(Default)]
pub struct Stream(pub Vec<u8>);

impl Stream {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A guest store op's arguments: addr, len, bytes.
    pub fn store(&mut self, addr: u32, b: &[u8]) -> &mut Self {
        self.u32(addr).u8(b.len() as u8).bytes(b)
    }
}

fn seed(image: &Image, stream: &Stream) -> Vec<u8> {
    let mut v = image.encode();
    v.extend_from_slice(&stream.0);
    v
}

// ---- block_chain ---------------------------------------------------------

const Q: u16 = 16;
const BLK_DESC: u64 = 0x000;
const BLK_AVAIL: u64 = 0x100;
const BLK_USED: u64 = 0x140;

fn blk_header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Control header of block_chain: flags, queue size and rings.
fn blk_stream(flags: u8) -> Stream {
    let mut s = Stream::default();
    s.u8(flags)
        .u16(Q)
        .u64(BLK_DESC)
        .u64(BLK_AVAIL)
        .u64(BLK_USED);
    s
}

/// header, data, status at descriptors `first..first+3`, header at `hdr`.
fn blk_request(
    img: &mut Image,
    first: u16,
    hdr: u64,
    req: [u8; 16],
    data: (u64, u32, u16),
    status: u64,
) {
    img.put(hdr, &req);
    img.desc(BLK_DESC, first, hdr, 16, NEXT, first + 1)
        .desc(
            BLK_DESC,
            first + 1,
            data.0,
            data.1,
            data.2 | NEXT,
            first + 2,
        )
        .desc(BLK_DESC, first + 2, status, 1, WRITE, 0);
}

pub fn block_chain() -> Vec<Seed> {
    let mut out = Vec::new();
    // One read of sector 1 into 512 bytes.
    let mut img = Image::default();
    blk_request(
        &mut img,
        0,
        0x200,
        blk_header(0, 1),
        (0x400, 512, WRITE),
        0x300,
    );
    img.avail(BLK_AVAIL, 1, &[0]);
    out.push(("read", seed(&img, &blk_stream(2 << 1))));

    // Read, GET_ID, FLUSH, OUT and an unknown type in one batch.
    let mut img = Image::default();
    blk_request(
        &mut img,
        0,
        0x200,
        blk_header(0, 0),
        (0x400, 1024, WRITE),
        0x300,
    );
    blk_request(
        &mut img,
        3,
        0x210,
        blk_header(8, 0),
        (0x800, 20, WRITE),
        0x301,
    );
    img.put(0x220, &blk_header(4, 0))
        .desc(BLK_DESC, 6, 0x220, 16, NEXT, 7)
        .desc(BLK_DESC, 7, 0x302, 1, WRITE, 0);
    blk_request(&mut img, 8, 0x230, blk_header(1, 0), (0x400, 512, 0), 0x303);
    blk_request(
        &mut img,
        11,
        0x240,
        blk_header(99, 0),
        (0x400, 512, WRITE),
        0x304,
    );
    img.avail(BLK_AVAIL, 5, &[0, 3, 6, 8, 11]);
    out.push(("mixed", seed(&img, &blk_stream(2 << 1))));

    // The same read through an indirect table, and one nested table.
    let mut img = Image::default();
    img.put(0x200, &blk_header(0, 2))
        .desc(BLK_DESC, 0, 0x600, 48, INDIRECT, 0)
        .desc(0x600, 0, 0x200, 16, NEXT, 1)
        .desc(0x600, 1, 0x800, 512, WRITE | NEXT, 2)
        .desc(0x600, 2, 0x300, 1, WRITE, 0)
        .desc(BLK_DESC, 1, 0x680, 32, INDIRECT, 0)
        .desc(0x680, 0, 0x200, 16, NEXT, 1)
        .desc(0x680, 1, 0x600, 48, INDIRECT, 0)
        .avail(BLK_AVAIL, 2, &[0, 1]);
    out.push(("indirect", seed(&img, &blk_stream(2 << 1))));

    // A loop, a chain through every descriptor, a head past the queue.
    let mut img = Image::default();
    img.put(0x200, &blk_header(0, 0))
        .desc(BLK_DESC, 0, 0x200, 16, NEXT, 1)
        .desc(BLK_DESC, 1, 0x400, 512, WRITE | NEXT, 0);
    for i in 2..Q {
        img.desc(BLK_DESC, i, 0x400, 512, WRITE | NEXT, (i + 1) % Q);
    }
    img.avail(BLK_AVAIL, 3, &[0, 2, 200]);
    out.push(("loops", seed(&img, &blk_stream(1 << 1))));

    // EVENT_IDX, then the guest adds a second request and kicks.
    let mut img = Image::default();
    blk_request(
        &mut img,
        0,
        0x200,
        blk_header(0, 1),
        (0x400, 512, WRITE),
        0x300,
    );
    blk_request(
        &mut img,
        3,
        0x210,
        blk_header(0, 100),
        (0x600, 4096, WRITE),
        0x301,
    );
    img.avail(BLK_AVAIL, 1, &[0]);
    let mut s = blk_stream(1 | (3 << 1));
    s.store((BLK_AVAIL + 6) as u32, &3u16.to_le_bytes())
        .store((BLK_AVAIL + 2) as u32, &2u16.to_le_bytes());
    out.push(("event_idx", seed(&img, &s)));

    // Buffers at the end of RAM, in the hole and in the second region;
    // an available index far past the queue size.
    let mut img = Image::default();
    blk_request(
        &mut img,
        0,
        0x200,
        blk_header(0, 0),
        (0xff00, 512, WRITE),
        0x300,
    );
    blk_request(
        &mut img,
        3,
        0x210,
        blk_header(0, 0),
        (0x1_1000, 512, WRITE),
        0x1_1ff0,
    );
    // A header in the hole between the RAM regions.
    img.desc(BLK_DESC, 6, 0x1_0800, 16, NEXT, 7)
        .desc(BLK_DESC, 7, 0x400, 512, WRITE | NEXT, 8)
        .desc(BLK_DESC, 8, 0x301, 1, WRITE, 0);
    img.avail(BLK_AVAIL, 3, &[0, 3, 6]);
    let mut s = blk_stream(2 << 1);
    s.store((BLK_AVAIL + 2) as u32, &300u16.to_le_bytes());
    out.push(("edges", seed(&img, &s)));
    out
}

// ---- vsock_packets -------------------------------------------------------

const VQ: [(u64, u64, u64); 3] = [
    (0x000, 0x100, 0x140),
    (0x400, 0x500, 0x540),
    (0x800, 0x900, 0x940),
];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

#[allow(clippy::too_many_arguments)]
pub fn vsock_header(
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> [u8; 44] {
    let mut b = [0u8; 44];
    b[0..8].copy_from_slice(&src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&src_port.to_le_bytes());
    b[20..24].copy_from_slice(&dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&len.to_le_bytes());
    b[28..30].copy_from_slice(&type_.to_le_bytes());
    b[30..32].copy_from_slice(&op.to_le_bytes());
    b[32..36].copy_from_slice(&flags.to_le_bytes());
    b[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
    b
}

/// A guest stream packet to the host.
fn to_host(src_port: u32, dst_port: u32, op: u16, len: u32, flags: u32) -> [u8; 44] {
    vsock_header(
        GUEST_CID,
        2,
        src_port,
        dst_port,
        len,
        1,
        op,
        flags,
        64 << 10,
        0,
    )
}

/// The vsock layout: four rx buffers and two event buffers posted.
fn vsock_image() -> Image {
    let mut img = Image::default();
    let (rx_desc, rx_avail, _) = VQ[RXQ];
    for i in 0..4u16 {
        img.desc(
            rx_desc,
            2 * i,
            0x1000 + 0x40 * u64::from(i),
            44,
            WRITE | NEXT,
            2 * i + 1,
        )
        .desc(
            rx_desc,
            2 * i + 1,
            0x2000 + 0x400 * u64::from(i),
            0x400,
            WRITE,
            0,
        );
    }
    img.avail(rx_avail, 4, &[0, 2, 4, 6]);
    let (ev_desc, ev_avail, _) = VQ[EVQ];
    img.desc(ev_desc, 0, 0xc00, 4, WRITE, 0)
        .desc(ev_desc, 1, 0xc08, 4, WRITE, 0)
        .avail(ev_avail, 2, &[0, 1]);
    img
}

/// Tx packet `k`: header at 0x1400 + 0x40 k, data (if any) at 0x1800 +
/// 0x80 k, descriptors 2k and 2k + 1.
fn tx_packet(img: &mut Image, k: u16, hdr: [u8; 44], data: &[u8]) {
    let (desc, _, _) = VQ[TXQ];
    let h = 0x1400 + 0x40 * u64::from(k);
    let d = 0x1800 + 0x80 * u64::from(k);
    img.put(h, &hdr);
    if data.is_empty() {
        img.desc(desc, 2 * k, h, 44, 0, 0);
    } else {
        img.put(d, data)
            .desc(desc, 2 * k, h, 44, NEXT, 2 * k + 1)
            .desc(desc, 2 * k + 1, d, data.len() as u32, 0, 0);
    }
}

fn vsock_stream(flags: u8) -> Stream {
    let mut s = Stream::default();
    s.u8(flags);
    for (desc, avail, used) in VQ {
        s.u16(Q).u64(desc).u64(avail).u64(used);
    }
    s
}

// Operation bytes of vsock_packets.
const NOTIFY_RX: u8 = 0;
const NOTIFY_TX: u8 = 1;
const NOTIFY_EV: u8 = 2;
const STORE: u8 = 3;
const HOST_WRITE: u8 = 4;
const HOST_CLOSE: u8 = 5;
const HOST_CONNECT: u8 = 6;
const BACKEND: u8 = 7;
const TRANSPORT_RESET: u8 = 8;
const DEVICE_RESET: u8 = 9;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

pub fn vsock_packets() -> Vec<Seed> {
    let mut out = Vec::new();
    let tx_idx = (VQ[TXQ].1 + 2) as u32;

    // Connect to the host listener, exchange data both ways, shut down.
    let mut img = vsock_image();
    tx_packet(&mut img, 0, to_host(5000, HOST_PORT, OP_REQUEST, 0, 0), &[]);
    tx_packet(&mut img, 1, to_host(5000, HOST_PORT, OP_RW, 5, 0), b"hello");
    tx_packet(
        &mut img,
        2,
        to_host(5000, HOST_PORT, OP_CREDIT_REQUEST, 0, 0),
        &[],
    );
    tx_packet(
        &mut img,
        3,
        to_host(5000, HOST_PORT, OP_SHUTDOWN, 0, 3),
        &[],
    );
    img.avail(VQ[TXQ].1, 1, &[0, 2, 4, 6]);
    let mut s = vsock_stream(0);
    s.u8(NOTIFY_TX)
        .u8(HOST_WRITE)
        .u8(5)
        .bytes(b"world")
        .u8(BACKEND)
        .u8(NOTIFY_RX)
        .u8(STORE)
        .store(tx_idx, &3u16.to_le_bytes())
        .u8(NOTIFY_TX)
        .u8(BACKEND)
        .u8(NOTIFY_RX)
        .u8(HOST_CLOSE)
        .u8(1)
        .u8(BACKEND)
        .u8(NOTIFY_RX)
        .u8(STORE)
        .store(tx_idx, &4u16.to_le_bytes())
        .u8(NOTIFY_TX)
        .u8(NOTIFY_RX);
    out.push(("stream", seed(&img, &s)));

    // Packets that must be answered with RST or dropped.
    let mut img = vsock_image();
    let bad = [
        to_host(5001, 9999, OP_REQUEST, 0, 0),
        to_host(5002, HOST_PORT, 99, 0, 0),
        vsock_header(GUEST_CID, 2, 5003, HOST_PORT, 0, 3, OP_REQUEST, 0, 0, 0),
        vsock_header(7, 2, 5004, HOST_PORT, 0, 1, OP_REQUEST, 0, 0, 0),
        vsock_header(GUEST_CID, 1, 5005, HOST_PORT, 0, 1, OP_REQUEST, 0, 0, 0),
        to_host(5006, HOST_PORT, OP_RW, 100, 0),
        to_host(5007, HOST_PORT, OP_RESPONSE, 0, 0),
        to_host(5008, HOST_PORT, OP_CREDIT_UPDATE, 0, 0),
    ];
    for (k, h) in bad.iter().enumerate() {
        let data: &[u8] = if k == 5 { b"short data" } else { &[] };
        tx_packet(&mut img, k as u16, *h, data);
    }
    img.avail(VQ[TXQ].1, 8, &[0, 2, 4, 6, 8, 10, 12, 14]);
    let mut s = vsock_stream(0);
    s.u8(NOTIFY_TX).u8(NOTIFY_RX).u8(NOTIFY_RX).u8(NOTIFY_TX);
    out.push(("bad_packets", seed(&img, &s)));

    // A host client connects to guest port 5000; the guest accepts.
    let mut img = vsock_image();
    tx_packet(&mut img, 0, to_host(5000, 1024, OP_RESPONSE, 0, 0), &[]);
    tx_packet(&mut img, 1, to_host(5000, 1024, OP_RW, 3, 0), b"abc");
    tx_packet(&mut img, 2, to_host(5000, 1024, OP_RST, 0, 0), &[]);
    img.avail(VQ[TXQ].1, 0, &[0, 2, 4]);
    let mut s = vsock_stream(0);
    s.u8(HOST_CONNECT)
        .u8(13)
        .bytes(b"CONNECT 5000\n")
        .u8(BACKEND)
        .u8(BACKEND)
        .u8(NOTIFY_RX)
        .u8(STORE)
        .store(tx_idx, &2u16.to_le_bytes())
        .u8(NOTIFY_TX)
        .u8(BACKEND)
        .u8(STORE)
        .store(tx_idx, &3u16.to_le_bytes())
        .u8(NOTIFY_TX)
        .u8(NOTIFY_RX);
    out.push(("host_connect", seed(&img, &s)));

    // Many connection requests at once, with room for two connections.
    let mut img = vsock_image();
    let heads: Vec<u16> = (0..8u16).map(|k| 2 * k).collect();
    for k in 0..8u16 {
        tx_packet(
            &mut img,
            k,
            to_host(6000 + u32::from(k), HOST_PORT, OP_REQUEST, 0, 0),
            &[],
        );
    }
    img.avail(VQ[TXQ].1, 8, &heads);
    let mut s = vsock_stream(1);
    s.u8(NOTIFY_TX).u8(NOTIFY_RX).u8(BACKEND).u8(NOTIFY_RX);
    out.push(("flood", seed(&img, &s)));

    // More data than the connection's credit: eight 60 KiB packets
    // (all reading the same guest buffer) to a host that does not read.
    let mut img = vsock_image();
    let (desc, avail, _) = VQ[TXQ];
    tx_packet(&mut img, 0, to_host(5000, HOST_PORT, OP_REQUEST, 0, 0), &[]);
    let mut heads = vec![0u16];
    for k in 1..8u16 {
        let h = 0x1400 + 0x40 * u64::from(k);
        img.put(h, &to_host(5000, HOST_PORT, OP_RW, 60 << 10, 0))
            .desc(desc, 2 * k, h, 44, NEXT, 2 * k + 1)
            .desc(desc, 2 * k + 1, 0x1000, 60 << 10, 0, 0);
        heads.push(2 * k);
    }
    img.avail(avail, 8, &heads);
    let mut s = vsock_stream(0);
    s.u8(NOTIFY_TX).u8(NOTIFY_RX).u8(BACKEND).u8(NOTIFY_RX);
    out.push(("credit", seed(&img, &s)));

    // Transport reset with a connection up, then a device reset.
    let mut img = vsock_image();
    tx_packet(&mut img, 0, to_host(5000, HOST_PORT, OP_REQUEST, 0, 0), &[]);
    img.avail(VQ[TXQ].1, 1, &[0]);
    let mut s = vsock_stream(0);
    s.u8(NOTIFY_TX)
        .u8(TRANSPORT_RESET)
        .u8(NOTIFY_EV)
        .u8(NOTIFY_RX)
        .u8(DEVICE_RESET)
        .u8(NOTIFY_TX)
        .u8(NOTIFY_RX);
    out.push(("resets", seed(&img, &s)));
    out
}

// ---- mmio_registers ------------------------------------------------------

const W32: u8 = 0;
const R32: u8 = 1;
const WSIZED: u8 = 2;
const BRING_UP: u8 = 4;
const ROUND_TRIP: u8 = 6;
const RESET: u8 = 7;

fn bring_up_op(s: &mut Stream, queues: &[(u16, u32, u32, u32)]) {
    s.u8(BRING_UP).u8(queues.len() as u8);
    for &(size, d, a, u) in queues {
        s.u16(size).u32(d).u32(a).u32(u);
    }
}

pub fn mmio_registers() -> Vec<Seed> {
    let mut out = Vec::new();
    let w = |s: &mut Stream, off: u64, v: u32| {
        s.u8(W32).u16(off as u16).u32(v);
    };

    // Block: bring-up, a read request, notification, reads, reset.
    let mut img = Image::default();
    blk_request(
        &mut img,
        0,
        0x200,
        blk_header(0, 1),
        (0x400, 512, WRITE),
        0x300,
    );
    img.avail(BLK_AVAIL, 1, &[0]);
    let mut s = Stream::default();
    s.u8(0);
    bring_up_op(
        &mut s,
        &[(16, BLK_DESC as u32, BLK_AVAIL as u32, BLK_USED as u32)],
    );
    w(&mut s, regs::QUEUE_NOTIFY, 0);
    for off in [
        regs::INTERRUPT_STATUS,
        regs::STATUS,
        regs::CONFIG,
        regs::CONFIG_GENERATION,
    ] {
        s.u8(R32).u16(off as u16);
    }
    w(&mut s, regs::INTERRUPT_ACK, 1);
    s.u8(ROUND_TRIP).u8(RESET);
    out.push(("block_bring_up", seed(&img, &s)));

    // Vsock: bring-up, snapshot round trip, notifications.
    let img = vsock_image();
    let mut s = Stream::default();
    s.u8(1);
    let qs: Vec<_> = VQ
        .iter()
        .map(|&(d, a, u)| (16u16, d as u32, a as u32, u as u32))
        .collect();
    bring_up_op(&mut s, &qs);
    s.u8(ROUND_TRIP);
    w(&mut s, regs::QUEUE_NOTIFY, 1);
    w(&mut s, regs::QUEUE_NOTIFY, 0);
    s.u8(ROUND_TRIP).u8(RESET);
    out.push(("vsock_bring_up", seed(&img, &s)));

    // A driver doing everything by hand, out of order and at odd offsets.
    let mut s = Stream::default();
    s.u8(0);
    for (off, v) in [
        (regs::STATUS, 4),
        (regs::STATUS, 1),
        (regs::STATUS, 3),
        (regs::DRIVER_FEATURES_SEL, 1),
        (regs::DRIVER_FEATURES, 1),
        (regs::DRIVER_FEATURES_SEL, 0),
        (regs::DRIVER_FEATURES, 1 << 29),
        (regs::STATUS, 11),
        (regs::QUEUE_SEL, 9),
        (regs::QUEUE_READY, 1),
        (regs::QUEUE_SEL, 0),
        (regs::QUEUE_NUM, 6),
        (regs::QUEUE_DESC_HIGH, 1),
        (regs::QUEUE_READY, 1),
        (regs::STATUS, 15),
        (0x0e0, 7),
        (regs::CONFIG + 0x40, 7),
        (regs::STATUS, 0),
    ] {
        w(&mut s, off, v);
    }
    s.u8(WSIZED).u16(regs::STATUS as u16).u8(0).u8(1);
    s.u8(WSIZED)
        .u16(regs::QUEUE_NOTIFY as u16)
        .u8(3)
        .bytes(&[0, 0, 0, 0, 0, 0, 0, 0]);
    out.push(("by_hand", seed(&Image::default(), &s)));

    // Rings outside RAM: DEVICE_NEEDS_RESET, then a reset and a good bring-up.
    let mut img = Image::default();
    blk_request(
        &mut img,
        0,
        0x200,
        blk_header(0, 1),
        (0x400, 512, WRITE),
        0x300,
    );
    img.avail(BLK_AVAIL, 1, &[0]);
    let mut s = Stream::default();
    s.u8(0);
    bring_up_op(&mut s, &[(16, 0x2_0000, BLK_AVAIL as u32, BLK_USED as u32)]);
    s.u8(R32).u16(regs::STATUS as u16).u8(ROUND_TRIP).u8(RESET);
    bring_up_op(
        &mut s,
        &[(16, BLK_DESC as u32, BLK_AVAIL as u32, BLK_USED as u32)],
    );
    out.push(("needs_reset", seed(&img, &s)));
    out
}

// ---- snapshot_state ------------------------------------------------------

pub fn snapshot_state() -> Vec<Seed> {
    let mut out = Vec::new();
    // Mode byte 2: a TransportState (see the target).
    let json = |t: &snapvm::vmm::devices::virtio::mmio::MmioTransport| {
        let mut v = vec![2u8];
        v.extend(serde_json::to_vec_pretty(&t.save_state()).expect("serialize"));
        v
    };
    for (name, kind) in [("block", Kind::Block), ("vsock", Kind::Vsock)] {
        let mem = empty_memory();
        let mut t = transport(&mem, kind, 0);
        out.push((leak(format!("{name}_fresh")), json(&t)));
        let queues: Vec<QueueSetup> = VQ
            .iter()
            .take(if kind == Kind::Block { 1 } else { 3 })
            .map(|&(desc, avail, used)| QueueSetup {
                size: Q,
                desc,
                avail,
                used,
            })
            .collect();
        // A running device that served a request.
        let img = if kind == Kind::Block {
            let mut img = Image::default();
            blk_request(
                &mut img,
                0,
                0x200,
                blk_header(0, 1),
                (0x400, 512, WRITE),
                0x300,
            );
            img.avail(BLK_AVAIL, 1, &[0]);
            img
        } else {
            vsock_image()
        };
        mem.write_slice(&img.0, GuestAddress(0))
            .expect("image fits");
        bring_up(&mut t, &queues);
        deliver_notifications(&t);
        out.push((leak(format!("{name}_running")), json(&t)));
        // A device that reported DEVICE_NEEDS_RESET.
        write_reg(&mut t, regs::STATUS, 0);
        let mut bad = queues.clone();
        bad[0].used = 0x2_0000;
        bring_up(&mut t, &bad);
        out.push((leak(format!("{name}_needs_reset")), json(&t)));
    }
    // Mode byte 3: a hibernated layer's state value (its memory table
    // over one lower layer; the target writes 64 KiB of memory).
    let layer = serde_json::json!({
        "memory": {
            "regions": [{"guest_addr": 0, "size": 1 << 20, "file_offset": 0}],
            "layers": [
                {"dir": "/layers/0", "state_checksum": "0123456789abcdef", "ranges": [[0, 65536]]},
                {"dir": ".", "state_checksum": null, "ranges": [[4096, 8192], [32768, 4096]]}
            ]
        },
        "vcpus": []
    });
    let mut v = vec![3u8];
    v.extend(serde_json::to_vec(&layer).expect("serialize"));
    out.push(("hibernated_layer", v));
    // Mode byte 4: the same layer as a stream (state length, state file,
    // then the pages of its own ranges).
    let sealed = snapvm::snapshot::format::seal_value(snapvm::snapshot::format::VERSION, &layer)
        .expect("seal");
    let mut v = vec![4u8];
    v.extend((sealed.len() as u64).to_le_bytes());
    v.extend(sealed);
    v.extend(std::iter::repeat_n(0x5au8, 3 * 4096));
    out.push(("received_layer", v));
    out
}

// ---- deployment ----------------------------------------------------------

pub fn deployment() -> Vec<Seed> {
    let with = |mode: u8, body: &str| {
        let mut v = vec![mode];
        v.extend_from_slice(body.as_bytes());
        v
    };
    vec![
        (
            "faas_cli_deploy",
            with(
                0,
                r#"{"service":"hello","image":"apps/hello.img","namespace":"openfaas-fn","envProcess":"","labels":{"com.snapvm.runtime":"testguest","team":"a"},"annotations":{"com.snapvm.min_idle":"1","com.snapvm.request_timeout":"2s","com.snapvm.concurrency_limit":"4","com.snapvm.max_queue":"8","com.snapvm.idle_timeout":"5m"},"limits":{"memory":"64Mi","cpu":"1"},"requests":null,"envVars":null,"secrets":[],"constraints":null,"readOnlyRootFilesystem":false}"#,
            ),
        ),
        ("minimal_deploy", with(0, r#"{"service":"a","image":"b"}"#)),
        (
            "scale",
            with(
                1,
                r#"{"serviceName":"hello","replicas":2,"namespace":"openfaas-fn"}"#,
            ),
        ),
        (
            "delete",
            with(2, r#"{"functionName":"hello","namespace":"openfaas-fn"}"#),
        ),
        ("image", with(3, "team/hello.img")),
        ("memory", with(3, "128Mi")),
    ]
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A seed: its name and bytes.
pub type Seed = (&'static str, Vec<u8>);

/// Writes every seed under `corpus/<target>/seed-<name>`.
pub fn write_all(corpus: &Path) -> std::io::Result<()> {
    let targets: [(&str, Vec<Seed>); 5] = [
        ("block_chain", block_chain()),
        ("vsock_packets", vsock_packets()),
        ("mmio_registers", mmio_registers()),
        ("snapshot_state", snapshot_state()),
        ("deployment", deployment()),
    ];
    for (target, seeds) in targets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    #[ignore = "writes fuzz/corpus; run by hand to regenerate the seeds"]
    fn write_seeds() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        super::write_all(&corpus).expect("cannot write the seeds");
    }

    #[test]
    fn seeds_are_small() {
        for (_, s) in super::block_chain()
            .into_iter()
            .chain(super::vsock_packets())
            .chain(super::mmio_registers())
            .chain(super::snapshot_state())
            .chain(super::deployment())
        {
            assert!(s.len() < 16 << 10);
        }
    }
}
