//! virtio-vsock (device id 19), emulated entirely in userspace with a hybrid
//! Unix-socket backend (there is no vhost-vsock on our hosts).
//!
//! The device has three queues — rx (0: device to driver), tx (1: driver to
//! device) and event (2) — and one config field, the guest's CID (le64 at
//! offset 0). Only stream sockets are offered (no feature bits besides
//! `VIRTIO_F_VERSION_1`).
//!
//! Guest connections to CID 2 port P reach the host Unix socket
//! `<uds_path>_P`; host programs reach guest ports through the listener at
//! `<uds_path>` with `CONNECT <port>\n` (answered `OK <host port>\n`). See
//! `muxer.rs` for the backend and `connection.rs` for the per-connection
//! protocol and flow control.
//!
//! Everything runs on the event-loop thread: queue notifications arrive
//! through [`VirtioDevice::queue_notify`], host sockets through one epoll fd
//! registered in [`VirtioDevice::init_backend`]. Descriptor chains and packet
//! headers are untrusted: they are parsed with `virtio-vsock`'s checked
//! parser, and a bad packet costs its connection an RST, never the VMM.

mod connection;
mod log_limit;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use virtio_vsock::packet::VsockPacket;

use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, BACKEND_EVENT_BASE, INT_USED_RING,
    TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use crate::vmm::memory::GuestMemoryMmap;
use crate::vmm::persist::Persist;
use connection::MAX_PKT_DATA;
use log_limit::LogLimiter;
use muxer::Muxer;
use packet::{Header, EVENT_TRANSPORT_RESET, HEADER_SIZE};

pub use connection::CONN_BUF_ALLOC;
pub use muxer::{MuxerError, MAX_CONNECTIONS};

/// Queue indexes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// The epoll data of the backend's fd in the event loop.
const BACKEND_TAG: u32 = BACKEND_EVENT_BASE as u32;

/// The lowest CID a guest may have (0: hypervisor, 1: local, 2: host).
pub const MIN_GUEST_CID: u64 = 3;
/// The highest: 0xffffffff is `VMADDR_CID_ANY`, and Linux keeps CIDs in 32
/// bits.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(
        "guest CID {0} is reserved: a guest CID must lie between {MIN_GUEST_CID} and \
         {MAX_GUEST_CID} (0, 1 and 2 are the hypervisor, local and host addresses)"
    )]
    ReservedCid(u64),
    #[error(transparent)]
    Backend(#[from] MuxerError),
}

/// The saved state of the vsock device. Connections are not saved: none
/// survives a snapshot, and restore tells the guest so with a
/// TRANSPORT_RESET event ([`Vsock::send_transport_reset`]). The CID comes
/// from the command line at restore (clones get their own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest CID at snapshot time (informational).
    pub guest_cid: u64,
    /// The driver corrupted a ring before the snapshot.
    pub broken: bool,
}

/// What the device holds between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    /// The driver corrupted a ring: the queues are left alone until reset.
    broken: bool,
}

/// Gives up on the queues after a fatal ring error.
fn fail(interrupt: &Interrupt, broken: &mut bool, what: std::fmt::Arguments<'_>) {
    log::error!("vsock: {what}; the device needs a reset");
    *broken = true;
    if let Err(e) = interrupt.signal_needs_reset() {
        log::error!("vsock: {e}");
    }
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// The next chain the driver made available on `queue`, or `Err` when the
/// ring is corrupt.
fn pop<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<Chain<'m>>, String> {
    match queue.iter(mem) {
        Ok(mut it) => Ok(it.next()),
        Err(e) => Err(e.to_string()),
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// A TRANSPORT_RESET event waits for an event-queue buffer.
    reset_event_pending: bool,
    /// Tx processing paused until queued RSTs reach the guest.
    tx_stalled: bool,
    log: LogLimiter,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host clients
    /// on the Unix socket `uds_path` (a stale socket file there is
    /// replaced; the file is removed again when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            active: None,
            reset_event_pending: false,
            tx_stalled: false,
            log: LogLimiter::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The listener's path; guest connections to port P go to `<path>_P`.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Live connections, both directions.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Lowers the connection bound (default and ceiling [`MAX_CONNECTIONS`]).
    pub fn set_max_connections(&mut self, max: usize) {
        self.muxer.set_max_connections(max);
    }

    /// Drops every connection and tells the guest with a
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET event, posted now if the driver
    /// has an event buffer available, else as soon as it offers one. Used
    /// after a snapshot restore: the guest's connections did not survive.
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset_connections();
        self.reset_event_pending = true;
        self.process_event_queue();
        let stalled = self.tx_stalled;
        self.run_queues(stalled);
    }

    /// Handles ready host sockets and timers, then feeds the guest.
    /// [`VirtioDevice::backend_event`] calls this.
    pub fn process_backend(&mut self) {
        self.muxer.process_events();
        self.run_queues(false);
    }

    /// Moves packets: the tx queue if asked (or stalled and able to go on),
    /// then the rx queue, until neither can make progress.
    fn run_queues(&mut self, mut tx: bool) {
        let Self {
            muxer,
            active,
            tx_stalled,
            log,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        // Each round either moves a tx chain or ends, so this terminates.
        loop {
            if tx || (*tx_stalled && muxer.can_take_guest_packet()) {
                *tx_stalled = process_tx(muxer, active, log);
            }
            process_rx(muxer, active, log);
            if !(*tx_stalled && muxer.can_take_guest_packet()) || active.broken {
                break;
            }
            tx = true;
        }
    }

    fn process_event_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            queues,
            interrupt,
            broken,
        } = active;
        let queue = &mut queues[EVENT_QUEUE];
        let mut used = false;
        while self.reset_event_pending && !*broken {
            let chain = match pop(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return fail(interrupt, broken, format_args!("event queue: {e}")),
            };
            let head = chain.head_index();
            let written = chain
                .writer(mem)
                .ok()
                .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).ok());
            let len = if written.is_some() {
                self.reset_event_pending = false;
                4
            } else {
                self.log.warn(format_args!(
                    "event buffer {head} has no room for an event; returned unused"
                ));
                0
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                return fail(interrupt, broken, format_args!("event queue: {e}"));
            }
            used = true;
        }
        if used {
            notify(queue, mem, interrupt, broken);
        }
    }
}

/// Takes packets off the tx queue. Returns whether it stopped because
/// queued RSTs must reach the guest first.
fn process_tx(muxer: &mut Muxer, active: &mut Active, log: &mut LogLimiter) -> bool {
    let Active {
        mem,
        queues,
        interrupt,
        broken,
    } = active;
    let queue = &mut queues[TX_QUEUE];
    let mut used = false;
    let mut stalled = false;
    while !*broken {
        if !muxer.can_take_guest_packet() {
            stalled = true;
            break;
        }
        let chain = match pop(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => break,
            Err(e) => {
                fail(interrupt, broken, format_args!("tx queue: {e}"));
                break;
            }
        };
        let head = chain.head_index();
        if head >= queue.size() {
            log.warn(format_args!(
                "tx: the driver made descriptor {head} available, beyond the queue size; skipped"
            ));
            continue;
        }
        handle_tx_chain(muxer, mem, chain, log);
        if let Err(e) = queue.add_used(&*mem, head, 0) {
            fail(interrupt, broken, format_args!("tx queue: {e}"));
            break;
        }
        used = true;
    }
    if used {
        notify(queue, mem, interrupt, broken);
    }
    stalled
}

fn handle_tx_chain(
    muxer: &mut Muxer,
    mem: &GuestMemoryMmap,
    mut chain: DescriptorChain<&GuestMemoryMmap>,
    log: &mut LogLimiter,
) {
    let copy = chain.clone();
    match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
        Ok(pkt) => muxer.on_guest_packet(&Header::from_packet(&pkt), pkt.data_slice()),
        Err(e) => match Header::peek(mem, copy) {
            Some(hdr) => {
                log.warn(format_args!(
                    "malformed guest packet from port {} to CID {} port {}: {e}; resetting",
                    hdr.src_port, hdr.dst_cid, hdr.dst_port
                ));
                muxer.on_malformed_packet(&hdr);
            }
            None => log.warn(format_args!("unreadable guest packet dropped: {e}")),
        },
    }
}

/// Fills rx buffers with whatever the backend has for the guest.
fn process_rx(muxer: &mut Muxer, active: &mut Active, log: &mut LogLimiter) {
    let Active {
        mem,
        queues,
        interrupt,
        broken,
    } = active;
    let queue = &mut queues[RX_QUEUE];
    let mut used = false;
    while muxer.has_pending_rx() && !*broken {
        let mut chain = match pop(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => break,
            Err(e) => {
                fail(interrupt, broken, format_args!("rx queue: {e}"));
                break;
            }
        };
        let head = chain.head_index();
        if head >= queue.size() {
            log.warn(format_args!(
                "rx: the driver made descriptor {head} available, beyond the queue size; skipped"
            ));
            continue;
        }
        let len = match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, u32::MAX) {
            Ok(mut pkt) => {
                let Some(hdr) = muxer.fill_rx(pkt.data_slice()) else {
                    // Nothing fits this buffer: leave it for later.
                    queue.go_to_previous_position();
                    break;
                };
                match pkt.set_header_from_raw(&hdr.to_bytes()) {
                    Ok(()) => HEADER_SIZE as u32 + hdr.len,
                    Err(e) => {
                        log.warn(format_args!("cannot write an rx header: {e}"));
                        0
                    }
                }
            }
            Err(e) => {
                log.warn(format_args!(
                    "rx buffer {head} is unusable ({e}); returned unused"
                ));
                0
            }
        };
        if let Err(e) = queue.add_used(&*mem, head, len) {
            fail(interrupt, broken, format_args!("rx queue: {e}"));
            break;
        }
        used = true;
    }
    if used {
        notify(queue, mem, interrupt, broken);
    }
}

fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt, broken: &mut bool) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => {
            if let Err(e) = interrupt.trigger(INT_USED_RING) {
                log::error!("vsock: {e}");
            }
        }
        Err(e) => fail(
            interrupt,
            broken,
            format_args!("cannot read used_event: {e}"),
        ),
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.debug(format_args!(
            "driver wrote {} bytes to read-only config offset {offset}; ignored",
            data.len()
        ));
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ActivateError::MissingFeatures(VIRTIO_F_VERSION_1));
        }
        if ctx.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::Backend(format!(
                "vsock needs {} queues, got {}",
                QUEUE_SIZES.len(),
                ctx.queues.len()
            )));
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
            broken: false,
        });
        // The transport notifies every queue right after activation, which
        // delivers whatever waited for buffers.
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset_connections();
        self.reset_event_pending = false;
        self.tx_stalled = false;
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.run_queues(false),
            TX_QUEUE => self.run_queues(true),
            EVENT_QUEUE => self.process_event_queue(),
            _ => self
                .log
                .warn(format_args!("notification for unknown queue {index}")),
        }
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        let events = Events::with_data_raw(self.muxer.epoll_fd(), BACKEND_TAG, EventSet::IN);
        if let Err(e) = ops.add(events) {
            log::error!(
                "vsock: cannot watch the sockets of {}: {e}",
                self.muxer.uds_path().display()
            );
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }

    fn backend_event(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() != BACKEND_TAG {
            self.log
                .warn(format_args!("event with unknown tag {:#x}", events.data()));
            return;
        }
        self.process_backend();
    }
}

impl Persist for Vsock {
    type State = VsockState;
    type Error = VsockError;

    fn save(&self) -> Result<VsockState, VsockError> {
        Ok(VsockState {
            guest_cid: self.guest_cid,
            broken: self.active.as_ref().is_some_and(|a| a.broken),
        })
    }

    /// Applies `s` to a device built from the command line (after
    /// `activate` with the restored queues if it was running), then tells
    /// the guest that no connection survived: its agent reconnects.
    fn restore(&mut self, s: &VsockState) -> Result<(), VsockError> {
        if let Some(active) = &mut self.active {
            active.broken = s.broken;
        }
        self.send_transport_reset();
        Ok(())
    }
}
