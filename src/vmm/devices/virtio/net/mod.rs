//! virtio-net device (virtio 1.x, 5.1) with one receive and one transmit
//! queue, backed by a TAP interface ([`tap`]). Features: `VERSION_1` and
//! `MAC` only — no offloads, no mergeable receive buffers, no control
//! queue — so every frame is a 12-byte header followed by one Ethernet
//! frame, in one descriptor chain.
//!
//! Both directions run on the event-loop thread; descriptor chains are
//! untrusted guest input:
//! - tx (queue 1): a chain is read-only descriptors inside guest memory,
//!   12 to [`MAX_FRAME_LEN`] bytes in all. It is gathered into a buffer of
//!   that fixed size and written to the TAP with a zeroed header (no
//!   offload was negotiated, so the guest's header flags mean nothing);
//!   a malformed chain or a full TAP drops the frame. Every chain is
//!   returned used with length 0.
//! - rx (queue 0): a frame read from the TAP waits in a fixed buffer until
//!   the guest offers a chain of writable descriptors that holds it; the
//!   header is written zeroed with `num_buffers` = 1 (5.1.6.4). A chain
//!   with a read-only or out-of-memory descriptor is returned used with
//!   length 0 and the frame waits for the next; a well-formed chain too
//!   short for the frame is returned used with length 0 and the frame is
//!   dropped. While the guest offers no buffer the TAP is taken out of the
//!   event loop (it stays readable, so polling it would spin) and put back
//!   when the guest notifies the rx queue.
//! - chains longer than [`MAX_DESCRIPTORS`], looping, or pointing past the
//!   queue are malformed; an available index more than a queue ahead (a
//!   corrupt ring) marks the device broken until reset, as virtio-blk does
//!   (DEVICE_NEEDS_RESET).
//! - each wake-up serves at most [`MAX_CHAINS_PER_RUN`] chains per queue:
//!   the rest of tx is resumed through the device's own eventfd, the rest
//!   of rx by the still-readable TAP, so a guest cannot hold the event
//!   loop.
//!
//! Snapshots save the MAC and the broken flag; a frame waiting for a
//! buffer is dropped (the network may lose frames). Restore opens the TAP
//! named on the command line and keeps the snapshot's MAC, unless another
//! one was given: that one is taken and announced as a configuration
//! change.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, BACKEND_EVENT_BASE, INT_CONFIG_CHANGE,
    INT_USED_RING, VIRTIO_F_VERSION_1,
};
pub use crate::vmm::config::TapSource;
use crate::vmm::memory::GuestMemoryMmap;
use crate::vmm::persist::Persist;

pub mod tap;

/// virtio device id of a network card (virtio 1.x, 5).
pub const TYPE_NET: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes (5.1.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Longest frame either way, header included: a 64 KiB IP packet in an
/// Ethernet frame with a VLAN tag (65535 + 14 + 4) and the 12-byte header
/// — what a driver that negotiated no offload can be given or send.
pub const MAX_FRAME_LEN: usize = 65562;
/// Longest chain looked at; anything longer (possible only through
/// indirect tables) is malformed.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Chains served per queue per wake-up before yielding the event loop.
pub const MAX_CHAINS_PER_RUN: usize = 4 * QUEUE_SIZE as usize;
/// The MAC when none is given: locally administered, unicast.
pub const DEFAULT_MAC: Mac = Mac([0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);
/// Event data of the resume eventfd and of the TAP.
const RESUME_EVENT: u32 = BACKEND_EVENT_BASE as u32;
const TAP_EVENT: u32 = BACKEND_EVENT_BASE as u32 + 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("invalid MAC address {0:?}: expected six hex bytes separated by ':', e.g. 06:00:ac:10:00:02, not multicast")]
    Mac(String),
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mac(pub [u8; 6]);

impl std::str::FromStr for Mac {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::Mac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        // The guest's own address cannot be a group address.
        if parts.next().is_some() || out[0] & 1 != 0 {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The saved state of a network device; the TAP is not saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC the driver last saw.
    pub mac: Mac,
    pub config_generation: u32,
    /// The driver corrupted a queue before the snapshot.
    pub broken: bool,
    /// The TAP served at snapshot time (informational).
    pub tap: String,
}

/// State that exists between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    /// The driver corrupted a queue; nothing is processed until reset.
    broken: bool,
}

/// How a receive run ended.
#[derive(Debug, PartialEq, Eq)]
enum RxEnd {
    /// The TAP has no more frames.
    Drained,
    /// A frame waits for a guest buffer: stop polling the TAP.
    NoBuffers,
    /// [`MAX_CHAINS_PER_RUN`] reached; the TAP is still readable.
    Yielded,
    /// Not activated, or broken: stop polling the TAP.
    Idle,
}

/// A virtio-net device.
pub struct Net {
    tap: Tap,
    mac: Mac,
    /// The MAC came from the command line (restore keeps it).
    mac_given: bool,
    config_generation: u32,
    queue_max_sizes: [u16; 2],
    active: Option<Active>,
    /// The frame read from the TAP that waits for a guest buffer, with its
    /// length; reused for every frame, rx and tx.
    rx_frame: Box<[u8]>,
    rx_len: Option<usize>,
    tx_frame: Box<[u8]>,
    /// Whether the TAP is in the event loop's interest list.
    tap_polled: bool,
    /// Written to run the queues again from the event loop (a tx run that
    /// yielded, an rx notification). `None` until the event loop
    /// registered it.
    resume: Option<EventFd>,
    /// Frames dropped (full TAP, malformed chain, too small a buffer).
    dropped: u64,
}

/// Why a chain was refused.
type Malformed = &'static str;

/// Reads a chain's descriptors: at most [`MAX_DESCRIPTORS`], ending
/// without "next" (the chain iterator stops early on loops and bad
/// indexes), each non-empty, of the direction wanted, inside guest
/// memory. Returns them and their total length.
fn collect_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    descs: &mut Vec<Descriptor>,
) -> Result<u64, Malformed> {
    descs.clear();
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return Err("more descriptors than allowed");
        }
        descs.push(d);
    }
    if descs.last().is_none_or(|d| d.has_next()) {
        return Err("broken chain (loop, bad index or unreadable indirect table)");
    }
    let mut total = 0u64;
    for d in descs.iter() {
        if d.is_write_only() != writable {
            return Err(if writable {
                "read-only descriptor in a receive buffer"
            } else {
                "device-writable descriptor in a frame to send"
            });
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err("descriptor outside guest memory");
        }
        total += u64::from(d.len());
    }
    Ok(total)
}

impl Net {
    /// A network card on the TAP `tap` with address `mac`, or
    /// [`DEFAULT_MAC`] (or at restore, the snapshot's) when none is given.
    pub fn new(tap: &TapSource, mac: Option<Mac>) -> Result<Self, NetError> {
        let tap = match tap {
            TapSource::Name(name) => Tap::open(name)?,
            TapSource::Fd(fd) => Tap::from_fd(*fd)?,
        };
        Ok(Self {
            tap,
            mac: mac.unwrap_or(DEFAULT_MAC),
            mac_given: mac.is_some(),
            config_generation: 0,
            queue_max_sizes: [QUEUE_SIZE; 2],
            active: None,
            rx_frame: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            rx_len: None,
            tx_frame: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            tap_polled: false,
            resume: None,
            dropped: 0,
        })
    }

    pub fn mac(&self) -> Mac {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Frames dropped since the device was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn fatal(active: &mut Active, what: &str) {
        error!("virtio-net: {what}; the device needs a reset");
        active.broken = true;
        if let Err(e) = active.interrupt.signal_needs_reset() {
            error!("virtio-net: {e}");
        }
    }

    fn notify_guest(active: &mut Active, queue: usize) {
        let q = if queue == RX_QUEUE {
            &mut active.rx
        } else {
            &mut active.tx
        };
        match q.needs_notification(&active.mem) {
            Ok(true) => {
                if let Err(e) = active.interrupt.trigger(INT_USED_RING) {
                    error!("virtio-net: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => Self::fatal(active, &format!("cannot read used_event: {e}")),
        }
    }

    /// Sends every frame the guest made available on the tx queue; returns
    /// whether the run stopped at [`MAX_CHAINS_PER_RUN`].
    fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return false;
        };
        let mut descs = Vec::new();
        let mut served = 0usize;
        let mut yielded = false;
        loop {
            if served == MAX_CHAINS_PER_RUN {
                yielded = true;
                break;
            }
            let chain = match active.tx.iter(&active.mem) {
                Ok(mut chains) => match chains.next() {
                    Some(chain) => chain,
                    None => break,
                },
                Err(e) => {
                    Self::fatal(active, &format!("the tx available ring is corrupt ({e})"));
                    return false;
                }
            };
            served += 1;
            let head = chain.head_index();
            if head >= active.tx.size() {
                warn!("virtio-net: tx descriptor {head} is beyond the queue size; skipped");
                continue;
            }
            if let Err(why) = Self::send(
                &self.tap,
                &active.mem,
                chain,
                &mut descs,
                &mut self.tx_frame,
            ) {
                self.dropped += 1;
                debug!("virtio-net: tx frame dropped: {why}");
            }
            if let Err(e) = active.tx.add_used(&active.mem, head, 0) {
                Self::fatal(active, &format!("cannot return a tx chain: {e}"));
                return false;
            }
        }
        if served > 0 {
            Self::notify_guest(active, TX_QUEUE);
        }
        yielded
    }

    /// Gathers one tx chain into `frame` and writes it to the TAP.
    fn send(
        tap: &Tap,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        descs: &mut Vec<Descriptor>,
        frame: &mut [u8],
    ) -> Result<(), String> {
        let total = collect_chain(mem, chain, false, descs)?;
        if total < VNET_HDR_LEN as u64 {
            return Err(format!("{total} bytes, shorter than the header"));
        }
        if total > MAX_FRAME_LEN as u64 {
            return Err(format!("{total} bytes, longer than {MAX_FRAME_LEN}"));
        }
        let len = total as usize;
        let mut at = 0;
        for d in descs.iter() {
            let n = d.len() as usize;
            mem.read_slice(&mut frame[at..at + n], d.addr())
                .map_err(|e| format!("cannot read the frame: {e}"))?;
            at += n;
        }
        frame[..VNET_HDR_LEN].fill(0);
        match tap.write_frame(&frame[..len]) {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("TAP write: {e}")),
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers.
    fn process_rx(&mut self) -> RxEnd {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return RxEnd::Idle;
        };
        let mut descs = Vec::new();
        let mut completed = 0usize;
        let mut end = RxEnd::Yielded;
        for _ in 0..MAX_CHAINS_PER_RUN {
            let len = match self.rx_len {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n >= VNET_HDR_LEN => n,
                    Ok(n) => {
                        warn!("virtio-net: {n}-byte read from the TAP, shorter than the header; dropped");
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        end = RxEnd::Drained;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error!("virtio-net: cannot read TAP {}: {e}", self.tap.name());
                        end = RxEnd::Drained;
                        break;
                    }
                },
            };
            self.rx_len = Some(len);
            let chain = match active.rx.iter(&active.mem) {
                Ok(mut chains) => chains.next(),
                Err(e) => {
                    Self::fatal(active, &format!("the rx available ring is corrupt ({e})"));
                    return RxEnd::Idle;
                }
            };
            let Some(chain) = chain else {
                end = RxEnd::NoBuffers;
                break;
            };
            let head = chain.head_index();
            if head >= active.rx.size() {
                warn!("virtio-net: rx descriptor {head} is beyond the queue size; skipped");
                continue;
            }
            let used = match collect_chain(&active.mem, chain, true, &mut descs) {
                Err(why) => {
                    debug!("virtio-net: rx chain returned unused: {why}");
                    0
                }
                Ok(room) if room < len as u64 => {
                    debug!("virtio-net: {len}-byte frame dropped: the rx chain holds {room}");
                    self.dropped += 1;
                    self.rx_len = None;
                    0
                }
                Ok(_) => {
                    self.rx_len = None;
                    Self::deliver(&active.mem, &descs, &mut self.rx_frame[..len])
                }
            };
            if let Err(e) = active.rx.add_used(&active.mem, head, used) {
                Self::fatal(active, &format!("cannot return an rx chain: {e}"));
                return RxEnd::Idle;
            }
            completed += 1;
        }
        if completed > 0 {
            Self::notify_guest(active, RX_QUEUE);
        }
        if end == RxEnd::NoBuffers {
            // The driver kicks the queue when it adds buffers, unless told
            // not to: make sure it is told to (no EVENT_IDX: the flag).
            if let Err(e) = active.rx.enable_notification(&active.mem) {
                Self::fatal(
                    active,
                    &format!("cannot update the rx used ring flags: {e}"),
                );
                return RxEnd::Idle;
            }
        }
        end
    }

    /// Writes a frame (header first, rewritten) into checked writable
    /// descriptors that hold it; returns the used length.
    fn deliver(mem: &GuestMemoryMmap, descs: &[Descriptor], frame: &mut [u8]) -> u32 {
        frame[..VNET_HDR_LEN].fill(0);
        // num_buffers: one chain per frame without MRG_RXBUF (5.1.6.4).
        frame[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        let mut rest: &[u8] = frame;
        for d in descs {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(d.len() as usize);
            if let Err(e) = mem.write_slice(&rest[..n], d.addr()) {
                warn!("virtio-net: cannot write a received frame: {e}");
                return 0;
            }
            rest = &rest[n..];
        }
        // At most MAX_FRAME_LEN.
        frame.len() as u32
    }

    /// Runs rx and keeps the TAP in the event loop only while frames can
    /// move (a readable TAP with nowhere to put its frame would spin).
    fn run_rx(&mut self, ops: &mut EventOps) {
        let end = self.process_rx();
        let want = !matches!(end, RxEnd::NoBuffers | RxEnd::Idle);
        if want == self.tap_polled {
            return;
        }
        let events = Events::with_data(&self.tap, TAP_EVENT, EventSet::IN);
        let r = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match r {
            Ok(()) => self.tap_polled = want,
            Err(e) => error!("virtio-net: cannot change the polling of the TAP: {e}"),
        }
    }

    fn config_bytes(&self) -> [u8; 6] {
        self.mac.0
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only in virtio 1.x (5.1.4.2).
        debug!(
            "virtio-net: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let n = ctx.queues.len();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx), None) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::Backend(format!(
                "virtio-net has 2 queues, the transport gave {n}"
            )));
        };
        self.active = Some(Active {
            mem: ctx.mem,
            rx,
            tx,
            interrupt: ctx.interrupt,
            broken: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = None;
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            TX_QUEUE => {
                if self.process_tx() {
                    self.schedule();
                }
            }
            // New receive buffers: the TAP may have to be polled again,
            // which only the event loop's own callback can do.
            RX_QUEUE => self.schedule(),
            _ => debug!("virtio-net: notification of absent queue {index} ignored"),
        }
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        let registered = EventFd::new(EFD_NONBLOCK).and_then(|fd| {
            ops.add(Events::with_data(&fd, RESUME_EVENT, EventSet::IN))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(fd)
        });
        match registered {
            Ok(fd) => self.resume = Some(fd),
            Err(e) => error!("virtio-net: no resume eventfd ({e}); receive buffers are found only when frames arrive"),
        }
        match ops.add(Events::with_data(&self.tap, TAP_EVENT, EventSet::IN)) {
            Ok(()) => self.tap_polled = true,
            Err(e) => error!("virtio-net: cannot poll TAP {}: {e}", self.tap.name()),
        }
    }

    fn backend_event(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == RESUME_EVENT {
            if let Some(fd) = &self.resume {
                // Drain it: one run serves everything pending.
                let _ = fd.read();
            }
            if self.process_tx() {
                self.schedule();
            }
        }
        self.run_rx(ops);
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|a| [a.rx.state(), a.tx.state()])
            .collect()
    }
}

impl Net {
    /// Asks the event loop to run the queues again.
    fn schedule(&self) {
        if let Some(fd) = &self.resume {
            if let Err(e) = fd.write(1) {
                error!("virtio-net: cannot schedule the queues: {e}");
            }
        }
    }
}

impl Persist for Net {
    type State = NetState;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState {
            mac: self.mac,
            config_generation: self.config_generation,
            broken: self.active.as_ref().is_some_and(|a| a.broken),
            tap: self.tap.name().to_owned(),
        })
    }

    /// Applies `s` to a device built from the command line, after
    /// `activate` with the restored queues if it was running. The
    /// snapshot's MAC is kept unless another was given; that one is
    /// announced to the driver.
    fn restore(&mut self, s: &NetState) -> Result<(), NetError> {
        self.config_generation = s.config_generation;
        if let Some(active) = &mut self.active {
            active.broken = s.broken;
        }
        if !self.mac_given {
            self.mac = s.mac;
        } else if s.mac != self.mac {
            debug!("virtio-net: MAC {} at snapshot, {} now", s.mac, self.mac);
            self.config_generation = self.config_generation.wrapping_add(1);
            if let Some(active) = &self.active {
                if let Err(e) = active.interrupt.trigger(INT_CONFIG_CHANGE) {
                    error!("virtio-net: cannot announce the new MAC: {e}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
