//! virtio 1.x devices on the MMIO transport.
//!
//! A device implements [`VirtioDevice`]; the transport (`mmio`) owns the
//! register state machine, feature negotiation and the queues' setup, and
//! hands the device its queues when the driver sets DRIVER_OK. Queue
//! notifications (ioeventfds) and backend fds are dispatched to the device on
//! the event-loop thread.
//!
//! Snapshots: the transport saves its registers and, for a running device,
//! the queue positions ([`QueueState`]); each device saves its own typed
//! state through [`Persist`](crate::vmm::persist::Persist) beside its code.
//! Restore builds the device afresh from the command line, the transport
//! activates it with the restored queues, then the device applies its
//! state. [`DeviceState`] is the tagged form of a device's state in
//! `snapshot.json`; the device list (`vmm::devices`) pairs each tag with
//! its device once, at load.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use event_manager::{EventOps, Events};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::super::memory::GuestMemoryMmap;

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

/// Device ids (virtio 1.x, 5 "Device Types").
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// Transport feature bits every device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Event data tags below this value are queue indexes; devices tag their
/// own backend fds with values at or above it.
pub const BACKEND_EVENT_BASE: u64 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("cannot signal the guest interrupt: {0}")]
    Signal(std::io::Error),
}

/// A device's interrupt line: an irqfd into the in-kernel IOAPIC plus the
/// virtio-mmio InterruptStatus register it is raised for, and the device's
/// DEVICE_NEEDS_RESET flag (a fatal device error the transport reports in
/// the Status register).
pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
    needs_reset: AtomicBool,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            irqfd,
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status bits and raises the line.
    pub fn trigger(&self, bits: u32) -> Result<(), InterruptError> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1).map_err(InterruptError::Signal)
    }

    /// A fatal device error (e.g. the driver corrupted a ring): the device
    /// stops using its queues and calls this; the transport then reports
    /// DEVICE_NEEDS_RESET in Status until the driver resets the device, and
    /// the driver is told through a configuration-change interrupt
    /// (virtio 1.x, 2.1.2). Callable from any thread.
    pub fn signal_needs_reset(&self) -> Result<(), InterruptError> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.trigger(INT_CONFIG_CHANGE)
    }

    /// Whether the device reported a fatal error since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Device reset (transport only): clears InterruptStatus and the
    /// DEVICE_NEEDS_RESET flag.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Snapshot restore: puts back InterruptStatus and DEVICE_NEEDS_RESET
    /// without raising the line (the interrupt controller's own state,
    /// restored by KVM, holds whatever was pending).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }
}

/// A queue's saved state: [`QueueState`] in serializable form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePersist {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueuePersist {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueuePersist> for QueueState {
    fn from(q: QueuePersist) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio device's own saved state as `snapshot.json` holds it (its
/// transport saves the rest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceState {
    Block(block::BlockState),
    Vsock(vsock::VsockState),
    Net(net::NetState),
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: std::sync::Arc<Interrupt>,
    /// Features the driver accepted (a subset of `device_features`).
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver did not accept required feature bits {0:#x}")]
    MissingFeatures(u64),
    #[error("device activation failed: {0}")]
    Backend(String),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// virtio device id ([`TYPE_BLOCK`], [`TYPE_VSOCK`], [`net::TYPE_NET`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver, transport bits included.
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space; bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Takes the queues when the driver sets DRIVER_OK.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Device reset by the driver: drop the queues and any in-flight state.
    /// Called only after `activate` was called (whether it succeeded or not).
    fn reset(&mut self);
    /// Event-loop thread: queue `index` was notified by the driver. Called
    /// only between a successful `activate` and the next `reset` (the
    /// transport drains and drops earlier notifications), and once for
    /// every queue right after activation, so buffers the driver made
    /// available before DRIVER_OK are not missed. A fatal error (a corrupt
    /// ring) is reported with [`Interrupt::signal_needs_reset`].
    fn queue_notify(&mut self, index: usize);
    /// Event-loop thread, once at start: register backend fds (tagged with
    /// data ≥ [`BACKEND_EVENT_BASE`]).
    fn init_backend(&mut self, _ops: &mut EventOps) {}
    /// Event-loop thread: a backend fd registered by the device is ready.
    fn backend_event(&mut self, _events: Events, _ops: &mut EventOps) {}
    /// The ConfigGeneration register: a counter the device bumps (wrapping)
    /// whenever it changes its configuration space on its own, e.g. a new
    /// disk capacity, so a driver reading a multi-field config sees a
    /// consistent snapshot (virtio 1.x, 2.5.1). Devices whose config never
    /// changes keep the default. A device that bumps it after activation
    /// also raises [`INT_CONFIG_CHANGE`].
    fn config_generation(&self) -> u32 {
        0
    }
    /// Snapshot: the positions of the queues the device holds (empty when
    /// it is not activated). The device's own state is its `Persist` impl.
    fn queue_states(&self) -> Vec<QueueState>;
}
