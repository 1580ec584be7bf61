//! The virtio-vsock packet header (virtio 1.2, 5.10.6 "Device Operation")
//! and the constants of the stream protocol.
//!
//! Descriptor chains are parsed by the `virtio-vsock` crate; this module
//! holds the header as plain values so the connection logic never touches
//! guest memory, plus a fallback reader for the header of a chain the
//! parser rejected (to answer its sender with RST).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemory};

/// The host's CID: every guest connection we serve is addressed to it.
pub const HOST_CID: u64 = 2;

/// `struct virtio_vsock_hdr` is 44 bytes.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

/// Socket types (`type` field). Only stream sockets are offered.
pub const TYPE_STREAM: u16 = 1;

/// Operations (`op` field).
pub const OP_INVALID: u16 = 0;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// OP_SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event queue: `struct virtio_vsock_event { le32 id; }`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Name of an operation, for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        OP_INVALID => "INVALID",
        OP_REQUEST => "REQUEST",
        OP_RESPONSE => "RESPONSE",
        OP_RST => "RST",
        OP_SHUTDOWN => "SHUTDOWN",
        OP_RW => "RW",
        OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown op",
    }
}

/// A packet header, host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The header of a packet parsed from a guest chain.
    pub fn from_packet<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Little-endian wire form.
    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the little-endian wire form.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(v)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Reads the header of a driver-to-device chain that the packet parser
    /// rejected (bad lengths, fragmented data...), so its sender can be
    /// reset. `None` when not even the header is readable.
    pub fn peek<M, T>(mem: &M, mut chain: DescriptorChain<T>) -> Option<Self>
    where
        M: GuestMemory,
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = chain.next()?;
        if head.is_write_only() || (head.len() as usize) < HEADER_SIZE {
            return None;
        }
        let mut b = [0u8; HEADER_SIZE];
        mem.read_slice(&mut b, head.addr()).ok()?;
        Some(Self::from_bytes(&b))
    }

    /// The RST answering `self` (addresses swapped), sent to `guest_cid`.
    pub fn rst_reply(&self, guest_cid: u64) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: guest_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_wire_form() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 0xdead_beef,
            len: 77,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 256 << 10,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn rst_reply_swaps_addresses() {
        let h = Header {
            src_cid: 100,
            dst_cid: 3,
            src_port: 5000,
            dst_port: 80,
            op: OP_REQUEST,
            ..Header::default()
        };
        let r = h.rst_reply(100);
        assert_eq!((r.src_cid, r.dst_cid), (3, 100));
        assert_eq!((r.src_port, r.dst_port), (80, 5000));
        assert_eq!((r.op, r.type_, r.len), (OP_RST, TYPE_STREAM, 0));
    }
}
