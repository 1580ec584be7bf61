//! Local APIC, IOAPIC and legacy PIC programming (all from CPL3: MMIO and
//! port I/O both work there).

use crate::io::{inb, mmio_read32, mmio_write32, outb};

const LAPIC_BASE: usize = 0xfee0_0000;
const LAPIC_ID: usize = 0x20;
const LAPIC_TPR: usize = 0x80;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_ICR_LO: usize = 0x300;
const LAPIC_ICR_HI: usize = 0x310;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_ERROR: usize = 0x370;
const LAPIC_TIMER_INIT: usize = 0x380;
const LAPIC_TIMER_DIV: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const ICR_BUSY: u32 = 1 << 12;

const IOAPIC_BASE: usize = 0xfec0_0000;

/// Vector of the local APIC timer (used for sleeping).
pub const TIMER_VECTOR: u8 = 0x20;
/// Device interrupts: GSI g arrives on vector DEVICE_VECTOR_BASE + g.
pub const DEVICE_VECTOR_BASE: u8 = 0x30;

fn lapic_read(reg: usize) -> u32 {
    mmio_read32(LAPIC_BASE + reg)
}

fn lapic_write(reg: usize, v: u32) {
    mmio_write32(LAPIC_BASE + reg, v)
}

/// This CPU's APIC id, from the LAPIC ID register.
pub fn lapic_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

/// Software-enables the local APIC, accepts all priorities, masks LINT0
/// (the PIC: we use the IOAPIC), the timer and the error interrupt.
pub fn lapic_enable() {
    lapic_write(LAPIC_SVR, 0x100 | u32::from(crate::cpl0::SPURIOUS_VECTOR));
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
}

fn send_ipi(apic_id: u8, icr_lo: u32) {
    lapic_write(LAPIC_ICR_HI, u32::from(apic_id) << 24);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    for _ in 0..1000 {
        if lapic_read(LAPIC_ICR_LO) & ICR_BUSY == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// INIT, level assert.
pub fn send_init(apic_id: u8) {
    send_ipi(apic_id, 0x0000_4500);
}

/// Startup IPI: the AP starts in real mode at `page` * 4 KiB.
pub fn send_sipi(apic_id: u8, page: u8) {
    send_ipi(apic_id, 0x0000_4600 | u32::from(page));
}

/// Arms the local APIC timer to fire once on TIMER_VECTOR after about
/// `ns` nanoseconds (KVM's APIC bus runs at 1 GHz; divide by 1).
pub fn timer_oneshot(ns: u64) {
    lapic_write(LAPIC_TIMER_DIV, 0b1011);
    lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INIT, ns.clamp(1, u64::from(u32::MAX)) as u32);
}

/// Stops the local APIC timer (a pending one-shot never fires).
pub fn timer_stop() {
    lapic_write(LAPIC_TIMER_INIT, 0);
}

fn ioapic_write(reg: u32, v: u32) {
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}

/// Routes `gsi` to `vector` on the CPU with `apic_id`: edge-triggered,
/// active high, fixed delivery, physical destination, unmasked.
pub fn ioapic_route(gsi: u32, vector: u8, apic_id: u8) {
    let reg = 0x10 + 2 * gsi;
    ioapic_write(reg, LVT_MASKED);
    ioapic_write(reg + 1, u32::from(apic_id) << 24);
    ioapic_write(reg, u32::from(vector));
}

/// Remaps the 8259 pair away from the exception vectors and masks it.
pub fn pic_disable() {
    outb(0x20, 0x11); // ICW1: init, ICW4 follows
    outb(0xa0, 0x11);
    outb(0x21, 0xe0); // ICW2: vectors 0xe0.. / 0xe8..
    outb(0xa1, 0xe8);
    outb(0x21, 0x04); // ICW3: slave on IRQ2
    outb(0xa1, 0x02);
    outb(0x21, 0x01); // ICW4: 8086 mode
    outb(0xa1, 0x01);
    outb(0x21, 0xff); // mask everything
    outb(0xa1, 0xff);
    let _ = inb(0x21);
}
