//! The Linux zero page (`struct boot_params`): setup header, command line
//! pointer and an e820 map that matches the RAM regions.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::vmm::layout::{EBDA_END, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::vmm::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("guest memory has more regions than the zero page's e820 table holds")]
    TooManyE820Entries,
    #[error("cannot write the zero page: {0}")]
    Write(linux_loader::configurator::Error),
}

/// The e820 map for `mem`: conventional memory below the EBDA, the EBDA and
/// BIOS area reserved, then every RAM region from 1 MiB upwards.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        let start = start.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes the zero page. `setup` is the bzImage's own setup header, if the
/// kernel was one.
pub fn write(
    mem: &GuestMemoryMmap,
    setup: Option<setup_header>,
    cmdline_addr: u64,
    cmdline_size: usize,
) -> Result<(), BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = cmdline_addr as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;

    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries);
    }
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;

    #[test]
    fn e820_follows_the_ram_regions() {
        let mem = memory::create(4096).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (3 << 30) - HIMEM_START, E820_RAM));
        assert_eq!(map[3], (4 << 30, 1 << 30, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4096 << 20) - (EBDA_END - EBDA_START));
    }
}
