//! Tests of the virtio-mmio transport.

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

    // Restored from a snapshot that saw another image size: the driver
    // sees a config change (and this image's capacity).
    let mut saved = crate::vmm::persist::Persist::save(&*lock(&blk)).unwrap();
    saved.capacity = 2048;
    crate::vmm::persist::Persist::restore(&mut *lock(&blk), &saved).unwrap();
    assert_eq!(r(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert_ne!(r(regs::CONFIG_GENERATION), gen);
    assert_eq!(r(regs::CONFIG), 16);
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
