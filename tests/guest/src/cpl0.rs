//! The CPL0 core (`core.S`) and the services the CPL3 body asks of it.
//!
//! The body runs at CPL3 with IOPL=3 and IF=0. It reaches CPL0 by executing
//! `ud2` with `RAX = SVC_MAGIC << 32 | service` (RDI = argument): the #UD
//! handler recognises the pattern, performs the service and returns past
//! the `ud2` with the result in RAX. Any other exception is a crash: the
//! core prints `testguest: exception <vector> at <rip> err <code>` and
//! resets the machine (except a #GP of port I/O at IOPL < 3: see
//! `set_iopl`).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

/// Largest number of CPUs the static GDT/TSS/stack tables cover.
pub const MAX_CPUS: usize = 64;
/// CPL0 stack per CPU (interrupt frames and the crash path only).
pub const KSTACK_SIZE: usize = 8192;
/// CPL3 stack of the BSP (the whole agent runs there).
pub const BSP_USTACK_SIZE: usize = 1 << 20;
/// CPL3 stack of an AP (prints one line, then parks).
pub const AP_USTACK_SIZE: usize = 32 << 10;
/// Vector the local APIC uses for spurious interrupts (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

const SVC_MAGIC: u32 = 0x7e57_c0de;
const SVC_WAIT: u32 = 1;
const SVC_HALT: u32 = 2;
const SVC_TRIPLEFAULT: u32 = 3;
const SVC_STR: u32 = 4;
const SVC_IOPL: u32 = 5;

global_asm!(
    include_str!("core.S"),
    MAX_CPUS = const MAX_CPUS,
    KSTACK_SIZE = const KSTACK_SIZE,
    BSP_USTACK_SIZE = const BSP_USTACK_SIZE,
    AP_USTACK_SIZE = const AP_USTACK_SIZE,
    SVC_MAGIC = const SVC_MAGIC,
    SVC_WAIT = const SVC_WAIT,
    SVC_HALT = const SVC_HALT,
    SVC_TRIPLEFAULT = const SVC_TRIPLEFAULT,
    SVC_STR = const SVC_STR,
    SVC_IOPL = const SVC_IOPL,
    SPURIOUS_VECTOR = const SPURIOUS_VECTOR,
    options(att_syntax)
);

extern "C" {
    static tg_ap16_start: u8;
    static tg_ap16_end: u8;
    static tg_ap_boot_index: AtomicU32;
    static tg_console_lock: AtomicU32;
    static tg_irq_count: AtomicU32;
    static tg_irq_vec_count: [AtomicU32; 256];
    static tg_gdt: [u64; 6 + 2 * MAX_CPUS];
    static __image_end: u8;
}

fn svc(service: u32, arg: u64) -> u64 {
    let mut rax = (u64::from(SVC_MAGIC) << 32) | u64::from(service);
    // SAFETY: the CPL0 #UD handler recognises this exact pattern, performs
    // the service on its own stack (RSP0, not ours: hence nostack) and
    // resumes after the 2-byte ud2 with every register but RAX preserved.
    unsafe {
        asm!("ud2", inout("rax") rax, in("rdi") arg, options(nostack));
    }
    rax
}

/// Sleeps (sti; hlt at CPL0) until the interrupt count differs from `seen`;
/// returns the new count. Returns at once if it already differs, so a
/// caller that reads `irq_count()` before checking its devices never
/// misses a wakeup.
pub fn wait_irq(seen: u32) -> u32 {
    svc(SVC_WAIT, u64::from(seen)) as u32
}

/// `cli; hlt` forever on this CPU.
pub fn halt() -> ! {
    svc(SVC_HALT, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Loads an empty IDT and faults at CPL0: the machine triple-faults.
pub fn triple_fault() -> ! {
    svc(SVC_TRIPLEFAULT, 0);
    halt()
}

/// This CPU's task register (the TSS selector), read at CPL0.
pub fn task_register() -> u16 {
    svc(SVC_STR, 0) as u16
}

/// Sets this CPU's IOPL (0..=3; popf at CPL3 cannot). Below 3, port I/O at
/// CPL3 is checked against the TSS I/O bitmap, and a port it refuses is a
/// #GP that the core reports as `testguest: #GP at bitmap port I/O ...`
/// and ends with a triple fault (see core.S, `.Lgp`).
pub fn set_iopl(iopl: u8) {
    svc(SVC_IOPL, u64::from(iopl & 3));
}

/// The 16-byte GDT descriptor `selector` names (the static GDT core.S
/// loads), as (low, high) quadwords; None beyond the table.
pub fn gdt_descriptor(selector: u16) -> Option<(u64, u64)> {
    let i = usize::from(selector >> 3);
    // SAFETY: a static table in the core's data section, never moved; only
    // ltr (the busy bit) writes it after boot, so a volatile read is fine.
    unsafe {
        let gdt = core::ptr::addr_of!(tg_gdt).cast::<u64>();
        let len = core::mem::size_of_val(&*core::ptr::addr_of!(tg_gdt)) / 8;
        if i + 1 >= len {
            return None;
        }
        Some((core::ptr::read_volatile(gdt.add(i)), core::ptr::read_volatile(gdt.add(i + 1))))
    }
}

/// Interrupts taken so far (all vectors but the spurious one).
pub fn irq_count() -> u32 {
    // SAFETY: a plain atomic in the core's data section, never moved.
    unsafe { tg_irq_count.load(Ordering::Acquire) }
}

/// Interrupts taken so far on `vector`.
pub fn vector_count(vector: u8) -> u32 {
    // SAFETY: as above; the array has 256 entries, one per vector.
    unsafe { tg_irq_vec_count[usize::from(vector)].load(Ordering::Acquire) }
}

/// The console spinlock, shared with the CPL0 crash path.
pub fn console_lock() -> &'static AtomicU32 {
    // SAFETY: a plain atomic in the core's data section, never moved.
    unsafe { &tg_console_lock }
}

/// Which CPU the next AP to start is (read by the AP's trampoline).
pub fn set_ap_boot_index(index: u32) {
    // SAFETY: a plain atomic in the core's data section, never moved.
    unsafe { tg_ap_boot_index.store(index, Ordering::SeqCst) }
}

/// The 16-bit AP trampoline, to be copied to a page below 1 MiB.
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit the .cpl0.ap16 section of our own image,
    // which is mapped and never written.
    unsafe {
        let start = core::ptr::addr_of!(tg_ap16_start);
        let end = core::ptr::addr_of!(tg_ap16_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// First byte after the loaded image and its .bss.
pub fn image_end() -> usize {
    // Only the address of the linker-script symbol is taken.
    core::ptr::addr_of!(__image_end) as usize
}
