//! Intel MultiProcessor Specification 1.4 tables, so a guest finds its CPUs,
//! the IOAPIC and the ISA interrupt wiring the way it would on a PC.

use vm_memory::{Bytes, GuestAddress};

use crate::vmm::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::vmm::memory::GuestMemoryMmap;

/// Pins of the in-kernel IOAPIC.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPU signature reported in processor entries (family 6); features: FPU, APIC.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("the MP table does not fit in the EBDA")]
    TooLarge,
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

fn interrupt_entry(kind: u8, int_type: u8, src_irq: u8, dst_apic: u8, dst_pin: u8) -> [u8; 8] {
    // flags 0 = conforms to the bus (edge, active high on ISA).
    [kind, int_type, 0, 0, 0, src_irq, dst_apic, dst_pin]
}

/// Builds the MP floating pointer followed by the configuration table, as
/// placed at `base`.
fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&interrupt_entry(
            ENTRY_IOINT,
            INT_TYPE_INT,
            pin,
            ioapic_id,
            pin,
        ));
    }
    // LINT0 is the PIC's ExtINT, LINT1 the NMI, on every local APIC.
    entries.extend_from_slice(&interrupt_entry(ENTRY_LINT, INT_TYPE_EXTINT, 0, 0xff, 0));
    entries.extend_from_slice(&interrupt_entry(ENTRY_LINT, INT_TYPE_NMI, 0, 0xff, 1));
    let entry_count = u16::from(num_cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"SNAPVM  ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = base + FLOATING_LEN as u64;
    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4);
    floating.push(0); // checksum
    floating.extend_from_slice(&[0; 5]); // feature bytes: table present, no default config
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs (APIC ids 0..n) into the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(EBDA_START, num_cpus)?;
    if EBDA_START + bytes.len() as u64 > 0xa0000 {
        return Err(MptableError::TooLarge);
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_consistent() {
        for n in [1u8, 2, 4, 32] {
            let b = build(EBDA_START, n).unwrap();
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let table = &b[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(n) + 2 + 24 + 2);
            // Only the first CPU is the BSP.
            let cpus: Vec<&[u8]> = table[44..].chunks(20).take(n as usize).collect();
            assert!(cpus
                .iter()
                .enumerate()
                .all(|(i, e)| e[0] == 0 && e[1] == i as u8));
            assert_eq!(cpus.iter().filter(|e| e[3] & CPU_BSP != 0).count(), 1);
        }
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(build(EBDA_START, 0).is_err());
        assert!(build(EBDA_START, 255).is_err());
        // The largest VM we offer still fits in the 1 KiB EBDA.
        let max = build(EBDA_START, crate::vmm::MAX_VCPUS).unwrap();
        assert!(EBDA_START as usize + max.len() <= 0xa0000);
    }
}
