//! virtio-mmio transport, modern register layout (version 2), as Linux's
//! `virtio_mmio` driver and the virtio 1.x spec (4.2.2) define it.
//!
//! The transport owns the register state machine: feature negotiation, the
//! device status sequence (ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK),
//! the queue configuration registers and InterruptStatus/ACK. When the driver
//! sets DRIVER_OK it builds the queues, checks them against guest memory and
//! hands them to the device ([`VirtioDevice::activate`]).
//!
//! Threads: the transport sits on the MMIO bus behind a mutex and is driven
//! by vCPU threads. The device sits behind its own mutex, shared with the
//! event-loop subscriber ([`register`]) that turns queue ioeventfds into
//! [`VirtioDevice::queue_notify`] calls, so a guest reading InterruptStatus
//! never waits for device I/O. Lock order: transport, then device.
//!
//! A guest can write anything to these registers: invalid writes are ignored
//! and logged (the first status-order violation at `warn`, the rest at
//! `debug`); nothing here panics on guest input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateContext, Interrupt, QueuePersist, VirtioDevice, BACKEND_EVENT_BASE, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::vmm::bus::{lock, Bus, BusDevice, BusError};
use crate::vmm::event_loop::{EventManager, Subscriber};
use crate::vmm::layout;
use crate::vmm::memory::GuestMemoryMmap;

/// A virtio device shared between its transport (vCPU threads) and the
/// event loop. Keep a typed clone (`Arc<Mutex<Block>>`) to reach
/// device-specific methods after registration.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

/// "virt", little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID register ("SNAP"); drivers do not check it.
pub const MMIO_VENDOR_ID: u32 = 0x5041_4e53;

/// Register offsets (virtio 1.x, 4.2.2).
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// The order in which the driver sets the status bits.
const STATUS_SEQUENCE: [u32; 4] = [
    status::ACKNOWLEDGE,
    status::DRIVER,
    status::FEATURES_OK,
    status::DRIVER_OK,
];

/// IOAPIC input pins; a GSI must be below this.
const IOAPIC_PINS: u32 = 24;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error(
        "virtio-mmio slot {slot} does not exist: a VM has at most {max} virtio-mmio devices \
         (GSI {first_gsi}..{last_gsi} and a 4 KiB window each from {start:#x})",
        max = max_slots(),
        first_gsi = layout::VIRTIO_IRQ_BASE,
        last_gsi = IOAPIC_PINS - 1,
        start = layout::VIRTIO_MMIO_START
    )]
    Slot { slot: u32 },
    #[error(
        "virtio device queue {index} has maximum size {size}; it must be a power of two \
         between 1 and 32768 (a bug in the device model)"
    )]
    QueueSize { index: usize, size: u16 },
    #[error("cannot create an eventfd for a virtio-mmio device: {0}")]
    EventFd(std::io::Error),
    #[error("cannot register the interrupt eventfd for GSI {gsi} (the in-kernel irqchip must be created first): {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot register the notification eventfd of queue {queue} at {addr:#x}: {source}")]
    Ioeventfd {
        queue: usize,
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot place the virtio-mmio device on the MMIO bus: {0}")]
    Bus(BusError),
    #[error("cannot restore virtio-mmio device type {device_type}: {reason}")]
    Restore { device_type: u32, reason: String },
}

/// Number of virtio-mmio slots: limited by the IOAPIC pins left above
/// [`layout::VIRTIO_IRQ_BASE`] (the MMIO window itself has room for more).
pub const fn max_slots() -> u32 {
    IOAPIC_PINS - layout::VIRTIO_IRQ_BASE
}

/// Guest-physical base address and GSI of the device in `slot`.
pub fn slot_location(slot: u32) -> Result<(u64, u32), MmioError> {
    if slot >= max_slots() {
        return Err(MmioError::Slot { slot });
    }
    let base = layout::VIRTIO_MMIO_START + u64::from(slot) * layout::VIRTIO_MMIO_SIZE;
    Ok((base, layout::VIRTIO_IRQ_BASE + slot))
}

/// The queue registers as the driver wrote them. Queues are built from this
/// (and checked) only at DRIVER_OK, so a half-written address or a bad size
/// is caught there rather than silently half-applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    /// QueueNum as written (0 until the driver writes it means "max_size").
    pub size: u32,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ..Default::default()
        }
    }

    /// Builds the queue the device will use, or says why it cannot.
    fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        let size = u16::try_from(self.size).map_err(|_| format!("size {}", self.size))?;
        q.try_set_size(size)
            .map_err(|e| format!("size {size} (max {}): {e}", self.max_size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|e| format!("descriptor table {:#x}: {e}", self.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|e| format!("available ring {:#x}: {e}", self.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|e| format!("used ring {:#x}: {e}", self.used_ring))?;
        q.set_event_idx(event_idx);
        q.set_ready(self.ready);
        if self.ready && !q.is_valid(mem) {
            return Err(format!(
                "rings outside guest memory (desc {:#x}, avail {:#x}, used {:#x}, size {size})",
                self.desc_table, self.avail_ring, self.used_ring
            ));
        }
        Ok(q)
    }
}

/// The saved state of one virtio-mmio transport: its registers and the
/// queue positions of a running device (the device saves its own state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub status: u32,
    pub queue_sel: u32,
    pub queues: Vec<QueueConfig>,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub activate_called: bool,
    pub activated: bool,
    /// The device's queues as it held them (running devices only).
    pub active_queues: Vec<QueuePersist>,
}

/// The virtio-mmio register block of one device.
pub struct MmioTransport {
    device: SharedDevice,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// One per queue; written by KVM (ioeventfd) or, for a notification that
    /// reaches the bus, by the transport itself.
    queue_evts: Vec<EventFd>,
    /// Set (under the device lock) between a successful activation and reset.
    activated: Arc<AtomicBool>,
    /// `activate` was called since the last reset (so `reset` is due).
    activate_called: bool,

    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    /// A status-order violation was logged at `warn` already.
    warned_status: bool,
}

impl MmioTransport {
    /// A transport for `device` over `mem`, raising `interrupt`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: SharedDevice,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, max_sizes) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.device_features(),
                d.queue_max_sizes().to_vec(),
            )
        };
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            Queue::new(size).map_err(|_| MmioError::QueueSize { index, size })?;
            queues.push(QueueConfig::new(size));
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            activated: Arc::new(AtomicBool::new(false)),
            activate_called: false,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            queue_sel: 0,
            queues,
            warned_status: false,
        })
    }

    pub fn device(&self) -> &SharedDevice {
        &self.device
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The queue notification eventfds, by queue index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Features the driver has written so far (final once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the device runs (DRIVER_OK accepted and activation succeeded).
    pub fn is_activated(&self) -> bool {
        self.activated.load(Ordering::SeqCst)
    }

    /// The queue registers as written by the driver.
    pub fn queue_configs(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// Snapshot: the transport's registers and the device's queues. The
    /// device must be quiescent (vCPUs and event loop paused).
    pub fn save_state(&self) -> TransportState {
        let dev = lock(&self.device);
        TransportState {
            device_type: self.device_type,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            status: self.status,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            activate_called: self.activate_called,
            activated: self.is_activated(),
            active_queues: dev.queue_states().into_iter().map(Into::into).collect(),
        }
    }

    /// Restore into a freshly built transport (power-on state) whose
    /// device was built from the command line: registers, then, for a
    /// device that was running, activation with the saved queues; the
    /// device's own state is applied next by its owner. Every queue is
    /// kicked so buffers the driver made available before the snapshot are
    /// picked up once the event loop runs. A state that does not fit this
    /// device, or queues outside guest memory, is an error; nothing is
    /// activated then.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), MmioError> {
        let device_type = self.device_type;
        let fail = move |reason: String| MmioError::Restore {
            device_type,
            reason,
        };
        if s.device_type != self.device_type {
            return Err(fail(format!(
                "the snapshot holds a device of type {} in this slot",
                s.device_type
            )));
        }
        let sizes = |q: &[QueueConfig]| q.iter().map(|c| c.max_size).collect::<Vec<_>>();
        if sizes(&s.queues) != sizes(&self.queues) {
            return Err(fail(format!(
                "queue sizes {:?} in the snapshot, {:?} here",
                sizes(&s.queues),
                sizes(&self.queues)
            )));
        }
        let mut queues = Vec::new();
        if s.activated {
            if s.active_queues.len() != self.queues.len() {
                return Err(fail(format!(
                    "{} running queues saved for a device with {}",
                    s.active_queues.len(),
                    self.queues.len()
                )));
            }
            for (i, q) in s.active_queues.iter().enumerate() {
                let queue = Queue::try_from(QueueState::from(*q))
                    .map_err(|e| fail(format!("queue {i}: {e}")))?;
                if queue.ready() && !queue.is_valid(&self.mem) {
                    return Err(fail(format!("queue {i} lies outside guest memory")));
                }
                queues.push(queue);
            }
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.status = s.status;
        self.queue_sel = s.queue_sel;
        self.queues = s.queues.clone();
        self.interrupt.restore(s.interrupt_status, s.needs_reset);
        self.activate_called = s.activate_called;
        let mut dev = lock(&self.device);
        if s.activated {
            dev.activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                acked_features: self.acked_features,
            })
            .map_err(|e| fail(e.to_string()))?;
            self.activated.store(true, Ordering::SeqCst);
        }
        drop(dev);
        if s.activated {
            for (i, evt) in self.queue_evts.iter().enumerate() {
                if let Err(e) = evt.write(1) {
                    error!("virtio-mmio: cannot kick queue {i} after restore: {e}");
                }
            }
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device_type,
            regs::VENDOR_ID => MMIO_VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status(),
            // No shared memory regions: a length/base of all ones says so.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            regs::CONFIG_GENERATION => lock(&self.device).config_generation(),
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x} ignored");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => self.write_driver_features(v),
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_register(offset, v),
            regs::QUEUE_NOTIFY => self.notify_from_bus(v),
            regs::INTERRUPT_ACK => self.interrupt.ack(v),
            regs::STATUS => self.write_status(v),
            regs::SHM_SEL => {}
            _ => debug!(
                "virtio-mmio: write of {v:#x} to read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features are written after DRIVER and frozen by FEATURES_OK.
        if self.status & status::DRIVER == 0
            || self.status & (status::FEATURES_OK | status::FAILED) != 0
        {
            debug!(
                "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel if v != 0 => {
                debug!("virtio-mmio: driver accepts features {v:#x} in unknown word {sel}; ignored")
            }
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, v: u32) {
        if self.status & (status::DRIVER_OK | status::FAILED) != 0 {
            debug!(
                "virtio-mmio: queue register {offset:#x} write in status {:#x} ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            debug!("virtio-mmio: queue register {offset:#x} write for absent queue {sel} ignored");
            return;
        };
        let lo = |x: u64| (x & !0xffff_ffff) | u64::from(v);
        let hi = |x: u64| (x & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            regs::QUEUE_NUM => q.size = v,
            regs::QUEUE_READY => q.ready = v == 1,
            regs::QUEUE_DESC_LOW => q.desc_table = lo(q.desc_table),
            regs::QUEUE_DESC_HIGH => q.desc_table = hi(q.desc_table),
            regs::QUEUE_DRIVER_LOW => q.avail_ring = lo(q.avail_ring),
            regs::QUEUE_DRIVER_HIGH => q.avail_ring = hi(q.avail_ring),
            regs::QUEUE_DEVICE_LOW => q.used_ring = lo(q.used_ring),
            regs::QUEUE_DEVICE_HIGH => q.used_ring = hi(q.used_ring),
            _ => {}
        }
    }

    /// A QueueNotify write that reached the bus (no ioeventfd registered, or
    /// one that did not match): forwarded to the same eventfd.
    fn notify_from_bus(&self, v: u32) {
        match self.queue_evts.get(v as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    error!("virtio-mmio: cannot signal queue {v}: {e}");
                }
            }
            None => debug!("virtio-mmio: notification of absent queue {v} ignored"),
        }
    }

    fn status_violation(&mut self, v: u32) {
        if self.warned_status {
            debug!(
                "virtio-mmio: status write {v:#x} out of order (status {:#x}); ignored",
                self.status
            );
        } else {
            self.warned_status = true;
            warn!(
                "virtio-mmio (device type {}): the driver wrote status {v:#x} out of order \
                 (status {:#x}); ignored. Further violations are logged at debug level.",
                self.device_type, self.status
            );
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if self.status & status::FAILED != 0 {
            debug!("virtio-mmio: status write {v:#x} after FAILED ignored until reset");
            return;
        }
        // A driver that adds a bit reads Status and writes it back with the
        // bit set, echoing DEVICE_NEEDS_RESET if we report it.
        let v = if self.interrupt.needs_reset() {
            v & !status::DEVICE_NEEDS_RESET
        } else {
            v
        };
        if v & status::FAILED != 0 {
            warn!(
                "virtio-mmio: the driver gave up on device type {} (status {v:#x})",
                self.device_type
            );
            self.status |= status::FAILED;
            return;
        }
        let cur = self.status;
        // The driver may re-write what it has, and add the next steps of the
        // sequence (one or more, in order); anything else is a violation.
        if v & cur != cur || v & status::DEVICE_NEEDS_RESET != 0 {
            return self.status_violation(v);
        }
        let added = v & !cur;
        if added == 0 {
            return;
        }
        let done = STATUS_SEQUENCE
            .iter()
            .take_while(|&&b| cur & b != 0)
            .count();
        let mut expected = 0;
        let mut last = done;
        for (i, bit) in STATUS_SEQUENCE.iter().enumerate().skip(done) {
            expected |= bit;
            if expected == added {
                last = i + 1;
                break;
            }
        }
        if expected != added || last == done {
            return self.status_violation(v);
        }
        for &bit in &STATUS_SEQUENCE[done..last] {
            match bit {
                status::FEATURES_OK if !self.features_ok() => return,
                status::DRIVER_OK => self.activate(),
                _ => {}
            }
            self.status |= bit;
        }
    }

    /// Checks the driver's feature choice before accepting FEATURES_OK.
    fn features_ok(&self) -> bool {
        let unoffered = self.acked_features & !self.device_features;
        if unoffered != 0 {
            warn!(
                "virtio-mmio: refusing FEATURES_OK for device type {}: the driver accepted \
                 features {unoffered:#x} that were not offered",
                self.device_type
            );
            return false;
        }
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            warn!(
                "virtio-mmio: refusing FEATURES_OK for device type {}: the driver did not \
                 accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
                self.device_type
            );
            return false;
        }
        true
    }

    /// DRIVER_OK: builds and checks the queues and activates the device. On
    /// failure the device reports DEVICE_NEEDS_RESET and stays inactive.
    fn activate(&mut self) {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, cfg) in self.queues.iter().enumerate() {
            match cfg.build(&self.mem, event_idx) {
                Ok(q) => queues.push(q),
                Err(why) => {
                    error!(
                        "virtio-mmio: device type {} not activated: queue {i} is invalid: {why}",
                        self.device_type
                    );
                    return self.fail_activation();
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        let result = {
            let mut dev = lock(&self.device);
            self.activate_called = true;
            let r = dev.activate(ctx);
            if r.is_ok() {
                self.activated.store(true, Ordering::SeqCst);
            }
            r
        };
        match result {
            Ok(()) => {
                debug!(
                    "virtio-mmio: device type {} activated; driver features {:#x}",
                    self.device_type, self.acked_features
                );
                // Pick up buffers made available before DRIVER_OK.
                for (i, evt) in self.queue_evts.iter().enumerate() {
                    if let Err(e) = evt.write(1) {
                        error!("virtio-mmio: cannot kick queue {i} after activation: {e}");
                    }
                }
            }
            Err(e) => {
                error!(
                    "virtio-mmio: device type {} failed to activate: {e}",
                    self.device_type
                );
                self.fail_activation();
            }
        }
    }

    fn fail_activation(&mut self) {
        if let Err(e) = self.interrupt.signal_needs_reset() {
            error!("virtio-mmio: {e}");
        }
    }

    /// Device reset (Status = 0): the device drops its queues, the transport
    /// returns to its power-on state.
    fn reset(&mut self) {
        {
            let mut dev = lock(&self.device);
            self.activated.store(false, Ordering::SeqCst);
            if self.activate_called {
                dev.reset();
            }
        }
        self.activate_called = false;
        self.interrupt.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            return lock(&self.device).read_config(offset - regs::CONFIG, data);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            debug!(
                "virtio-mmio: {}-byte read at register offset {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            return lock(&self.device).write_config(offset - regs::CONFIG, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "virtio-mmio: {}-byte write at register offset {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            debug!("virtio-mmio: unaligned write at register offset {offset:#x} ignored");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// Event-loop side of one device: queue eventfds (data = queue index) and
/// the device's own backend fds (data ≥ [`BACKEND_EVENT_BASE`]).
struct EventHandler {
    device: SharedDevice,
    activated: Arc<AtomicBool>,
    queue_evts: Vec<EventFd>,
}

impl MutEventSubscriber for EventHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if u64::from(data) >= BACKEND_EVENT_BASE {
            return lock(&self.device).backend_event(events, ops);
        }
        let index = data as usize;
        let Some(evt) = self.queue_evts.get(index) else {
            warn!("virtio-mmio: event for unknown queue {index}");
            return;
        };
        // Drain first: a notification we drop must not fire again.
        if let Err(e) = evt.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                error!("virtio-mmio: cannot read the notification of queue {index}: {e}");
            }
            return;
        }
        let mut dev = lock(&self.device);
        if !self.activated.load(Ordering::SeqCst) {
            debug!("virtio-mmio: notification of queue {index} before DRIVER_OK ignored");
            return;
        }
        dev.queue_notify(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error!("virtio-mmio: cannot watch the notifications of queue {i}: {e}");
            }
        }
        lock(&self.device).init_backend(ops);
    }
}

/// A registered virtio-mmio device.
pub struct MmioDeviceHandle {
    transport: Arc<Mutex<MmioTransport>>,
    device: SharedDevice,
    base: u64,
    gsi: u32,
    subscriber_id: SubscriberId,
}

impl MmioDeviceHandle {
    /// The transport, for saving and restoring its state.
    pub fn transport(&self) -> &Arc<Mutex<MmioTransport>> {
        &self.transport
    }

    pub fn device(&self) -> &SharedDevice {
        &self.device
    }

    /// Guest-physical base address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn subscriber_id(&self) -> SubscriberId {
        self.subscriber_id
    }

    /// The kernel command-line fragment announcing the device,
    /// `virtio_mmio.device=4K@0xd0000000:5`.
    pub fn cmdline_fragment(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            layout::VIRTIO_MMIO_SIZE >> 10,
            self.base,
            self.gsi
        )
    }
}

/// Places `device` in virtio-mmio `slot` (window at `VIRTIO_MMIO_START +
/// slot * 4 KiB`, GSI `VIRTIO_IRQ_BASE + slot`): interrupt irqfd, one
/// ioeventfd per queue on QueueNotify (datamatch = queue index), the
/// transport on `mmio_bus`, and the event-loop subscriber. The VM's
/// in-kernel irqchip must exist already.
pub fn register(
    vm: &VmFd,
    mmio_bus: &mut Bus,
    event_manager: &mut EventManager,
    mem: &GuestMemoryMmap,
    device: SharedDevice,
    slot: u32,
) -> Result<MmioDeviceHandle, MmioError> {
    let (base, gsi) = slot_location(slot)?;
    let irqfd = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
    vm.register_irqfd(&irqfd, gsi)
        .map_err(|source| MmioError::Irqfd { gsi, source })?;
    let transport = MmioTransport::new(mem.clone(), device, Arc::new(Interrupt::new(irqfd)))?;
    let addr = base + regs::QUEUE_NOTIFY;
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        // Queue indexes fit in u32: a device has at most a handful of queues.
        vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), queue as u32)
            .map_err(|source| MmioError::Ioeventfd {
                queue,
                addr,
                source,
            })?;
    }
    attach(mmio_bus, event_manager, transport, base, gsi)
}

/// The KVM-independent half of [`register`]: bus and event loop.
fn attach(
    mmio_bus: &mut Bus,
    event_manager: &mut EventManager,
    transport: MmioTransport,
    base: u64,
    gsi: u32,
) -> Result<MmioDeviceHandle, MmioError> {
    let queue_evts = transport
        .queue_evts()
        .iter()
        .map(|e| e.try_clone())
        .collect::<Result<Vec<_>, _>>()
        .map_err(MmioError::EventFd)?;
    let handler = EventHandler {
        device: transport.device.clone(),
        activated: transport.activated.clone(),
        queue_evts,
    };
    let device = transport.device.clone();
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus
        .insert(transport.clone(), base, layout::VIRTIO_MMIO_SIZE)
        .map_err(MmioError::Bus)?;
    let subscriber: Subscriber = Arc::new(Mutex::new(handler));
    let subscriber_id = event_manager.add_subscriber(subscriber);
    Ok(MmioDeviceHandle {
        transport,
        device,
        base,
        gsi,
        subscriber_id,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{ActivateError, INT_CONFIG_CHANGE, TYPE_BLOCK};
    use super::*;
    use crate::vmm::memory::GuestMemoryMmap;

    #[derive(Default)]
    struct Calls {
        activated: Vec<(usize, u64, Vec<bool>, Vec<bool>)>,
        resets: usize,
        notifies: Vec<usize>,
        config_writes: Vec<(u64, Vec<u8>)>,
        inits: usize,
    }

    /// A device that records what the transport does to it.
    struct Dummy {
        max_sizes: Vec<u16>,
        features: u64,
        config: Vec<u8>,
        generation: u32,
        fail_activate: bool,
        calls: Arc<Mutex<Calls>>,
        queues: Vec<QueueState>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn device_features(&self) -> u64 {
            self.features
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            lock(&self.calls)
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Backend("test".into()));
            }
            self.queues = ctx.queues.iter().map(|q| q.state()).collect();
            lock(&self.calls).activated.push((
                ctx.queues.len(),
                ctx.acked_features,
                ctx.queues.iter().map(|q| q.ready()).collect(),
                ctx.queues.iter().map(|q| q.event_idx_enabled()).collect(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            lock(&self.calls).resets += 1;
        }
        fn queue_notify(&mut self, index: usize) {
            lock(&self.calls).notifies.push(index);
        }
        fn init_backend(&mut self, _ops: &mut EventOps) {
            lock(&self.calls).inits += 1;
        }
        fn config_generation(&self) -> u32 {
            self.generation
        }
        fn queue_states(&self) -> Vec<QueueState> {
            self.queues.clone()
        }
    }

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << 5);

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    struct Rig {
        t: MmioTransport,
        dev: Arc<Mutex<Dummy>>,
        calls: Arc<Mutex<Calls>>,
    }

    fn rig_with(max_sizes: Vec<u16>) -> Rig {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let dev = Arc::new(Mutex::new(Dummy {
            max_sizes,
            features: FEATURES,
            config: (1..=16).collect(),
            generation: 0,
            fail_activate: false,
            calls: calls.clone(),
            queues: Vec::new(),
        }));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(mem(), dev.clone(), irq).unwrap();
        Rig { t, dev, calls }
    }

    fn rig() -> Rig {
        rig_with(vec![16, 8])
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0xaa; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn ack_features(t: &mut MmioTransport, f: u64) {
        wr(t, regs::DRIVER_FEATURES_SEL, 0);
        wr(t, regs::DRIVER_FEATURES, f as u32);
        wr(t, regs::DRIVER_FEATURES_SEL, 1);
        wr(t, regs::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Queue `sel` at `base`: desc table, avail ring, used ring, size 8.
    fn setup_queue(t: &mut MmioTransport, sel: u32, base: u64) {
        wr(t, regs::QUEUE_SEL, sel);
        assert_eq!(rd(t, regs::QUEUE_READY), 0);
        wr(t, regs::QUEUE_NUM, 8);
        wr(t, regs::QUEUE_DESC_LOW, base as u32);
        wr(t, regs::QUEUE_DESC_HIGH, (base >> 32) as u32);
        wr(t, regs::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, regs::QUEUE_DRIVER_HIGH, 0);
        wr(t, regs::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, regs::QUEUE_DEVICE_HIGH, 0);
        wr(t, regs::QUEUE_READY, 1);
        assert_eq!(rd(t, regs::QUEUE_READY), 1);
    }

    /// The Linux driver's probe sequence up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, f: u64) {
        wr(t, regs::STATUS, 0);
        wr(t, regs::STATUS, status::ACKNOWLEDGE);
        wr(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        ack_features(t, f);
        wr(t, regs::STATUS, 0b1011);
    }

    fn bring_up(t: &mut MmioTransport) {
        negotiate(t, FEATURES);
        assert_eq!(rd(t, regs::STATUS), 0b1011);
        setup_queue(t, 0, 0x10000);
        setup_queue(t, 1, 0x20000);
        wr(t, regs::STATUS, 0b1111);
    }

    #[test]
    fn state_round_trips_into_a_fresh_transport() {
        let mut r = rig();
        bring_up(&mut r.t);
        lock(&r.dev).generation = 3;
        r.t.interrupt().trigger(1).unwrap();
        wr(&mut r.t, regs::QUEUE_SEL, 1);
        let saved = r.t.save_state();
        assert!(saved.activated);
        assert_eq!(saved.active_queues.len(), 2);
        let json = serde_json::to_string(&saved).unwrap();
        let saved: TransportState = serde_json::from_str(&json).unwrap();

        let mut fresh = rig();
        fresh.t.restore_state(&saved).unwrap();
        // The device's own state is its owner's to restore.
        lock(&fresh.dev).generation = 3;
        assert!(fresh.t.is_activated());
        assert_eq!(rd(&mut fresh.t, regs::STATUS), 0b1111);
        assert_eq!(rd(&mut fresh.t, regs::INTERRUPT_STATUS), 1);
        assert_eq!(rd(&mut fresh.t, regs::QUEUE_READY), 1);
        assert_eq!(rd(&mut fresh.t, regs::CONFIG_GENERATION), 3);
        assert_eq!(fresh.t.acked_features(), FEATURES);
        assert_eq!(fresh.t.queue_configs(), r.t.queue_configs());
        assert_eq!(lock(&fresh.dev).queues, lock(&r.dev).queues);
        // Every queue is kicked to pick up buffers made available before.
        for evt in fresh.t.queue_evts() {
            assert_eq!(evt.read().unwrap(), 1);
        }
        // And the restored device resets like any other.
        wr(&mut fresh.t, regs::STATUS, 0);
        assert_eq!(lock(&fresh.calls).resets, 1);

        // A state that does not fit is refused.
        let mut other = rig_with(vec![16]);
        assert!(other.t.restore_state(&saved).is_err());
        let mut bad = saved.clone();
        bad.active_queues[0].desc_table = 0x8000_0000;
        assert!(rig().t.restore_state(&bad).is_err());
    }

    #[test]
    fn identification_registers() {
        let mut r = rig();
        let t = &mut r.t;
        assert_eq!(rd(t, regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(t, regs::VERSION), 2);
        assert_eq!(rd(t, regs::DEVICE_ID), TYPE_BLOCK);
        assert_eq!(rd(t, regs::VENDOR_ID), MMIO_VENDOR_ID);
        wr(t, regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(t, regs::DEVICE_FEATURES), FEATURES as u32);
        wr(t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(t, regs::DEVICE_FEATURES), (FEATURES >> 32) as u32);
        wr(t, regs::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(t, regs::DEVICE_FEATURES), 0);
        wr(t, regs::QUEUE_SEL, 1);
        assert_eq!(rd(t, regs::QUEUE_NUM_MAX), 8);
        wr(t, regs::QUEUE_SEL, 2);
        assert_eq!(rd(t, regs::QUEUE_NUM_MAX), 0);
        assert_eq!(rd(t, regs::QUEUE_READY), 0);
        assert_eq!(rd(t, regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(t, regs::STATUS), 0);
    }

    #[test]
    fn full_handshake_activates_with_negotiated_features() {
        let mut r = rig();
        bring_up(&mut r.t);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0b1111);
        assert!(r.t.is_activated());
        let calls = lock(&r.calls);
        assert_eq!(calls.activated.len(), 1);
        let (nq, acked, ready, eidx) = &calls.activated[0];
        assert_eq!((*nq, *acked), (2, FEATURES));
        assert_eq!(ready, &vec![true, true]);
        assert_eq!(eidx, &vec![true, true]);
        drop(calls);
        // Activation kicks every queue so early buffers are seen.
        for e in r.t.queue_evts() {
            assert_eq!(e.read().unwrap(), 1);
        }
    }

    #[test]
    fn event_idx_off_when_not_negotiated() {
        let mut r = rig();
        negotiate(&mut r.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut r.t, 0, 0x10000);
        wr(&mut r.t, regs::STATUS, 0b1111);
        let calls = lock(&r.calls);
        // Queue 1 was never set up: handed over, but not ready.
        assert_eq!(calls.activated[0].2, vec![true, false]);
        assert_eq!(calls.activated[0].3, vec![false, false]);
    }

    #[test]
    fn refuses_features_ok_without_version_1() {
        let mut r = rig();
        negotiate(&mut r.t, VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0b0011);
        // DRIVER_OK cannot follow a refused FEATURES_OK.
        wr(&mut r.t, regs::STATUS, 0b0111);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0b0011);
        assert!(!r.t.is_activated());
        // The driver may retry with a correct set.
        ack_features(&mut r.t, VIRTIO_F_VERSION_1);
        wr(&mut r.t, regs::STATUS, 0b1011);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0b1011);
    }

    #[test]
    fn refuses_features_that_were_not_offered() {
        let mut r = rig();
        negotiate(&mut r.t, VIRTIO_F_VERSION_1 | (1 << 3));
        assert_eq!(rd(&mut r.t, regs::STATUS), 0b0011);
        assert_eq!(r.t.acked_features(), VIRTIO_F_VERSION_1 | (1 << 3));
    }

    #[test]
    fn features_are_frozen_after_features_ok_and_before_driver() {
        let mut r = rig();
        wr(&mut r.t, regs::STATUS, status::ACKNOWLEDGE);
        ack_features(&mut r.t, VIRTIO_F_VERSION_1);
        assert_eq!(r.t.acked_features(), 0);
        negotiate(&mut r.t, VIRTIO_F_VERSION_1);
        ack_features(&mut r.t, FEATURES);
        assert_eq!(r.t.acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn out_of_order_status_writes_are_ignored() {
        let mut r = rig();
        let t = &mut r.t;
        wr(t, regs::STATUS, status::DRIVER);
        assert_eq!(rd(t, regs::STATUS), 0);
        wr(t, regs::STATUS, status::DRIVER_OK);
        assert_eq!(rd(t, regs::STATUS), 0);
        wr(t, regs::STATUS, status::ACKNOWLEDGE);
        // Skipping DRIVER.
        wr(t, regs::STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!(rd(t, regs::STATUS), 1);
        // Clearing a bit.
        wr(t, regs::STATUS, status::DRIVER);
        assert_eq!(rd(t, regs::STATUS), 1);
        // The driver may not set DEVICE_NEEDS_RESET.
        wr(t, regs::STATUS, 1 | status::DEVICE_NEEDS_RESET);
        assert_eq!(rd(t, regs::STATUS), 1);
        // Re-writing the same value is harmless.
        wr(t, regs::STATUS, 1);
        assert_eq!(rd(t, regs::STATUS), 1);
        // Several steps at once, in order, are accepted.
        ack_features(t, VIRTIO_F_VERSION_1);
        wr(t, regs::STATUS, 0b0011);
        ack_features(t, VIRTIO_F_VERSION_1);
        wr(t, regs::STATUS, 0b1111);
        assert_eq!(rd(t, regs::STATUS), 0b1111);
        assert!(t.is_activated());
    }

    #[test]
    fn failed_sticks_until_reset() {
        let mut r = rig();
        let t = &mut r.t;
        wr(t, regs::STATUS, 1);
        wr(t, regs::STATUS, 1 | status::FAILED);
        assert_eq!(rd(t, regs::STATUS), 1 | status::FAILED);
        wr(t, regs::STATUS, 3);
        assert_eq!(rd(t, regs::STATUS), 1 | status::FAILED);
        wr(t, regs::STATUS, 0);
        assert_eq!(rd(t, regs::STATUS), 0);
        wr(t, regs::STATUS, 1);
        assert_eq!(rd(t, regs::STATUS), 1);
    }

    #[test]
    fn reset_returns_everything_to_power_on() {
        let mut r = rig();
        bring_up(&mut r.t);
        r.t.interrupt().trigger(1).unwrap();
        wr(&mut r.t, regs::STATUS, 0);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0);
        assert!(!r.t.is_activated());
        assert_eq!(lock(&r.calls).resets, 1);
        assert_eq!(rd(&mut r.t, regs::INTERRUPT_STATUS), 0);
        assert_eq!(r.t.acked_features(), 0);
        for q in 0..2 {
            wr(&mut r.t, regs::QUEUE_SEL, q);
            assert_eq!(rd(&mut r.t, regs::QUEUE_READY), 0);
        }
        assert_eq!(r.t.queue_configs()[0], QueueConfig::new(16));
        // A second reset without activation does not reset the device again.
        wr(&mut r.t, regs::STATUS, 0);
        assert_eq!(lock(&r.calls).resets, 1);
        // And the device comes back up.
        bring_up(&mut r.t);
        assert!(r.t.is_activated());
        assert_eq!(lock(&r.calls).activated.len(), 2);
    }

    #[test]
    fn queue_registers_are_writable_only_before_driver_ok() {
        let mut r = rig();
        bring_up(&mut r.t);
        let before = r.t.queue_configs().to_vec();
        wr(&mut r.t, regs::QUEUE_SEL, 0);
        wr(&mut r.t, regs::QUEUE_READY, 0);
        wr(&mut r.t, regs::QUEUE_NUM, 4);
        wr(&mut r.t, regs::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(r.t.queue_configs(), &before[..]);
        assert_eq!(rd(&mut r.t, regs::QUEUE_READY), 1);
        // Writes to an absent queue are ignored before DRIVER_OK, too.
        let mut r = rig();
        negotiate(&mut r.t, FEATURES);
        wr(&mut r.t, regs::QUEUE_SEL, 9);
        wr(&mut r.t, regs::QUEUE_READY, 1);
        assert_eq!(rd(&mut r.t, regs::QUEUE_READY), 0);
    }

    #[test]
    fn invalid_queue_at_driver_ok_sets_needs_reset() {
        // Rings outside guest memory.
        let mut r = rig();
        negotiate(&mut r.t, FEATURES);
        setup_queue(&mut r.t, 0, 0x10000);
        setup_queue(&mut r.t, 1, 0x8000_0000);
        wr(&mut r.t, regs::STATUS, 0b1111);
        assert!(!r.t.is_activated());
        assert_eq!(
            rd(&mut r.t, regs::STATUS),
            0b1111 | status::DEVICE_NEEDS_RESET
        );
        assert_eq!(rd(&mut r.t, regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert!(lock(&r.calls).activated.is_empty());
        // Reset clears it.
        wr(&mut r.t, regs::STATUS, 0);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0);
        assert_eq!(rd(&mut r.t, regs::INTERRUPT_STATUS), 0);

        // Size not a power of two, size above the maximum, misaligned ring.
        for (reg, v) in [
            (regs::QUEUE_NUM, 6),
            (regs::QUEUE_NUM, 32),
            (regs::QUEUE_NUM, 0x1_0000),
            (regs::QUEUE_DEVICE_LOW, 0x2001),
        ] {
            let mut r = rig();
            negotiate(&mut r.t, FEATURES);
            setup_queue(&mut r.t, 0, 0x10000);
            wr(&mut r.t, regs::QUEUE_SEL, 0);
            wr(&mut r.t, reg, v);
            setup_queue(&mut r.t, 1, 0x20000);
            wr(&mut r.t, regs::STATUS, 0b1111);
            assert!(!r.t.is_activated(), "reg {reg:#x} = {v:#x}");
            assert_ne!(rd(&mut r.t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn device_activation_failure_sets_needs_reset() {
        let mut r = rig();
        lock(&r.dev).fail_activate = true;
        bring_up(&mut r.t);
        assert!(!r.t.is_activated());
        assert_ne!(rd(&mut r.t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // activate was called, so reset must reach the device.
        wr(&mut r.t, regs::STATUS, 0);
        assert_eq!(lock(&r.calls).resets, 1);
    }

    #[test]
    fn device_reported_fatal_error_shows_in_status() {
        let mut r = rig();
        bring_up(&mut r.t);
        r.t.interrupt().signal_needs_reset().unwrap();
        assert_eq!(
            rd(&mut r.t, regs::STATUS),
            0b1111 | status::DEVICE_NEEDS_RESET
        );
        assert_eq!(rd(&mut r.t, regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        // Linux's virtio_add_status echoes the bit back; FAILED still lands.
        let nr = status::DEVICE_NEEDS_RESET;
        wr(&mut r.t, regs::STATUS, 0b1111 | nr);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0b1111 | nr);
        wr(&mut r.t, regs::STATUS, 0b1111 | nr | status::FAILED);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0b1111 | nr | status::FAILED);
        wr(&mut r.t, regs::STATUS, 0);
        assert_eq!(rd(&mut r.t, regs::STATUS), 0);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut r = rig();
        r.t.interrupt().trigger(INT_CONFIG_CHANGE | 1).unwrap();
        assert_eq!(rd(&mut r.t, regs::INTERRUPT_STATUS), 3);
        wr(&mut r.t, regs::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut r.t, regs::INTERRUPT_STATUS), 2);
        wr(&mut r.t, regs::INTERRUPT_ACK, 2);
        assert_eq!(rd(&mut r.t, regs::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_and_generation() {
        let mut r = rig();
        let mut b = [0u8; 1];
        r.t.read(regs::CONFIG + 3, &mut b);
        assert_eq!(b, [4]);
        let mut b = [0u8; 2];
        r.t.read(regs::CONFIG + 1, &mut b);
        assert_eq!(b, [2, 3]);
        let mut b = [0u8; 8];
        r.t.read(regs::CONFIG + 8, &mut b);
        assert_eq!(b, [9, 10, 11, 12, 13, 14, 15, 16]);
        r.t.read(regs::CONFIG + 0x100, &mut b);
        assert_eq!(b, [0; 8]);
        r.t.write(regs::CONFIG + 2, &[7, 7]);
        assert_eq!(lock(&r.calls).config_writes, vec![(2, vec![7, 7])]);
        assert_eq!(rd(&mut r.t, regs::CONFIG_GENERATION), 0);
        lock(&r.dev).generation = 5;
        assert_eq!(rd(&mut r.t, regs::CONFIG_GENERATION), 5);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut r = rig();
        let t = &mut r.t;
        // Narrow, wide and unaligned register reads read zero.
        let mut b = [0xffu8; 2];
        t.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 8];
        t.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0; 8]);
        assert_eq!(rd(t, regs::MAGIC_VALUE + 1), 0);
        // Write-only and unknown registers read zero.
        assert_eq!(rd(t, regs::QUEUE_NOTIFY), 0);
        assert_eq!(rd(t, 0x0e0), 0);
        // Narrow, wide, unaligned and unknown writes change nothing.
        t.write(regs::STATUS, &[1]);
        t.write(regs::STATUS, &[1, 0]);
        t.write(regs::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.write(regs::STATUS + 1, &[1, 0, 0, 0]);
        wr(t, 0x0e0, 1);
        wr(t, regs::MAGIC_VALUE, 1);
        assert_eq!(rd(t, regs::STATUS), 0);
        assert_eq!(rd(t, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        // A notification of an absent queue is dropped.
        wr(t, regs::QUEUE_NOTIFY, 5);
    }

    #[test]
    fn rejects_bad_queue_sizes_and_slots() {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let dev = Arc::new(Mutex::new(Dummy {
            max_sizes: vec![16, 100],
            features: FEATURES,
            config: vec![],
            generation: 0,
            fail_activate: false,
            calls,
            queues: Vec::new(),
        }));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let e = MmioTransport::new(mem(), dev, irq).err().unwrap();
        assert!(matches!(
            e,
            MmioError::QueueSize {
                index: 1,
                size: 100
            }
        ));
        assert_eq!(slot_location(0).unwrap(), (0xd000_0000, 5));
        assert_eq!(slot_location(2).unwrap(), (0xd000_2000, 7));
        assert!(slot_location(max_slots()).is_err());
        assert!(slot_location(u32::MAX).is_err());
    }

    /// Bus + event loop without KVM: notifications written to QueueNotify
    /// through the bus reach the device only after DRIVER_OK.
    #[test]
    fn attach_dispatches_notifications_after_driver_ok() {
        let r = rig();
        let calls = r.calls.clone();
        let mut bus = Bus::new();
        let mut em = EventManager::new().unwrap();
        let (base, gsi) = slot_location(1).unwrap();
        let h = attach(&mut bus, &mut em, r.t, base, gsi).unwrap();
        assert_eq!(h.cmdline_fragment(), "virtio_mmio.device=4K@0xd0001000:6");
        assert_eq!(lock(&calls).inits, 1);

        let w = |bus: &Bus, off: u64, v: u32| bus.write(base + off, &v.to_le_bytes()).unwrap();
        // Before DRIVER_OK: drained and dropped.
        w(&bus, regs::QUEUE_NOTIFY, 1);
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert!(lock(&calls).notifies.is_empty());
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "eventfd was drained");

        bring_up(&mut lock(h.transport()));
        // The activation kick reaches both queues.
        em.run_with_timeout(100).unwrap();
        let mut n = lock(&calls).notifies.clone();
        n.sort();
        assert_eq!(n, vec![0, 1]);
        w(&bus, regs::QUEUE_NOTIFY, 1);
        em.run_with_timeout(100).unwrap();
        assert_eq!(lock(&calls).notifies.last(), Some(&1));

        // After reset: dropped again.
        w(&bus, regs::STATUS, 0);
        w(&bus, regs::QUEUE_NOTIFY, 0);
        em.run_with_timeout(100).unwrap();
        assert_eq!(lock(&calls).notifies.len(), 3);

        // The window is taken.
        let mut b = [0u8; 4];
        bus.read(base + regs::MAGIC_VALUE, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), MMIO_MAGIC_VALUE);
    }

    /// A virtio-blk device driven like Linux drives it: probe through the
    /// bus, a request through a real split ring, notification through the
    /// event loop, interrupt through the irqfd, then a capacity change.
    #[test]
    fn block_end_to_end_through_bus_and_event_loop() {
        use super::super::block::Block;
        use std::io::Write;
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::Bytes;

        let contents: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
        img.as_file().write_all(&contents).unwrap();
        let img2 = vmm_sys_util::tempfile::TempFile::new().unwrap();
        img2.as_file().write_all(&[1u8; 1 << 20]).unwrap();

        let m = mem();
        let blk = Arc::new(Mutex::new(Block::new(img.as_path()).unwrap()));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(m.clone(), blk.clone(), irq.clone()).unwrap();
        let mut bus = Bus::new();
        let mut em = EventManager::new().unwrap();
        let (base, gsi) = slot_location(0).unwrap();
        attach(&mut bus, &mut em, t, base, gsi).unwrap();
        let w = |off: u64, v: u32| bus.write(base + off, &v.to_le_bytes()).unwrap();
        let r = |off: u64| {
            let mut b = [0u8; 4];
            bus.read(base + off, &mut b).unwrap();
            u32::from_le_bytes(b)
        };

        // Probe.
        assert_eq!(
            (r(regs::MAGIC_VALUE), r(regs::VERSION)),
            (MMIO_MAGIC_VALUE, 2)
        );
        assert_eq!(r(regs::DEVICE_ID), TYPE_BLOCK);
        w(regs::STATUS, 0);
        w(regs::STATUS, 1);
        w(regs::STATUS, 3);
        w(regs::DEVICE_FEATURES_SEL, 1);
        let hi = r(regs::DEVICE_FEATURES);
        w(regs::DEVICE_FEATURES_SEL, 0);
        let lo = r(regs::DEVICE_FEATURES);
        w(regs::DRIVER_FEATURES_SEL, 1);
        w(regs::DRIVER_FEATURES, hi);
        w(regs::DRIVER_FEATURES_SEL, 0);
        w(regs::DRIVER_FEATURES, lo);
        w(regs::STATUS, 0b1011);
        assert_eq!(r(regs::STATUS), 0b1011);
        let gen = r(regs::CONFIG_GENERATION);
        let cap = u64::from(r(regs::CONFIG)) | (u64::from(r(regs::CONFIG + 4)) << 32);
        assert_eq!((cap, r(regs::CONFIG_GENERATION)), (16, gen));

        // Queue 0 at 0x10000.
        let vq = MockSplitQueue::create(&m, GuestAddress(0x10000), 256);
        w(regs::QUEUE_SEL, 0);
        assert_eq!(r(regs::QUEUE_NUM_MAX), 256);
        w(regs::QUEUE_NUM, 256);
        w(regs::QUEUE_DESC_LOW, vq.desc_table_addr().0 as u32);
        w(regs::QUEUE_DESC_HIGH, 0);
        w(regs::QUEUE_DRIVER_LOW, vq.avail_addr().0 as u32);
        w(regs::QUEUE_DRIVER_HIGH, 0);
        w(regs::QUEUE_DEVICE_LOW, vq.used_addr().0 as u32);
        w(regs::QUEUE_DEVICE_HIGH, 0);
        w(regs::QUEUE_READY, 1);
        w(regs::STATUS, 0b1111);
        assert_eq!(r(regs::STATUS), 0b1111);
        em.run_with_timeout(100).unwrap();

        // Read sectors 2..4 into two buffers.
        let mut hdr = [0u8; 16];
        hdr[8] = 2;
        m.write_slice(&hdr, GuestAddress(0x30000)).unwrap();
        let (n, wr_) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let descs = [
            Descriptor::new(0x30000, 16, n, 1),
            Descriptor::new(0x40000, 512, n | wr_, 2),
            Descriptor::new(0x50000, 512, n | wr_, 3),
            Descriptor::new(0x31000, 1, wr_, 0),
        ]
        .map(RawDescriptor::from);
        vq.add_desc_chains(&descs, 0).unwrap();
        w(regs::QUEUE_NOTIFY, 0);
        em.run_with_timeout(100).unwrap();

        assert_eq!(vq.used().idx().load(), 1);
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((elem.id(), elem.len()), (0, 1025));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x31000)).unwrap(), 0);
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x40000)).unwrap();
        assert_eq!(got, &contents[1024..1536]);
        m.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
        assert_eq!(got, &contents[1536..2048]);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        assert_eq!(r(regs::INTERRUPT_STATUS), 1);
        w(regs::INTERRUPT_ACK, 1);
        assert_eq!(r(regs::INTERRUPT_STATUS), 0);

        // A new, larger image: the driver sees a config change.
        lock(&blk).replace_backing(img2.as_path()).unwrap();
        assert_eq!(r(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert_ne!(r(regs::CONFIG_GENERATION), gen);
        assert_eq!(r(regs::CONFIG), 2048);
    }

    /// The real thing on /dev/kvm, when the host has it.
    #[test]
    fn register_on_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let r = rig();
        let mut bus = Bus::new();
        let mut em = EventManager::new().unwrap();
        let h = register(&vm, &mut bus, &mut em, &mem(), r.dev.clone(), 0).unwrap();
        assert_eq!(h.cmdline_fragment(), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!((h.base(), h.gsi()), (0xd000_0000, 5));
        // The same window cannot be taken twice.
        let e = register(&vm, &mut bus, &mut em, &mem(), r.dev.clone(), 0);
        assert!(e.is_err());
        let e = register(&vm, &mut bus, &mut em, &mem(), r.dev, max_slots());
        assert!(matches!(e, Err(MmioError::Slot { .. })));
    }
}
