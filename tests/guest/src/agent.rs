//! The guest agent (DESIGN.md, "Guest protocol"): connects to the host
//! (CID 2, port 1234), answers the init frame, then serves one request
//! frame at a time with the function the appfs manifest names. Frames are
//! a 4-byte big-endian length and UTF-8 JSON. Also serves the manifest's
//! `listen=` (echo) and `sink=` ports.

use core::fmt::Write;

use crate::bootinfo::BootInfo;
use crate::functions::{self, Env, Func};
use crate::json::{self, Writer};
use crate::manifest::Manifest;
use crate::util::{hex_val, Rng};
use crate::vsock::{State, Vsock, MAX_CONNS, SHUT_SEND};
use crate::{apic, cpl0, mem};

pub const AGENT_PORT: u32 = 1234;
pub const MAX_FRAME: usize = 4 << 20;
const RESP_CAP: usize = MAX_FRAME + (64 << 10);

const KIND_AGENT: u8 = 1;
const KIND_ECHO: u8 = 2;
const KIND_SINK: u8 = 3;

/// What was loaded from the appfs.
pub enum App {
    Loaded(Func),
    Failed(&'static str),
}

enum Frame {
    Len { have: usize, hdr: [u8; 4] },
    Body { len: usize, have: usize },
    Drain { left: usize },
    Respond { len: usize, sent: usize },
}

pub struct Agent<'a> {
    vs: Vsock,
    boot: &'a BootInfo,
    app: App,
    manifest: Manifest,
    rng: Rng,
    realtime_ns: u64,
    /// Generation of the agent connection in slot 0, if one is up.
    conn: Option<u32>,
    /// Whether that connection got established (else it was refused).
    was_connected: bool,
    /// Transport resets already acted upon.
    seen_resets: u32,
    frame: Frame,
    req: &'static mut [u8],
    resp: &'static mut [u8],
    backoff_ms: u64,
    /// Timer interrupts seen when the retry timer was armed.
    retry_armed: Option<u32>,
    scratch: [u8; 4096],
    /// Write the diff snapshot point (124) after answering each init frame
    /// (manifest `diffpoint=after_init`).
    diffpoint_after_init: bool,
    /// Requests answered since boot, and the manifest's `snapshot_after=N`:
    /// once the Nth answer has left the VM, write 124 before reading on.
    answered: u64,
    snapshot_after: Option<u64>,
    snapshot_pending: bool,
}

impl<'a> Agent<'a> {
    pub fn new(vs: Vsock, boot: &'a BootInfo, app: App, manifest: Manifest, diffpoint_after_init: bool) -> Agent<'a> {
        let mut rng = Rng::new();
        rng.mix(&[crate::io::rdtsc()]);
        let snapshot_after = manifest.get(b"snapshot_after").and_then(crate::cmdline::parse_u64);
        Agent {
            vs,
            boot,
            app,
            manifest,
            rng,
            realtime_ns: 0,
            conn: None,
            was_connected: false,
            seen_resets: 0,
            frame: Frame::Len { have: 0, hdr: [0; 4] },
            req: mem::alloc(MAX_FRAME, 4096),
            resp: mem::alloc(RESP_CAP, 4096),
            backoff_ms: 0,
            retry_armed: None,
            scratch: [0; 4096],
            snapshot_after,
            diffpoint_after_init,
            answered: 0,
            snapshot_pending: false,
        }
    }

    pub fn run(&mut self) -> ! {
        for v in self.manifest.values(b"listen").filter_map(crate::cmdline::parse_u64) {
            self.vs.listen(v as u32, KIND_ECHO);
        }
        for v in self.manifest.values(b"sink").filter_map(crate::cmdline::parse_u64) {
            self.vs.listen(v as u32, KIND_SINK);
        }
        loop {
            let seen = cpl0::irq_count();
            let mut progress = self.vs.poll();
            progress |= self.step_agent();
            progress |= self.step_listeners();
            progress |= self.vs.flush();
            if !progress {
                cpl0::wait_irq(seen);
            }
        }
    }

    fn conn_alive(&self) -> bool {
        let c = &self.vs.conns[0];
        self.conn == Some(c.gen) && c.state != State::Free
    }

    fn step_agent(&mut self) -> bool {
        // A connection we had is gone: reset by the peer, refused, or
        // dropped by a transport reset.
        if self.conn.is_some() && !self.conn_alive() {
            self.conn = None;
            let transport_reset = self.vs.resets != self.seen_resets;
            self.seen_resets = self.vs.resets;
            if self.was_connected || transport_reset {
                self.backoff_ms = 0;
                self.retry_armed = None;
            } else {
                self.arm_retry();
            }
            return true;
        }
        if self.conn.is_none() {
            if let Some(at) = self.retry_armed {
                if cpl0::vector_count(apic::TIMER_VECTOR) == at {
                    return false; // the retry timer has not fired yet
                }
                self.retry_armed = None;
            }
            return self.connect();
        }
        let c = &self.vs.conns[0];
        if c.state != State::Connected {
            return false;
        }
        if !self.was_connected {
            self.was_connected = true;
            self.backoff_ms = 0;
        }
        if c.peer_shut & SHUT_SEND != 0 && c.rx.len == 0 && !matches!(self.frame, Frame::Respond { .. }) {
            // The host closed its side and everything it sent is handled:
            // close ours once the last response is out. The host's RST then
            // frees the connection and we reconnect.
            self.vs.shutdown(0);
            return false;
        }
        if self.snapshot_pending && matches!(self.frame, Frame::Len { have: 0, .. }) {
            if !self.vs.tx_idle() {
                return false;
            }
            self.snapshot_pending = false;
            crate::io::control(crate::io::CONTROL_SNAPSHOT);
            return true;
        }
        self.step_frames()
    }

    fn connect(&mut self) -> bool {
        self.seen_resets = self.vs.resets;
        let gen = self.vs.connect(AGENT_PORT, KIND_AGENT);
        self.conn = Some(gen);
        self.was_connected = false;
        self.frame = Frame::Len { have: 0, hdr: [0; 4] };
        true
    }

    /// After a refused connection: retry after 10 ms, doubling up to 500 ms.
    fn arm_retry(&mut self) {
        self.backoff_ms = if self.backoff_ms == 0 { 10 } else { (self.backoff_ms * 2).min(500) };
        let seen = cpl0::vector_count(apic::TIMER_VECTOR);
        apic::timer_oneshot(self.backoff_ms * 1_000_000);
        self.retry_armed = Some(seen);
    }

    fn step_frames(&mut self) -> bool {
        let mut progress = false;
        loop {
            match self.frame {
                // Read nothing more until the snapshot point is written.
                Frame::Len { have: 0, .. } if self.snapshot_pending => return progress,
                Frame::Len { mut have, mut hdr } => {
                    let n = self.vs.read(0, &mut hdr[have..]);
                    if n == 0 {
                        return progress;
                    }
                    progress = true;
                    have += n;
                    self.frame = if have < 4 {
                        Frame::Len { have, hdr }
                    } else {
                        let len = u32::from_be_bytes(hdr) as usize;
                        if len > MAX_FRAME {
                            Frame::Drain { left: len }
                        } else {
                            Frame::Body { len, have: 0 }
                        }
                    };
                }
                Frame::Body { len, have } => {
                    if have < len {
                        let n = self.vs.read(0, &mut self.req[have..len]);
                        if n == 0 {
                            return progress;
                        }
                        progress = true;
                        self.frame = Frame::Body { len, have: have + n };
                        continue;
                    }
                    let rlen = self.handle(len);
                    self.frame = Frame::Respond { len: rlen, sent: 0 };
                }
                Frame::Drain { left } => {
                    if left > 0 {
                        let n = self.vs.discard(0, left);
                        if n == 0 {
                            return progress;
                        }
                        progress = true;
                        self.frame = Frame::Drain { left: left - n };
                        continue;
                    }
                    let rlen = self.respond_with(|w| w.raw(b"{\"error\":\"request too large\"}"));
                    self.frame = Frame::Respond { len: rlen, sent: 0 };
                }
                Frame::Respond { len, sent } => {
                    let n = self.vs.write(0, &self.resp[sent..len]);
                    if n > 0 {
                        progress = true;
                    }
                    if sent + n < len {
                        self.frame = Frame::Respond { len, sent: sent + n };
                        return progress;
                    }
                    self.frame = Frame::Len { have: 0, hdr: [0; 4] };
                }
            }
        }
    }

    /// Builds a response frame (length prefix + body) with `f`; returns its
    /// total length.
    fn respond_with(&mut self, f: impl FnOnce(&mut Writer)) -> usize {
        let (hdr, body) = self.resp.split_at_mut(4);
        let mut w = Writer::new(body);
        f(&mut w);
        if w.overflow {
            w = Writer::new(body);
            w.raw(b"{\"error\":\"response too large\"}");
        }
        let n = w.len;
        hdr.copy_from_slice(&(n as u32).to_be_bytes());
        4 + n
    }

    /// Handles the request frame in req[..len]; returns the response length.
    fn handle(&mut self, len: usize) -> usize {
        // Lend the request buffer out so the response can be built from it.
        let req = core::mem::take(&mut self.req);
        let n = self.respond_to(&req[..len]);
        self.req = req;
        n
    }

    fn respond_to(&mut self, frame: &[u8]) -> usize {
        let Some(value) = json::validate(frame) else {
            return self.respond_with(|w| w.raw(b"{\"error\":\"invalid json\"}"));
        };
        if let Some(init) = json::field(value, "init").filter(|v| json::is_object(v)) {
            let mut seed = [0u64; 4];
            let mut buf = [0u8; 128];
            if let Some(s) = json::field(init, "seed").and_then(|v| json::decode_str(v, &mut buf)) {
                for (i, ch) in s.chunks(16).take(4).enumerate() {
                    seed[i] = ch.iter().fold(0u64, |a, &c| (a << 4) | u64::from(hex_val(c).unwrap_or(0)));
                }
            }
            let rt = json::field(init, "realtime_ns").and_then(json::as_u64).unwrap_or(0);
            self.realtime_ns = rt;
            self.rng.mix(&[seed[0], seed[1], seed[2], seed[3], rt]);
            let n = self.respond_with(|w| w.raw(b"{\"ready\": true}"));
            if self.diffpoint_after_init {
                crate::io::control(crate::io::CONTROL_SNAPSHOT);
            }
            return n;
        }
        let func = match self.app {
            App::Loaded(f) => f,
            App::Failed(why) => {
                return self.respond_with(|w| {
                    w.raw(b"{\"error\": \"app load failed: ");
                    w.escaped(why.as_bytes());
                    w.raw(b"\"}");
                })
            }
        };
        self.answered += 1;
        self.snapshot_pending = self.snapshot_after == Some(self.answered);
        let mut env = Env { boot: self.boot, manifest: &self.manifest, rng: &mut self.rng, init_realtime_ns: self.realtime_ns };
        let (hdr, body) = self.resp.split_at_mut(4);
        let mut w = Writer::new(body);
        functions::run(func, value, frame.len(), &mut env, &mut w);
        if w.overflow {
            w = Writer::new(body);
            w.raw(b"{\"error\":\"response too large\"}");
        }
        let n = w.len;
        hdr.copy_from_slice(&(n as u32).to_be_bytes());
        4 + n
    }

    /// Echo and sink connections accepted on the manifest's ports.
    fn step_listeners(&mut self) -> bool {
        let mut progress = false;
        for slot in 1..MAX_CONNS {
            let c = &self.vs.conns[slot];
            if c.state != State::Connected {
                continue;
            }
            match c.kind {
                KIND_ECHO => {
                    loop {
                        let c = &self.vs.conns[slot];
                        let n = c.rx.len.min(c.tx.free()).min(self.scratch.len());
                        if n == 0 {
                            break;
                        }
                        let got = self.vs.read(slot, &mut self.scratch[..n]);
                        self.vs.write(slot, &self.scratch[..got]);
                        progress = true;
                    }
                    let c = &self.vs.conns[slot];
                    if c.peer_shut & SHUT_SEND != 0 && c.rx.len == 0 {
                        self.vs.shutdown(slot);
                    }
                }
                KIND_SINK => {
                    let n = self.vs.discard(slot, usize::MAX);
                    if n > 0 {
                        self.vs.conns[slot].user += n as u64;
                        progress = true;
                    }
                    let c = &self.vs.conns[slot];
                    if c.peer_shut & SHUT_SEND != 0 && c.rx.len == 0 {
                        let mut buf = [0u8; 24];
                        let mut w = Writer::new(&mut buf);
                        let _ = write!(w, "{}", c.user);
                        let len = w.len;
                        self.vs.write(slot, &buf[..len]);
                        self.vs.shutdown(slot);
                        progress = true;
                    }
                }
                _ => {}
            }
        }
        progress
    }
}

/// Loads the function the manifest names.
pub fn load(manifest: &Manifest, have_appfs: bool) -> App {
    if !have_appfs || manifest.is_empty() {
        return App::Failed("empty appfs");
    }
    match manifest.get(b"fn") {
        None => App::Failed("no fn= line in the manifest"),
        Some(name) => match Func::by_name(name) {
            Some(f) => App::Loaded(f),
            None => App::Failed("unknown function"),
        },
    }
}

/// Prints the load result (the failure line tests grep).
pub fn report_load(app: &App, manifest: &Manifest) {
    match app {
        App::Loaded(_) => {
            let mut c = crate::serial::lock();
            c.write_bytes(b"testguest: app loaded: ");
            c.write_bytes(manifest.get(b"fn").unwrap_or(b"?"));
            c.write_bytes(b"\n");
        }
        App::Failed(why) => {
            let mut c = crate::serial::lock();
            c.write_bytes(b"testguest: app load failed: ");
            c.write_bytes(why.as_bytes());
            if *why == "unknown function" {
                c.write_bytes(b" ");
                c.write_bytes(manifest.get(b"fn").unwrap_or(b""));
            }
            c.write_bytes(b"\n");
        }
    }
}
