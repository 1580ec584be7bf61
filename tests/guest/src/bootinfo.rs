//! What the VMM hands over in `struct boot_params` (Linux zero page): the
//! command line and the e820 memory map. Copied out first thing, before
//! any low memory is reused.

/// Linux x86 COMMAND_LINE_SIZE, NUL included.
pub const CMDLINE_MAX: usize = 2048;
const E820_MAX: usize = 128;
pub const E820_RAM: u32 = 1;

const OFF_EXT_CMD_LINE_PTR: usize = 0x0c8;
const OFF_E820_ENTRIES: usize = 0x1e8;
const OFF_CMD_LINE_PTR: usize = 0x228;
const OFF_E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;

#[derive(Clone, Copy, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

pub struct BootInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    e820: [E820Entry; E820_MAX],
    e820_len: usize,
}

fn read_u32(addr: usize) -> u32 {
    // SAFETY: boot_params and the command line sit in low RAM, identity
    // mapped and user-accessible; unaligned reads are explicit.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn read_u64(addr: usize) -> u64 {
    // SAFETY: as for read_u32.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

fn read_u8(addr: usize) -> u8 {
    // SAFETY: as for read_u32.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

impl BootInfo {
    /// Copies what we use out of the boot_params at `zero_page`.
    pub fn read(zero_page: usize) -> BootInfo {
        let mut info = BootInfo {
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            e820: [E820Entry::default(); E820_MAX],
            e820_len: 0,
        };
        let ptr = u64::from(read_u32(zero_page + OFF_CMD_LINE_PTR))
            | (u64::from(read_u32(zero_page + OFF_EXT_CMD_LINE_PTR)) << 32);
        if ptr != 0 {
            while info.cmdline_len < CMDLINE_MAX - 1 {
                let b = read_u8(ptr as usize + info.cmdline_len);
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
        let n = usize::from(read_u8(zero_page + OFF_E820_ENTRIES)).min(E820_MAX);
        for i in 0..n {
            let e = zero_page + OFF_E820_TABLE + i * E820_ENTRY_SIZE;
            info.e820[i] = E820Entry {
                addr: read_u64(e),
                size: read_u64(e + 8),
                kind: read_u32(e + 16),
            };
        }
        info.e820_len = n;
        info
    }

    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The usable RAM ranges (e820 type 1).
    pub fn ram(&self) -> impl Iterator<Item = E820Entry> + '_ {
        self.e820[..self.e820_len].iter().copied().filter(|e| e.kind == E820_RAM && e.size > 0)
    }

    /// The RAM range containing `[addr, addr + len)`, if one does.
    pub fn ram_range_holding(&self, addr: u64, len: u64) -> Option<E820Entry> {
        self.ram().find(|e| e.addr <= addr && addr.saturating_add(len) <= e.end())
    }
}
