//! `ioport=bitmap` (appfs manifest line): port I/O through the TSS I/O
//! bitmap at IOPL 0, after the diff snapshot point, i.e. in a VM that may
//! have been restored.
//!
//! The body normally runs with IOPL=3, where CPL3 port I/O skips the
//! bitmap. Linux processes use the bitmap (`ioperm`), and after a restore
//! TR carries the busy TSS type (11) as SVM/VMX report it; QEMU TCG's I/O
//! check accepts only an available TSS (9), so under the emulated KVM host
//! every bitmap-checked `in`/`out` of a restored VM takes #GP. This case
//! keeps that visible: it narrows the BSP's bitmap to exactly the ports
//! testguest uses from here on, drops to IOPL 0 (a CPL0 service) and does
//! all its remaining port I/O (console, control port, i8042 reset) through
//! the bitmap. A refused port is reported by the core as
//! `testguest: #GP at bitmap port I/O (...)` followed by a triple fault.
//! Two ports the bitmap does not grant must still fault (probed with `in`,
//! which has no side effect anywhere).

use core::arch::global_asm;

use crate::{cpl0, println};

/// Ports testguest touches after the diff snapshot point, inclusive
/// ranges: the control port, the 8250 UART, the i8042 (reset).
const GRANTED: [(u16, u16); 3] = [(0x3f0, 0x3f0), (0x3f8, 0x3ff), (0x64, 0x64)];
/// A refused port whose bit sits next to a granted one (the control port).
const REFUSED_IN_BITMAP: u16 = 0x3f1;
/// Result of `tg_ioprobe_inb` when the `in` took #GP (a byte otherwise).
const PROBE_FAULTED: u32 = 0x100;

// `tg_ioprobe_inb(port) -> u32`: `in %dx, %al` from CPL3. The core's #GP
// handler recognises a fault at tg_ioprobe_insn and resumes at
// tg_ioprobe_fault, which returns PROBE_FAULTED.
global_asm!(
    ".section .text.ioprobe, \"ax\", @progbits",
    ".globl tg_ioprobe_inb",
    ".globl tg_ioprobe_insn",
    ".globl tg_ioprobe_fault",
    "tg_ioprobe_inb:",
    "    mov %edi, %edx",
    "    xor %eax, %eax",
    "tg_ioprobe_insn:",
    "    inb %dx, %al",
    "    ret",
    "tg_ioprobe_fault:",
    "    mov ${faulted}, %eax",
    "    ret",
    faulted = const PROBE_FAULTED,
    options(att_syntax)
);

extern "C" {
    fn tg_ioprobe_inb(port: u32) -> u32;
}

/// Reads `port` at the current IOPL; None when it took #GP.
fn probe(port: u16) -> Option<u8> {
    // SAFETY: the stub above follows the C ABI; an `in` from a port has no
    // effect on memory, and a #GP there is turned into a return by the core.
    let r = unsafe { tg_ioprobe_inb(u32::from(port)) };
    (r != PROBE_FAULTED).then_some(r as u8)
}

/// What the GDT says about this CPU's TSS.
struct Tss {
    selector: u16,
    gdt_type: u8,
    base: usize,
    limit: usize,
    iomap: usize,
}

fn read_tss() -> Result<Tss, &'static str> {
    let selector = cpl0::task_register();
    let (lo, hi) = cpl0::gdt_descriptor(selector).ok_or("TR selector beyond the GDT")?;
    let gdt_type = ((lo >> 40) & 0xf) as u8;
    if (lo >> 47) & 1 == 0 || (gdt_type != 9 && gdt_type != 11) {
        return Err("TR is not a present 64-bit TSS");
    }
    if (lo >> 55) & 1 != 0 {
        return Err("TSS limit in pages");
    }
    let base = (((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffff_ffff) << 32)) as usize;
    let limit = ((lo & 0xffff) | (((lo >> 48) & 0xf) << 16)) as usize;
    if limit < 103 {
        return Err("TSS limit below 103");
    }
    // SAFETY: the TSS lies in the identity map (the core's static TSS
    // array); the I/O map base is the u16 at offset 102.
    let iomap = usize::from(unsafe { core::ptr::read_volatile((base + 102) as *const u16) });
    Ok(Tss { selector, gdt_type, base, limit, iomap })
}

/// Runs one case (the value of the manifest's `ioport=` line): `bitmap`,
/// or `bitmap-refused`, which then reads a refused port without the probe
/// (the core's report and triple fault, on purpose).
pub fn run(case: &[u8]) {
    if case != b"bitmap" && case != b"bitmap-refused" {
        let name = core::str::from_utf8(case).unwrap_or("?");
        println!("testguest: ioport {}: unknown case", name);
        return;
    }
    let tss = match read_tss() {
        Ok(t) => t,
        Err(why) => {
            println!("testguest: ioport bitmap: no usable TSS: {}", why);
            return;
        }
    };
    // The CPU reads two bitmap bytes per access: both must be inside the limit.
    let top = GRANTED.iter().map(|&(_, hi)| usize::from(hi)).max().unwrap_or(0);
    if tss.iomap + top / 8 + 1 > tss.limit {
        println!(
            "testguest: ioport bitmap: the I/O bitmap (offset {}, TSS limit {}) does not cover port {:#x}",
            tss.iomap, tss.limit, top
        );
        return;
    }
    // Refuse everything the limit covers, then grant our ports.
    let map = (tss.base + tss.iomap) as *mut u8;
    let len = tss.limit + 1 - tss.iomap;
    for i in 0..len {
        // SAFETY: [iomap, limit] is inside this CPU's TSS, plain RAM in the
        // identity map; only the CPU reads it (at port I/O).
        unsafe { core::ptr::write_volatile(map.add(i), 0xff) };
    }
    for &(lo, hi) in &GRANTED {
        for port in lo..=hi {
            let (byte, bit) = (usize::from(port / 8), port % 8);
            // SAFETY: as above; byte < len by the coverage check.
            unsafe {
                let p = map.add(byte);
                core::ptr::write_volatile(p, core::ptr::read_volatile(p) & !(1 << bit));
            }
        }
    }
    // The first port past the limit: refused whatever the bitmap says.
    let beyond = ((len * 8) as u16).max(REFUSED_IN_BITMAP + 1);
    cpl0::set_iopl(0);

    // From here every port access of this CPU goes through the bitmap.
    println!(
        "testguest: ioport bitmap: iopl 0, tr {:#x} gdt type {}, tss limit {} iomap {}, granted 0x3f0 0x3f8-0x3ff 0x64",
        tss.selector, tss.gdt_type, tss.limit, tss.iomap
    );
    let mut refused = true;
    for (port, what) in [(REFUSED_IN_BITMAP, "not granted"), (beyond, "beyond the TSS limit")] {
        match probe(port) {
            None => println!("testguest: ioport bitmap: port {:#x} ({}): #GP", port, what),
            Some(v) => {
                refused = false;
                println!("testguest: ioport bitmap: port {:#x} ({}): no fault, read {:#04x}", port, what, v);
            }
        }
    }
    if refused {
        println!("testguest: ioport bitmap ok");
    }
    if case == b"bitmap-refused" {
        println!("testguest: ioport bitmap: reading port {:#x} unprobed", REFUSED_IN_BITMAP);
        crate::io::inb(REFUSED_IN_BITMAP);
        println!("testguest: ioport bitmap: port {:#x} did not fault", REFUSED_IN_BITMAP);
    }
}
