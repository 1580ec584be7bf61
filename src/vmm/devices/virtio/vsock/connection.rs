//! One stream connection between a guest socket and a host Unix stream:
//! its state machine, credit-based flow control both ways (virtio 1.2,
//! 5.10.6.3) and the bounded buffer of guest data the host has not taken
//! yet.
//!
//! A connection never touches the epoll set or the queues itself: it reacts
//! to guest packets and host readiness, says what it wants to be polled for
//! ([`Connection::interest`]) and produces the packets it owes the guest one
//! at a time ([`Connection::next_packet`]). The muxer does the plumbing.

use std::io;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use super::packet::{
    op_name, Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise to the guest per connection: the most guest
/// data we ever hold for a host socket that does not keep up.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Largest data payload we put in one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); larger guest packets are malformed.
pub const MAX_PKT_DATA: u32 = 64 << 10;
/// We tell the guest about consumed data once this much was forwarded since
/// it last heard our `fwd_cnt`.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// How long the guest has to answer a host-initiated REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection may wait for the guest's RST, or for its
/// last data to drain into the host socket.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Buffer capacity kept across bursts; more is released once drained.
const KEEP_CAPACITY: usize = 16 << 10;

/// A connection's identity: our (CID 2) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

impl ConnKey {
    /// The key of a guest packet addressed to the host.
    pub fn of_guest_packet(hdr: &Header) -> Self {
        Self {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        }
    }

    /// The RST that tells the guest this connection is gone.
    pub fn rst(&self, guest_cid: u64) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host:{} <-> guest:{}", self.local_port, self.peer_port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's
    /// RESPONSE (or RST, or the timeout).
    LocalInit,
    Established,
    /// We sent SHUTDOWN(RCV|SEND): waiting for the guest's RST (or the
    /// timeout) before forgetting the connection.
    Closing,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::LocalInit => "connecting",
            State::Established => "established",
            State::Closing => "closing",
        }
    }
}

/// What the muxer must do with a connection after an operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Keep,
    /// Forget it; the guest already considers it closed.
    Remove,
    /// Forget it and send the guest an RST.
    RemoveWithRst,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("guest sent {len} bytes with only {credit} bytes of credit left")]
    CreditExceeded { len: u32, credit: u32 },
    #[error("guest sent {op} on a {state} connection")]
    UnexpectedOp {
        op: &'static str,
        state: &'static str,
    },
    #[error("guest sent data after shutting down its send side")]
    DataAfterShutdown,
    #[error("guest sent unknown operation {0}")]
    UnknownOp(u16),
    #[error("guest data buffer of {0} bytes is not readable")]
    BadData(u32),
    #[error("host socket failed: {0}")]
    HostIo(io::Error),
    #[error("guest did not answer the connection request in time")]
    ConnectTimeout,
    #[error("guest did not finish closing in time")]
    CloseTimeout,
}

impl ConnectionError {
    /// Errors caused by a misbehaving guest (logged as warnings); the rest
    /// are ordinary host-side events.
    pub fn is_guest_fault(&self) -> bool {
        !matches!(
            self,
            ConnectionError::HostIo(_)
                | ConnectionError::ConnectTimeout
                | ConnectionError::CloseTimeout
        )
    }
}

/// Guest data received but not yet written to the host socket.
#[derive(Debug, Default)]
struct PendingBytes {
    buf: Vec<u8>,
    head: usize,
}

impl PendingBytes {
    fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn front(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.buf.len());
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf.shrink_to(KEEP_CAPACITY);
            }
        }
    }

    /// Appends a guest buffer; `false` if guest memory could not be read.
    fn extend_from<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>) -> bool {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + data.len(), 0);
        if data.copy_to(&mut self.buf[old..]) != data.len() {
            self.buf.truncate(old);
            return false;
        }
        true
    }
}

pub struct Connection {
    stream: UnixStream,
    /// The epoll data this connection's stream is registered with.
    token: u64,
    key: ConnKey,
    state: State,

    // Guest to host. `recv_cnt - fwd_cnt == to_host.len()`.
    to_host: PendingBytes,
    /// Bytes the guest has sent us.
    recv_cnt: Wrapping<u32>,
    /// Bytes written to the host socket (the spec's `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    fwd_cnt_told: Wrapping<u32>,

    // Host to guest.
    /// Bytes we have sent the guest (the spec's `tx_cnt`).
    sent_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out and no credit came back yet.
    credit_requested: bool,

    // Packets owed to the guest.
    want_request: bool,
    want_response: bool,
    want_credit_update: bool,
    want_shutdown: u32,

    /// SHUTDOWN flags received from / sent to the guest.
    peer_shutdown: u32,
    sent_shutdown: u32,

    /// The host stream reported readable and we have not yet drained it.
    host_readable: bool,
    /// The host stream hit end of file (host shut down its write side).
    host_eof: bool,
    /// The host stream hung up: no more I/O is possible on it.
    host_hup: bool,
    /// We shut down the host stream's write side (guest sent SHUTDOWN(SEND)).
    host_write_shut: bool,

    deadline: Option<Instant>,
    /// The interest currently registered with the epoll set; `None` once
    /// the stream was removed from it.
    pub registered: Option<EventSet>,
    /// Whether the connection sits in the muxer's rx queue.
    pub queued: bool,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, key: ConnKey, state: State) -> Self {
        Self {
            stream,
            token,
            key,
            state,
            to_host: PendingBytes::default(),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            want_request: false,
            want_response: false,
            want_credit_update: false,
            want_shutdown: 0,
            peer_shutdown: 0,
            sent_shutdown: 0,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            deadline: None,
            registered: None,
            queued: false,
        }
    }

    /// A guest REQUEST we connected to a host listener: RESPONSE owed.
    pub fn new_guest_initiated(
        stream: UnixStream,
        token: u64,
        key: ConnKey,
        request: &Header,
    ) -> Self {
        let mut c = Self::new(stream, token, key, State::Established);
        c.update_peer_credit(request);
        c.want_response = true;
        c
    }

    /// A host client's CONNECT: REQUEST owed, RESPONSE awaited.
    pub fn new_host_initiated(stream: UnixStream, token: u64, key: ConnKey, now: Instant) -> Self {
        let mut c = Self::new(stream, token, key, State::LocalInit);
        c.want_request = true;
        c.deadline = Some(now + CONNECT_TIMEOUT);
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Guest data held for the host.
    pub fn buffered(&self) -> usize {
        self.to_host.len()
    }

    /// Bytes the guest may still send us without overrunning our buffer.
    fn our_credit(&self) -> u32 {
        CONN_BUF_ALLOC.saturating_sub(self.to_host.len() as u32)
    }

    /// Bytes we may still send the guest. A guest that reports having
    /// consumed more than we sent gets no credit at all.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    fn may_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// What the host stream should be polled for; `None`: not at all (it
    /// hung up, and level-triggered HUP would fire forever).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut ev = EventSet::empty();
        // Stop reading while the guest has no credit or we already know
        // there is data waiting for an rx buffer.
        if self.may_read_host() && !self.host_readable && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.to_host.is_empty() && !self.host_write_shut {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    /// Whether [`Connection::next_packet`] may have something for the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.want_request
            || self.want_response
            || self.want_shutdown != 0
            || self.want_credit_update
            || (self.host_readable
                && self.may_read_host()
                && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Handles a packet from the guest addressed to this connection.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
        now: Instant,
    ) -> Result<Step, ConnectionError> {
        self.update_peer_credit(hdr);
        match hdr.op {
            OP_RESPONSE if self.state == State::LocalInit => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.key.local_port);
                // A fresh socket's buffer is empty, so this never blocks.
                let n = send(
                    self.stream.as_raw_fd(),
                    line.as_bytes(),
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                )
                .map_err(|e| ConnectionError::HostIo(e.into()))?;
                if n != line.len() {
                    return Err(ConnectionError::HostIo(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short write of the OK line",
                    )));
                }
                Ok(Step::Keep)
            }
            OP_RST => Ok(Step::Remove),
            OP_SHUTDOWN if self.state != State::LocalInit => {
                let flags = hdr.flags & SHUTDOWN_BOTH;
                if flags & SHUTDOWN_RCV != 0 && self.peer_shutdown & SHUTDOWN_RCV == 0 {
                    self.host_readable = false;
                    // The host's writes now fail instead of piling up.
                    let _ = self.stream.shutdown(Shutdown::Read);
                }
                self.peer_shutdown |= flags;
                Ok(self.settle(now))
            }
            OP_RW if self.state == State::Established => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return Err(ConnectionError::DataAfterShutdown);
                }
                let credit = self.our_credit();
                if hdr.len > credit {
                    return Err(ConnectionError::CreditExceeded {
                        len: hdr.len,
                        credit,
                    });
                }
                let Some(data) = data.filter(|_| hdr.len > 0) else {
                    return Ok(Step::Keep);
                };
                if data.len() != hdr.len as usize || !self.to_host.extend_from(data) {
                    return Err(ConnectionError::BadData(hdr.len));
                }
                self.recv_cnt += hdr.len;
                self.flush_to_host()?;
                Ok(self.settle(now))
            }
            // Sent before the guest saw our SHUTDOWN: the host is gone, so
            // the data has nowhere to go.
            OP_RW if self.state == State::Closing => Ok(Step::Keep),
            OP_CREDIT_UPDATE if self.state != State::LocalInit => Ok(Step::Keep),
            OP_CREDIT_REQUEST if self.state != State::LocalInit => {
                self.want_credit_update = true;
                Ok(Step::Keep)
            }
            OP_REQUEST | OP_RESPONSE | OP_SHUTDOWN | OP_RW | OP_CREDIT_UPDATE
            | OP_CREDIT_REQUEST => Err(ConnectionError::UnexpectedOp {
                op: op_name(hdr.op),
                state: self.state.name(),
            }),
            op => Err(ConnectionError::UnknownOp(op)),
        }
    }

    /// Writes buffered guest data to the host socket until it would block.
    fn flush_to_host(&mut self) -> Result<(), ConnectionError> {
        while !self.to_host.is_empty() && !self.host_write_shut {
            let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            match send(self.stream.as_raw_fd(), self.to_host.front(), flags) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.consume(n);
                    self.fwd_cnt += n as u32;
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ConnectionError::HostIo(e.into())),
            }
        }
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_UPDATE_THRESHOLD {
            self.want_credit_update = true;
        }
        Ok(())
    }

    /// Carries out the guest's shutdown once its data reached the host.
    fn settle(&mut self, now: Instant) -> Step {
        if !self.to_host.is_empty() {
            if self.peer_shutdown == SHUTDOWN_BOTH && self.deadline.is_none() {
                self.deadline = Some(now + CLOSE_TIMEOUT);
            }
            return Step::Keep;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed its socket and waits for our RST.
            return Step::RemoveWithRst;
        }
        Step::Keep
    }

    /// Handles readiness of the host stream.
    pub fn on_host_event(&mut self, ev: EventSet, now: Instant) -> Result<Step, ConnectionError> {
        if ev.contains(EventSet::ERROR) {
            let err = self
                .stream
                .take_error()
                .ok()
                .flatten()
                .unwrap_or_else(|| io::Error::other("socket error"));
            return Err(ConnectionError::HostIo(err));
        }
        if ev.contains(EventSet::HANG_UP) {
            self.host_hup = true;
            if self.state == State::LocalInit {
                // The host client gave up before the guest answered.
                return Ok(Step::RemoveWithRst);
            }
            if self.may_read_host() {
                // Read what is left and the EOF as rx buffers and credit
                // allow; the EOF then becomes SHUTDOWN(RCV|SEND).
                self.host_readable = true;
            } else if self.state == State::Established && self.sent_shutdown != SHUTDOWN_BOTH {
                // Nothing more to read (EOF seen, or the guest stopped
                // receiving): tell the guest the host is gone entirely.
                self.want_shutdown = SHUTDOWN_BOTH;
            }
        }
        if ev.contains(EventSet::IN) && self.may_read_host() {
            self.host_readable = true;
        }
        if ev.contains(EventSet::OUT) {
            self.flush_to_host()?;
            return Ok(self.settle(now));
        }
        Ok(Step::Keep)
    }

    /// The deadline passed: the connection is given up.
    pub fn on_timeout(&mut self) -> ConnectionError {
        match self.state {
            State::LocalInit => ConnectionError::ConnectTimeout,
            _ => ConnectionError::CloseTimeout,
        }
    }

    fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        // Every packet carries our credit, so the guest is up to date.
        self.fwd_cnt_told = self.fwd_cnt;
        self.want_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn on_host_eof(&mut self) {
        self.host_eof = true;
        self.host_readable = false;
        self.want_shutdown |= SHUTDOWN_SEND;
        if self.host_hup {
            self.want_shutdown |= SHUTDOWN_RCV;
        }
    }

    /// Produces the next packet owed to the guest, reading host data into
    /// `data` (the rx buffer's payload area) for an RW packet. `Ok(None)`:
    /// nothing that fits this buffer.
    pub fn next_packet<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        data: Option<&VolatileSlice<'_, B>>,
        now: Instant,
    ) -> Result<Option<Header>, ConnectionError> {
        if self.want_request {
            self.want_request = false;
            return Ok(Some(self.header(guest_cid, OP_REQUEST)));
        }
        if self.want_response {
            self.want_response = false;
            return Ok(Some(self.header(guest_cid, OP_RESPONSE)));
        }
        if self.host_readable && self.may_read_host() {
            let credit = self.peer_credit();
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Ok(Some(self.header(guest_cid, OP_CREDIT_REQUEST)));
                }
            } else if let Some(buf) = data.filter(|b| !b.is_empty()) {
                let max = buf.len().min(credit as usize).min(MAX_PKT_DATA as usize);
                if let Some(n) = self.read_host(buf, max)? {
                    if n > 0 {
                        self.sent_cnt += n as u32;
                        let mut hdr = self.header(guest_cid, OP_RW);
                        hdr.len = n as u32;
                        return Ok(Some(hdr));
                    }
                    self.on_host_eof();
                }
            }
        }
        if self.want_shutdown != 0 {
            let flags = std::mem::take(&mut self.want_shutdown);
            self.sent_shutdown |= flags;
            let mut hdr = self.header(guest_cid, OP_SHUTDOWN);
            hdr.flags = flags;
            if self.sent_shutdown == SHUTDOWN_BOTH && self.state != State::Closing {
                self.state = State::Closing;
                self.deadline = Some(now + CLOSE_TIMEOUT);
            }
            return Ok(Some(hdr));
        }
        if self.want_credit_update {
            return Ok(Some(self.header(guest_cid, OP_CREDIT_UPDATE)));
        }
        Ok(None)
    }

    /// One read from the host stream into the first `max` bytes of `buf`.
    /// `Ok(None)`: nothing to read right now.
    fn read_host<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<'_, B>,
        max: usize,
    ) -> Result<Option<usize>, ConnectionError> {
        let mut dst = buf
            .subslice(0, max)
            .map_err(|e| ConnectionError::HostIo(io::Error::other(e.to_string())))?;
        loop {
            match (&self.stream).read_volatile(&mut dst) {
                Ok(n) => return Ok(Some(n)),
                Err(VolatileMemoryError::IOError(e)) => match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                        return Ok(None);
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(ConnectionError::HostIo(e)),
                },
                Err(e) => return Err(ConnectionError::HostIo(io::Error::other(e.to_string()))),
            }
        }
    }
}
