//! Guest physical address map of an x86_64 snapvm microVM.
//!
//! The map follows a small PC: low RAM with the boot structures Linux
//! expects, the kernel at 1 MiB, a 1 GiB hole below 4 GiB for MMIO
//! (virtio-mmio devices, IOAPIC, LAPIC), and RAM continuing at 4 GiB.

/// GDT used at boot (entries: null, code64, data, TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT installed at boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page"); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, PD (first 1 GiB with 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass, including the terminating NUL
/// (Linux x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives here, reserved in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory; 0xa0000..1 MiB is reserved (VGA, BIOS).
pub const EBDA_END: u64 = 0x10_0000;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM that does not fit below it
/// continues at [`HIGH_RAM_START`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// One past the end of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First RAM address above the hole.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// virtio-mmio devices: one 4 KiB window each, in device order.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; the next devices use the next lines.
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// IOAPIC and local APIC MMIO windows (emulated by the in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy I/O ports.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// snapvm control port (boot done, snapshot point, ...), see DESIGN.md.
pub const CONTROL_PORT: u16 = 0x3f0;

/// Guest RAM as (start, size) regions for `mem_bytes` of memory,
/// split around the MMIO hole like a real machine.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (HIGH_RAM_START, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_memory_is_split_around_the_hole() {
        let r = ram_regions(4096 << 20);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4096 << 20);
    }
}
