//! Port and MMIO access from CPL3 (IOPL=3 allows port I/O, or at IOPL 0 with
//! `ioport=bitmap` the TSS I/O bitmap does; every page is user-accessible in
//! the identity map, so MMIO is plain volatile access).

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: IOPL=3 (or the TSS I/O bitmap) makes port I/O legal at CPL3,
    // and a refused port is a #GP the core reports; the caller picks a port
    // whose side effects it wants.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn mmio_read32(addr: usize) -> u32 {
    // SAFETY: `addr` is a 4-byte aligned device register in the identity
    // map (LAPIC, IOAPIC or a virtio-mmio window the VMM announced).
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: usize, value: u32) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc is allowed at CPL3 (CR4.TSD is clear) and has no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The snapvm control port (see DESIGN.md "Guest protocol").
pub const CONTROL_PORT: u16 = 0x3f0;
pub const CONTROL_BOOT_DONE: u8 = 123;
pub const CONTROL_SNAPSHOT: u8 = 124;
pub const CONTROL_APP_FAILED: u8 = 125;
pub const CONTROL_TIMESTAMP: u8 = 126;

pub fn control(code: u8) {
    outb(CONTROL_PORT, code);
}

const I8042_STATUS: u16 = 0x64;
const I8042_CMD_RESET: u8 = 0xfe;

/// Resets the machine through the i8042 (firerunner exits 0). A machine
/// without one (QEMU's microvm: the status port reads 0xff, as an absent
/// port does) is ended with a triple fault instead (QEMU `-no-reboot` exits).
pub fn reset() -> ! {
    if inb(I8042_STATUS) == 0xff {
        crate::cpl0::triple_fault()
    }
    outb(I8042_STATUS, I8042_CMD_RESET);
    crate::cpl0::halt()
}
