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

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
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
    event_manager.add_subscriber(subscriber);
    Ok(MmioDeviceHandle {
        transport,
        device,
        base,
        gsi,
    })
}

#[cfg(test)]
mod tests;
