//! virtio 1.x over MMIO (transport "version 2") and split virtqueues, the
//! way Linux's virtio_mmio driver sets them up.

use core::sync::atomic::{fence, Ordering};

use crate::cmdline::MmioDevice;
use crate::io::{mmio_read32, mmio_write32};
use crate::{apic, cpl0, mem};

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;
pub const DEVICE_VSOCK: u32 = 19;

pub const F_VERSION_1: u64 = 1 << 32;

pub const REG_MAGIC: usize = 0x000;
pub const REG_VERSION: usize = 0x004;
pub const REG_DEVICE_ID: usize = 0x008;
pub const REG_DEVICE_FEATURES: usize = 0x010;
pub const REG_DEVICE_FEATURES_SEL: usize = 0x014;
pub const REG_DRIVER_FEATURES: usize = 0x020;
pub const REG_DRIVER_FEATURES_SEL: usize = 0x024;
pub const REG_QUEUE_SEL: usize = 0x030;
pub const REG_QUEUE_NUM_MAX: usize = 0x034;
pub const REG_QUEUE_NUM: usize = 0x038;
pub const REG_QUEUE_READY: usize = 0x044;
pub const REG_QUEUE_NOTIFY: usize = 0x050;
pub const REG_INTERRUPT_STATUS: usize = 0x060;
pub const REG_INTERRUPT_ACK: usize = 0x064;
pub const REG_STATUS: usize = 0x070;
pub const REG_QUEUE_DESC_LOW: usize = 0x080;
pub const REG_QUEUE_DESC_HIGH: usize = 0x084;
pub const REG_QUEUE_DRIVER_LOW: usize = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
pub const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
pub const REG_CONFIG_GENERATION: usize = 0x0fc;
pub const REG_CONFIG: usize = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;

/// A probed virtio-mmio device.
pub struct Device {
    base: usize,
    pub device_id: u32,
    /// Features both sides agreed on (after `init`).
    pub features: u64,
    pub gsi: u32,
    pub vector: u8,
    seen_irqs: u32,
}

impl Device {
    /// Checks the magic and the version; does not touch the device state.
    pub fn probe(spec: &MmioDevice) -> Result<Device, &'static str> {
        // 512-byte alignment: QEMU microvm packs its windows 512 bytes apart.
        if spec.size < 0x200 || !spec.base.is_multiple_of(512) || spec.base >= (1 << 34) {
            return Err("bad window");
        }
        if spec.gsi >= 24 {
            return Err("GSI beyond the IOAPIC");
        }
        let d = Device {
            base: spec.base as usize,
            device_id: 0,
            features: 0,
            gsi: spec.gsi,
            vector: apic::DEVICE_VECTOR_BASE + spec.gsi as u8,
            seen_irqs: 0,
        };
        if d.read(REG_MAGIC) != MAGIC {
            return Err("bad magic");
        }
        if d.read(REG_VERSION) != 2 {
            return Err("not a virtio 1.x (version 2) MMIO device");
        }
        let id = d.read(REG_DEVICE_ID);
        if id == 0 {
            return Err("no device behind the window");
        }
        Ok(Device { device_id: id, ..d })
    }

    /// Reads a 32-bit register of the device's window.
    pub fn read(&self, reg: usize) -> u32 {
        mmio_read32(self.base + reg)
    }

    /// Writes a 32-bit register of the device's window.
    pub fn write(&self, reg: usize, v: u32) {
        mmio_write32(self.base + reg, v)
    }

    /// Guest-physical base address of the register window.
    pub fn base(&self) -> usize {
        self.base
    }

    fn set_status(&self, bits: u32) {
        let s = self.read(REG_STATUS);
        self.write(REG_STATUS, s | bits);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 plus
    /// whatever of `optional` the device offers), FEATURES_OK. Also routes
    /// the device's GSI to this CPU. Queues come next, then `driver_ok`.
    pub fn init(&mut self, optional: u64) -> Result<(), &'static str> {
        self.write(REG_STATUS, 0);
        let mut tries = 0;
        while self.read(REG_STATUS) != 0 {
            tries += 1;
            if tries > 1000 {
                return Err("device does not reset");
            }
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read(REG_DEVICE_FEATURES);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        if offered & F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let accepted = offered & (F_VERSION_1 | optional);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);
        self.set_status(STATUS_FEATURES_OK);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err("device refused our features");
        }
        self.features = accepted;
        apic::ioapic_route(self.gsi, self.vector, apic::lapic_id());
        self.seen_irqs = cpl0::vector_count(self.vector);
        Ok(())
    }

    /// Sets up queue `index` with at most `want` entries.
    pub fn setup_queue(&self, index: u16, want: u16) -> Result<VirtQueue, &'static str> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        if self.read(REG_QUEUE_READY) != 0 {
            return Err("queue already in use");
        }
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available");
        }
        // Largest power of two within both limits.
        let limit = max.min(u32::from(want)).max(1);
        let size = 1u32 << (31 - limit.leading_zeros());
        let q = VirtQueue::new(size as u16, self.base + REG_QUEUE_NOTIFY, index);
        self.write(REG_QUEUE_NUM, size);
        let (d, a, u) = (q.desc as u64, q.avail as u64, q.used as u64);
        self.write(REG_QUEUE_DESC_LOW, d as u32);
        self.write(REG_QUEUE_DESC_HIGH, (d >> 32) as u32);
        self.write(REG_QUEUE_DRIVER_LOW, a as u32);
        self.write(REG_QUEUE_DRIVER_HIGH, (a >> 32) as u32);
        self.write(REG_QUEUE_DEVICE_LOW, u as u32);
        self.write(REG_QUEUE_DEVICE_HIGH, (u >> 32) as u32);
        self.write(REG_QUEUE_READY, 1);
        Ok(q)
    }

    pub fn driver_ok(&self) {
        self.set_status(STATUS_DRIVER_OK);
    }

    /// If our vector fired since the last call: read InterruptStatus and
    /// acknowledge it. Returns the status bits (0 if nothing fired).
    pub fn ack_interrupt(&mut self) -> u32 {
        let n = cpl0::vector_count(self.vector);
        if n == self.seen_irqs {
            return 0;
        }
        self.seen_irqs = n;
        let isr = self.read(REG_INTERRUPT_STATUS);
        if isr != 0 {
            self.write(REG_INTERRUPT_ACK, isr);
        }
        isr
    }

    /// Reads a 64-bit device config field consistently (generation check).
    pub fn config_u64(&self, offset: usize) -> u64 {
        loop {
            let g = self.read(REG_CONFIG_GENERATION);
            let lo = self.read(REG_CONFIG + offset);
            let hi = self.read(REG_CONFIG + offset + 4);
            if self.read(REG_CONFIG_GENERATION) == g {
                return u64::from(lo) | (u64::from(hi) << 32);
            }
        }
    }
}

/// One buffer of a descriptor chain (guest physical = virtual address).
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

impl Buf {
    pub fn out(p: *const u8, len: usize) -> Buf {
        Buf { addr: p as u64, len: len as u32, write: false }
    }
    pub fn inp(p: *mut u8, len: usize) -> Buf {
        Buf { addr: p as u64, len: len as u32, write: true }
    }
}

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split virtqueue: descriptor table, available ring (driver area) and
/// used ring (device area), each in its own zeroed page-aligned block.
pub struct VirtQueue {
    notify_addr: usize,
    index: u16,
    size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u8,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl VirtQueue {
    fn new(size: u16, notify_addr: usize, index: u16) -> VirtQueue {
        let n = usize::from(size);
        let desc = mem::alloc_zeroed(16 * n, 4096).as_mut_ptr() as *mut Desc;
        let avail = mem::alloc_zeroed(6 + 2 * n, 4096).as_mut_ptr() as *mut u16;
        let used = mem::alloc_zeroed(6 + 8 * n, 4096).as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < size, inside the table just allocated for us.
            unsafe { (*desc.add(i)).next = ((i + 1) % n) as u16 };
        }
        VirtQueue { notify_addr, index, size, desc, avail, used, free_head: 0, num_free: size, avail_idx: 0, last_used: 0 }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    // Raw access for `hostile=` cases: descriptors and ring entries written
    // as given, outside the free-list bookkeeping of `add`/`pop_used`.

    /// Guest-physical addresses of the descriptor table, available ring
    /// and used ring.
    pub fn ring_addrs(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Writes descriptor `i` (reduced modulo the queue size) verbatim.
    pub fn raw_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: the index is reduced modulo size, inside our table.
        unsafe {
            let d = &mut *self.desc.add(usize::from(i % self.size));
            d.addr = addr;
            d.len = len;
            d.flags = flags;
            d.next = next;
        }
    }

    /// Puts `head` (any value) in the next available-ring slot and
    /// publishes it.
    pub fn raw_publish(&mut self, head: u16) {
        let slot = 2 + usize::from(self.avail_idx % self.size);
        // SAFETY: slot < 2 + size, inside the avail ring.
        unsafe { core::ptr::write_volatile(self.avail.add(slot), head) };
        self.raw_set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    /// Sets the available index to any value.
    pub fn raw_set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::Release);
        self.avail_idx = idx;
        // SAFETY: the avail ring's idx field is its second u16.
        unsafe { core::ptr::write_volatile(self.avail.add(1), idx) };
    }

    /// Takes one used element verbatim: (id, len).
    pub fn raw_pop_used(&mut self) -> Option<(u32, u32)> {
        // SAFETY: used ring layout: flags u16, idx u16, then size entries of
        // {u32 id, u32 len}, the index reduced modulo size; the acquire
        // fence orders idx before the entry.
        let e = unsafe {
            let idx = core::ptr::read_volatile((self.used as *const u16).add(1));
            if idx == self.last_used {
                return None;
            }
            fence(Ordering::Acquire);
            let e = self.used.add(4 + 8 * usize::from(self.last_used % self.size)) as *const u32;
            (core::ptr::read_volatile(e), core::ptr::read_volatile(e.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some(e)
    }

    /// Makes `bufs` available as one chain; returns its head id, or None
    /// if there are not enough free descriptors. Does not notify.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut id = head;
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: id comes from the free list, so it is < size and the
            // device does not own that descriptor.
            unsafe {
                let d = &mut *self.desc.add(usize::from(id));
                d.addr = b.addr;
                d.len = b.len;
                let last = i + 1 == bufs.len();
                d.flags = (if b.write { DESC_F_WRITE } else { 0 }) | (if last { 0 } else { DESC_F_NEXT });
                if last {
                    self.free_head = d.next;
                } else {
                    id = d.next;
                }
            }
        }
        self.num_free -= bufs.len() as u16;
        let slot = 2 + usize::from(self.avail_idx % self.size);
        // SAFETY: the avail ring has 3 + size u16s; slot < 2 + size. The
        // release fence orders the descriptor writes before the index.
        unsafe {
            core::ptr::write_volatile(self.avail.add(slot), head);
            fence(Ordering::Release);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            core::ptr::write_volatile(self.avail.add(1), self.avail_idx);
        }
        Some(head)
    }

    /// Tells the device about new buffers, unless it asked not to be told.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        // SAFETY: the used ring's flags field is its first u16.
        let flags = unsafe { core::ptr::read_volatile(self.used as *const u16) };
        if flags & USED_F_NO_NOTIFY == 0 {
            mmio_write32(self.notify_addr, u32::from(self.index));
        }
    }

    /// Takes one used chain: (head id, bytes written by the device). Its
    /// descriptors go back to the free list.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let (id, len) = self.raw_pop_used()?;
        let head = (id as u16) % self.size;
        // Walk the chain back onto the free list.
        let mut tail = head;
        let mut n = 1;
        loop {
            // SAFETY: tail < size (ids are reduced modulo size above and
            // next fields are ours).
            let d = unsafe { &mut *self.desc.add(usize::from(tail)) };
            if d.flags & DESC_F_NEXT == 0 || n >= self.size {
                d.next = self.free_head;
                break;
            }
            tail = d.next;
            n += 1;
        }
        self.free_head = head;
        self.num_free += n;
        Some((head, len))
    }
}

/// Calls `f` until it returns true or about `ms` milliseconds (at most
/// 4000) pass, sleeping for interrupts in between. Returns `f`'s verdict.
pub fn wait_until(ms: u64, mut f: impl FnMut() -> bool) -> bool {
    let t0 = cpl0::vector_count(apic::TIMER_VECTOR);
    apic::timer_oneshot(ms.min(4000) * 1_000_000);
    loop {
        let seen = cpl0::irq_count();
        if f() {
            return true;
        }
        if cpl0::vector_count(apic::TIMER_VECTOR) != t0 {
            return f();
        }
        cpl0::wait_irq(seen);
    }
}

/// Runs `poll` until it returns Some, sleeping (sti; hlt at CPL0) between
/// tries. `poll` must acknowledge its device's interrupt before looking at
/// the used ring, so a completion is never slept through.
pub fn wait_for<T>(mut poll: impl FnMut() -> Option<T>) -> T {
    loop {
        let seen = cpl0::irq_count();
        if let Some(v) = poll() {
            return v;
        }
        cpl0::wait_irq(seen);
    }
}
