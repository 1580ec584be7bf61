//! Application processor bring-up: INIT-SIPI-SIPI, one AP at a time, so
//! the `cpu <i> apic <id> online` lines come out in order.
//!
//! Path of an AP: real mode at 0x1000 (tg_ap16, copied there) -> 32-bit
//! protected mode (tg_ap32) -> long mode (tg_ap64) -> its own kernel stack
//! and TSS -> CPL3 in `ap_main` below -> parked with cli;hlt.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::mptable::Cpu;
use crate::{apic, cpl0, io, println};

/// Trampoline page: 0x1000 (free for the guest per CONTRACT.md).
const TRAMPOLINE_PAGE: u8 = 0x01;

/// Index of the last AP that reached CPL3 and printed its line.
static AP_ONLINE: AtomicU32 = AtomicU32::new(0);

fn wait_online(index: u32, cycles: u64) -> bool {
    let start = io::rdtsc();
    while io::rdtsc().wrapping_sub(start) < cycles {
        if AP_ONLINE.load(Ordering::Acquire) == index {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Starts cpus[1..] (cpus[0] is this CPU, the BSP).
pub fn start_aps(cpus: &[Cpu]) {
    if cpus.len() <= 1 {
        return;
    }
    let tramp = cpl0::ap_trampoline();
    let dest = usize::from(TRAMPOLINE_PAGE) << 12;
    // SAFETY: 0x1000..0x6fff is free RAM reserved for the guest's AP
    // trampoline (CONTRACT.md); the blob is well under a page.
    unsafe { core::ptr::copy_nonoverlapping(tramp.as_ptr(), dest as *mut u8, tramp.len()) };

    for (i, cpu) in cpus.iter().enumerate().skip(1) {
        let index = i as u32;
        cpl0::set_ap_boot_index(index);
        apic::send_init(cpu.apic_id);
        apic::send_sipi(cpu.apic_id, TRAMPOLINE_PAGE);
        // A second SIPI only if the first one was lost (the spec sends two;
        // KVM needs one, and each costs an exit).
        if !wait_online(index, 200_000_000) {
            apic::send_sipi(cpu.apic_id, TRAMPOLINE_PAGE);
            if !wait_online(index, 10_000_000_000) {
                println!("testguest: cpu {} apic {} did not start", i, cpu.apic_id);
            }
        }
    }
}

/// CPL3 entry of AP number `index`.
pub fn ap_main(index: u32) -> ! {
    let id = apic::lapic_id();
    println!("testguest: cpu {} apic {} online", index, id);
    AP_ONLINE.store(index, Ordering::Release);
    cpl0::halt()
}
