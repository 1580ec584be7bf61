//! The hybrid Unix-socket backend: connects guest vsock streams to host
//! Unix streams and multiplexes them onto the device's queues.
//!
//! - Guest to host: a guest REQUEST to CID 2 port P becomes a connection to
//!   the host Unix socket `<uds_path>_P`.
//! - Host to guest: host programs connect to `<uds_path>` (our listener) and
//!   write `CONNECT <port>\n`; we send the guest a REQUEST from a local port
//!   we allocate and answer `OK <local port>\n` once the guest accepts.
//!
//! All host sockets sit in a private epoll set whose fd the device registers
//! with the event loop, so connections come and go (also from queue
//! handlers, which have no `EventOps`) without touching the event manager.
//! A timerfd in the same set drives timeouts. Nothing here blocks.
//!
//! Packets owed to the guest are produced lazily when the guest offers an rx
//! buffer: connections with something to say wait in a round-robin queue,
//! and RSTs for connections we hold no state for wait in a bounded queue;
//! while that queue is full the device stops taking guest packets, which
//! pushes back on a guest flooding us with requests.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnKey, Connection, ConnectionError, Step};
use super::log_limit::LogLimiter;
use super::packet::{op_name, Header, HOST_CID, OP_REQUEST, OP_RST, OP_RW, TYPE_STREAM};

/// Default bound on live connections, both directions together.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host clients that connected but have not sent their CONNECT line yet.
const MAX_PENDING_ACCEPTS: usize = 64;
/// RSTs for unknown connections waiting for an rx buffer; at this many the
/// device stops taking guest packets until the guest takes some.
const MAX_PENDING_RSTS: usize = 256;
/// Hard bound on queued RSTs of any kind (beyond it they are dropped; the
/// guest's own timeouts then clean up).
const MAX_QUEUED_RSTS: usize = MAX_PENDING_RSTS + MAX_CONNECTIONS;
/// Guest data held for slow host sockets, all connections together.
const MAX_TOTAL_BUFFERED: usize = 64 << 20;
/// `CONNECT 4294967295\n` is 19 bytes.
const CONNECT_LINE_MAX: usize = 32;
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// After accept() fails (e.g. out of fds) the listener rests this long.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Local ports for host-initiated connections are allocated from here up.
const FIRST_LOCAL_PORT: u32 = 1024;
const EPOLL_BATCH: usize = 64;
const ACCEPT_BATCH: usize = 16;

/// Epoll data of the listener and the timer; streams get tokens above.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("vsock socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale vsock socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot create the vsock epoll set: {0}")]
    Epoll(io::Error),
    #[error("cannot create the vsock timer: {0}")]
    Timer(nix::Error),
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct PendingAccept {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum LineState {
    Incomplete,
    Closed,
    Malformed(String),
    Port(u32),
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// (dev, inode) of the socket file we created, so drop removes only ours.
    listener_id: Option<(u64, u64)>,
    listener_paused_until: Option<Instant>,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    accepts: HashMap<u64, PendingAccept>,
    next_token: u64,
    next_local_port: u32,
    /// Live connections per local port.
    local_ports: HashMap<u32, usize>,
    /// Connections with packets for the guest, round robin.
    rxq: VecDeque<ConnKey>,
    /// RSTs for connections we hold no state for.
    rsts: VecDeque<Header>,
    /// Guest data buffered for host sockets, all connections.
    buffered: usize,
    max_connections: usize,
    log: LogLimiter,
}

impl Muxer {
    /// Listens on `uds_path` (replacing a stale socket file there).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        remove_stale_socket(uds_path)?;
        let bind_err = |source| MuxerError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener_id = fs::symlink_metadata(uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(MuxerError::Timer)?;
        let muxer = Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            listener_id,
            listener_paused_until: None,
            epoll,
            timer,
            timer_armed: None,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            accepts: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            local_ports: HashMap::new(),
            rxq: VecDeque::new(),
            rsts: VecDeque::new(),
            buffered: 0,
            max_connections: MAX_CONNECTIONS,
            log: LogLimiter::new(),
        };
        let add = |fd: RawFd, token| {
            muxer
                .epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(MuxerError::Epoll)
        };
        add(muxer.listener.as_raw_fd(), TOKEN_LISTENER)?;
        add(muxer.timer.as_fd().as_raw_fd(), TOKEN_TIMER)?;
        Ok(muxer)
    }

    /// The fd to poll: readable when any host socket or timer needs us.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max.min(MAX_CONNECTIONS);
    }

    /// Whether the device may take another guest packet: each may need one
    /// RST, and those wait for rx buffers.
    pub fn can_take_guest_packet(&self) -> bool {
        self.rsts.len() < MAX_PENDING_RSTS
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rxq.is_empty()
    }

    /// Forgets every connection (transport reset, device reset). Host
    /// streams are closed; clients still sending their CONNECT line stay.
    pub fn reset_connections(&mut self) {
        self.conns.clear();
        self.tokens.clear();
        self.local_ports.clear();
        self.rxq.clear();
        self.rsts.clear();
        self.buffered = 0;
    }

    fn host_socket_path(&self, port: u32) -> PathBuf {
        let mut p = OsString::from(self.uds_path.as_os_str());
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---- Guest to host -------------------------------------------------

    /// Handles one packet the guest put on its tx queue.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if hdr.src_cid != self.guest_cid {
            self.log.warn(format_args!(
                "guest packet claims source CID {} (the guest's is {}); resetting",
                hdr.src_cid, self.guest_cid
            ));
            return self.reject(hdr);
        }
        if hdr.dst_cid != HOST_CID {
            self.log.debug(format_args!(
                "guest {} to CID {} port {}: only the host (CID 2) is reachable",
                op_name(hdr.op),
                hdr.dst_cid,
                hdr.dst_port
            ));
            return self.reject(hdr);
        }
        if hdr.type_ != TYPE_STREAM {
            self.log.warn(format_args!(
                "guest packet of socket type {} (only streams are supported); resetting",
                hdr.type_
            ));
            return self.reject(hdr);
        }
        let key = ConnKey::of_guest_packet(hdr);
        if !self.conns.contains_key(&key) {
            match hdr.op {
                OP_REQUEST => self.connect_to_host(key, hdr),
                OP_RST => {}
                op => {
                    self.log.debug(format_args!(
                        "guest {} for unknown connection {key}; resetting",
                        op_name(op)
                    ));
                    self.reject(hdr);
                }
            }
            return;
        }
        if hdr.op == OP_RW && self.buffered + hdr.len as usize > MAX_TOTAL_BUFFERED {
            self.log.warn(format_args!(
                "{key}: host sockets hold {} bytes of unread guest data; resetting",
                self.buffered
            ));
            return self.apply(key, Ok(Step::RemoveWithRst));
        }
        let now = Instant::now();
        self.with_conn(key, |c| c.on_guest_packet(hdr, data, now));
    }

    /// A guest packet the parser rejected but whose header we could read.
    pub fn on_malformed_packet(&mut self, hdr: &Header) {
        self.reject(hdr);
    }

    /// Answers a bad or unroutable guest packet with RST, dropping any
    /// connection it names.
    fn reject(&mut self, hdr: &Header) {
        if hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID {
            self.remove(ConnKey::of_guest_packet(hdr));
        }
        if hdr.op != OP_RST {
            self.push_rst(hdr.rst_reply(self.guest_cid));
        }
    }

    fn push_rst(&mut self, rst: Header) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back(rst);
        } else {
            self.log.warn(format_args!(
                "guest takes no rx buffers; dropping RST for guest port {}",
                rst.dst_port
            ));
        }
    }

    fn connect_to_host(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= self.max_connections {
            self.log.warn(format_args!(
                "guest opened {} connections already; refusing {key}",
                self.conns.len()
            ));
            return self.reject(hdr);
        }
        let path = self.host_socket_path(key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                self.log.debug(format_args!(
                    "guest connection to port {}: {}: {e}",
                    key.local_port,
                    path.display()
                ));
                return self.reject(hdr);
            }
        };
        let token = self.new_token();
        let conn = Connection::new_guest_initiated(stream, token, key, hdr);
        self.insert(key, conn);
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        self.tokens.insert(conn.token(), key);
        *self.local_ports.entry(key.local_port).or_default() += 1;
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    /// Runs an operation on a connection and carries out its outcome.
    fn with_conn<F>(&mut self, key: ConnKey, f: F)
    where
        F: FnOnce(&mut Connection) -> Result<Step, ConnectionError>,
    {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let before = conn.buffered();
        let res = f(conn);
        self.buffered = self.buffered.saturating_sub(before) + conn.buffered();
        self.apply(key, res);
    }

    fn apply(&mut self, key: ConnKey, res: Result<Step, ConnectionError>) {
        match res {
            Ok(Step::Keep) => self.refresh(key),
            Ok(Step::Remove) => self.remove(key),
            Ok(Step::RemoveWithRst) => {
                self.remove(key);
                self.push_rst(key.rst(self.guest_cid));
            }
            Err(e) => {
                if e.is_guest_fault() {
                    self.log.warn(format_args!("{key}: {e}; resetting"));
                } else {
                    self.log.debug(format_args!("{key}: {e}; resetting"));
                }
                self.remove(key);
                self.push_rst(key.rst(self.guest_cid));
            }
        }
    }

    /// After a connection changed: epoll interest, rx queue, timer.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = sync_interest(&self.epoll, conn) {
            self.log
                .warn(format_args!("{key}: cannot poll the host socket: {e}"));
            self.remove(key);
            self.push_rst(key.rst(self.guest_cid));
            return;
        }
        if !conn.queued && conn.has_pending_rx() {
            conn.queued = true;
            self.rxq.push_back(key);
        }
        if let Some(deadline) = conn.deadline() {
            self.note_deadline(deadline);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&conn.token());
        self.buffered = self.buffered.saturating_sub(conn.buffered());
        if let Some(n) = self.local_ports.get_mut(&key.local_port) {
            *n -= 1;
            if *n == 0 {
                self.local_ports.remove(&key.local_port);
            }
        }
        // Dropping the stream closes it, which also takes it out of the
        // epoll set; the host client sees EOF.
    }

    // ---- Host to guest -------------------------------------------------

    /// Produces the next packet for the guest, reading connection data into
    /// `data` (the rx buffer's payload area). `None`: nothing fits.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        if let Some(rst) = self.rsts.pop_front() {
            return Some(rst);
        }
        let now = Instant::now();
        let mut skipped = Vec::new();
        let mut out = None;
        while let Some(key) = self.rxq.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.next_packet(self.guest_cid, data, now) {
                Ok(Some(hdr)) => {
                    // Back of the queue if it has more: round robin.
                    self.refresh(key);
                    out = Some(hdr);
                    break;
                }
                Ok(None) => {
                    if conn.has_pending_rx() {
                        // Data that does not fit this buffer; try the next.
                        conn.queued = true;
                        skipped.push(key);
                    }
                    self.refresh(key);
                }
                Err(e) => {
                    self.apply(key, Err(e));
                    out = self.rsts.pop_front();
                    break;
                }
            }
        }
        for key in skipped.into_iter().rev() {
            self.rxq.push_front(key);
        }
        out
    }

    /// Handles whatever is ready in the private epoll set.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EPOLL_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                self.log.warn(format_args!("epoll_wait failed: {e}"));
                return;
            }
        };
        let now = Instant::now();
        for ev in &events[..n] {
            let set = EventSet::from_bits_truncate(ev.events());
            match ev.data() {
                TOKEN_LISTENER => self.accept_host_clients(now),
                TOKEN_TIMER => self.on_timer(now),
                token => {
                    if self.accepts.contains_key(&token) {
                        self.read_connect_line(token, now);
                    } else if let Some(key) = self.tokens.get(&token).copied() {
                        self.with_conn(key, |c| c.on_host_event(set, now));
                    }
                    // Else: the stream was closed earlier in this batch.
                }
            }
        }
    }

    fn accept_host_clients(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of fds: the client stays in the backlog and
                    // the listener would fire again at once. Rest a while.
                    self.log.warn(format_args!(
                        "cannot accept on {}: {e}; retrying shortly",
                        self.uds_path.display()
                    ));
                    self.pause_listener(now);
                    return;
                }
            };
            if self.accepts.len() >= MAX_PENDING_ACCEPTS {
                self.log.warn(format_args!(
                    "{} host clients have not sent CONNECT yet; closing a new one",
                    self.accepts.len()
                ));
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                self.log
                    .warn(format_args!("cannot make a host client non-blocking: {e}"));
                continue;
            }
            let token = self.new_token();
            let ev = EpollEvent::new(EventSet::IN, token);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
            {
                self.log
                    .warn(format_args!("cannot poll a host client: {e}"));
                continue;
            }
            let deadline = now + CONNECT_LINE_TIMEOUT;
            self.accepts.insert(
                token,
                PendingAccept {
                    stream,
                    line: Vec::with_capacity(CONNECT_LINE_MAX),
                    deadline,
                },
            );
            self.note_deadline(deadline);
        }
    }

    fn pause_listener(&mut self, now: Instant) {
        let fd = self.listener.as_raw_fd();
        if self.listener_paused_until.is_none()
            && self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                .is_ok()
        {
            let until = now + ACCEPT_RETRY;
            self.listener_paused_until = Some(until);
            self.note_deadline(until);
        }
    }

    fn resume_listener(&mut self) {
        self.listener_paused_until = None;
        let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
        {
            log::error!("vsock: cannot poll {} again: {e}", self.uds_path.display());
        }
    }

    /// Reads a host client's `CONNECT <port>\n` one byte at a time, so no
    /// byte after the line is consumed here.
    fn read_connect_line(&mut self, token: u64, now: Instant) {
        let Some(acc) = self.accepts.get_mut(&token) else {
            return;
        };
        let state = loop {
            let mut byte = [0u8; 1];
            match (&acc.stream).read(&mut byte) {
                Ok(0) => break LineState::Closed,
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&acc.line),
                Ok(_) if acc.line.len() >= CONNECT_LINE_MAX => {
                    break LineState::Malformed(format!("longer than {CONNECT_LINE_MAX} bytes"))
                }
                Ok(_) => acc.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break LineState::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break LineState::Malformed(e.to_string()),
            }
        };
        match state {
            LineState::Incomplete => {}
            LineState::Closed => {
                self.accepts.remove(&token);
            }
            LineState::Malformed(why) => {
                self.log.warn(format_args!(
                    "bad CONNECT line from a host client ({why}); closing it"
                ));
                self.accepts.remove(&token);
            }
            LineState::Port(port) => {
                if let Some(acc) = self.accepts.remove(&token) {
                    self.connect_to_guest(token, acc.stream, port, now);
                }
            }
        }
    }

    fn connect_to_guest(&mut self, token: u64, stream: UnixStream, port: u32, now: Instant) {
        if self.conns.len() >= self.max_connections {
            self.log.warn(format_args!(
                "{} connections open; refusing a host connection to guest port {port}",
                self.conns.len()
            ));
            return;
        }
        let Some(local_port) = self.allocate_local_port() else {
            self.log
                .warn(format_args!("no free local port for guest port {port}"));
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::new_host_initiated(stream, token, key, now);
        // Still registered from the accept; `refresh` narrows the interest.
        conn.registered = Some(EventSet::IN);
        self.insert(key, conn);
    }

    fn allocate_local_port(&mut self) -> Option<u32> {
        // At most `conns.len()` ports are taken, so this finds one.
        for _ in 0..=self.conns.len() {
            let port = self.next_local_port;
            self.next_local_port = if port >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            if !self.local_ports.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }

    // ---- Timeouts ------------------------------------------------------

    fn on_timer(&mut self, now: Instant) {
        // Non-blocking: EAGAIN just means it was re-armed meanwhile.
        let _ = self.timer.wait();
        self.timer_armed = None;
        let expired: Vec<u64> = self
            .accepts
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            self.log.warn(format_args!(
                "host client sent no CONNECT line in {CONNECT_LINE_TIMEOUT:?}; closing it"
            ));
            self.accepts.remove(&token);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                let err = conn.on_timeout();
                self.apply(key, Err(err));
            }
        }
        if self.listener_paused_until.is_some_and(|d| d <= now) {
            self.resume_listener();
        }
        let next = self
            .accepts
            .values()
            .map(|a| a.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline()))
            .chain(self.listener_paused_until)
            .min();
        if let Some(d) = next {
            self.note_deadline(d);
        }
    }

    /// Makes sure the timer fires by `deadline`.
    fn note_deadline(&mut self, deadline: Instant) {
        if self.timer_armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        let delay = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let exp = Expiration::OneShot(TimeSpec::from_duration(delay));
        match self.timer.set(exp, TimerSetTimeFlags::empty()) {
            Ok(()) => self.timer_armed = Some(deadline),
            Err(e) => log::error!("vsock: cannot arm the timeout timer: {e}"),
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one we created.
        let ours = fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.listener_id {
            let _ = fs::remove_file(&self.uds_path);
        }
    }
}

/// Brings the epoll registration of `conn`'s stream in line with what it
/// wants to be polled for.
fn sync_interest(epoll: &Epoll, conn: &mut Connection) -> io::Result<()> {
    let want = conn.interest();
    if want == conn.registered {
        return Ok(());
    }
    let fd = conn.stream().as_raw_fd();
    let token = conn.token();
    match (conn.registered, want) {
        (None, Some(ev)) => epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token))?,
        (Some(_), Some(ev)) => {
            epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, token))?
        }
        (Some(_), None) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?,
        (None, None) => {}
    }
    conn.registered = want;
    Ok(())
}

fn remove_stale_socket(path: &Path) -> Result<(), MuxerError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            fs::remove_file(path).map_err(|source| MuxerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(MuxerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MuxerError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Connects to a host Unix socket without blocking: a listener either takes
/// the connection at once or refuses it (EAGAIN when its backlog is full).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    Ok(UnixStream::from(fd))
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing CR is
/// tolerated).
fn parse_connect_line(line: &[u8]) -> LineState {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(port) = line.strip_prefix(b"CONNECT ") else {
        return LineState::Malformed("expected `CONNECT <port>`".into());
    };
    if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return LineState::Malformed("the port is not a decimal number".into());
    }
    match std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        // u32::MAX is VMADDR_PORT_ANY.
        Some(p) if p != u32::MAX => LineState::Port(p),
        _ => LineState::Malformed("the port is out of range".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port_of(line: &str) -> Option<u32> {
        match parse_connect_line(line.as_bytes()) {
            LineState::Port(p) => Some(p),
            _ => None,
        }
    }

    #[test]
    fn connect_lines() {
        assert_eq!(port_of("CONNECT 1234"), Some(1234));
        assert_eq!(port_of("CONNECT 52\r"), Some(52));
        assert_eq!(port_of("CONNECT 4294967294"), Some(u32::MAX - 1));
        assert_eq!(port_of("CONNECT 4294967295"), None);
        assert_eq!(port_of("CONNECT 99999999999"), None);
        assert_eq!(port_of("CONNECT +5"), None);
        assert_eq!(port_of("CONNECT "), None);
        assert_eq!(port_of("connect 5"), None);
        assert_eq!(port_of("CONNECT 5 6"), None);
        assert_eq!(port_of(""), None);
    }
}
