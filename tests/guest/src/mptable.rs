//! Intel MP table (spec 1.4): which CPUs exist and their APIC ids.

use crate::cpl0::MAX_CPUS;

#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub apic_id: u8,
}

pub struct MpInfo {
    /// Enabled processors, the BSP first, then the others in table order.
    pub cpus: [Cpu; MAX_CPUS],
    pub ncpus: usize,
    /// Enabled processors in the table (may exceed MAX_CPUS).
    pub total: usize,
}

fn byte(addr: usize) -> u8 {
    // SAFETY: low memory (EBDA, BIOS area, the table itself below 4 GiB)
    // is identity mapped; reads have no side effects.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn u16_at(addr: usize) -> u16 {
    u16::from_le_bytes([byte(addr), byte(addr + 1)])
}

fn u32_at(addr: usize) -> u32 {
    u32::from_le_bytes([byte(addr), byte(addr + 1), byte(addr + 2), byte(addr + 3)])
}

fn checksum_ok(addr: usize, len: usize) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(byte(addr + i))) == 0
}

/// Finds the `_MP_` floating pointer in the EBDA or the BIOS area.
fn find_floating() -> Option<usize> {
    for (start, end) in [(0x9fc00usize, 0xa0000usize), (0xf0000, 0x100000)] {
        let mut a = start;
        while a + 16 <= end {
            if byte(a) == b'_' && byte(a + 1) == b'M' && byte(a + 2) == b'P' && byte(a + 3) == b'_' && checksum_ok(a, 16) {
                return Some(a);
            }
            a += 16;
        }
    }
    None
}

pub fn read() -> Option<MpInfo> {
    let fp = find_floating()?;
    let table = u32_at(fp + 4) as usize;
    if table == 0 || u32_at(table) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let len = usize::from(u16_at(table + 4));
    if len < 44 || !checksum_ok(table, len) {
        return None;
    }
    let mut info = MpInfo { cpus: [Cpu::default(); MAX_CPUS], ncpus: 0, total: 0 };
    let mut others = [0u8; 256];
    let mut nothers = 0;
    let mut bsp = None;
    // Walk the entries by the table's length, as Linux does, not by its
    // entry count: some firmware (QEMU microvm's qboot) leaves that 0.
    let mut p = table + 44;
    while p < table + len {
        match byte(p) {
            0 => {
                let id = byte(p + 1);
                let flags = byte(p + 3);
                if flags & 1 != 0 {
                    info.total += 1;
                    if flags & 2 != 0 && bsp.is_none() {
                        bsp = Some(id);
                    } else if nothers < others.len() {
                        others[nothers] = id;
                        nothers += 1;
                    }
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => break, // unknown entry type: its length is unknown too
        }
    }
    let mut push = |id: u8| {
        if info.ncpus < MAX_CPUS {
            info.cpus[info.ncpus] = Cpu { apic_id: id };
            info.ncpus += 1;
        }
    };
    if let Some(id) = bsp {
        push(id);
    }
    for &id in &others[..nothers] {
        push(id);
    }
    Some(info)
}
