//! Per-vCPU CPUID: what KVM supports, with the topology and identity
//! fix-ups a guest needs to see a consistent machine.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bits.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX HTT: EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;
/// Extended topology level types (leaf 0xb / 0x1f, ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// What shapes the CPUID a vCPU sees.
#[derive(Clone, Copy, Debug)]
pub struct CpuidShape {
    pub cpu_id: u8,
    pub cpu_count: u8,
    /// The host's KVM can deliver the LAPIC TSC-deadline timer.
    pub tsc_deadline: bool,
}

/// Bits needed to hold APIC ids 0..count-1.
fn id_bits(count: u8) -> u32 {
    (u32::from(count.max(1)) - 1)
        .checked_ilog2()
        .map_or(0, |b| b + 1)
}

fn fix_entry(e: &mut kvm_cpuid_entry2, shape: CpuidShape) {
    let apic_id = u32::from(shape.cpu_id);
    let count = u32::from(shape.cpu_count);
    match e.function {
        0x1 => {
            // Initial APIC id, logical processors per package, CLFLUSH line
            // size in 8-byte units.
            e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR;
            if shape.tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            } else {
                e.ecx &= !ECX_TSC_DEADLINE;
            }
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        // Deterministic cache parameters (only entries that describe a
        // cache): EAX[31:26] = cores per package - 1, EAX[25:14] = logical
        // processors sharing the cache - 1 (L2 and up are shared by all).
        0x4 if e.eax & 0x1f != 0 => {
            e.eax &= 0x3fff;
            e.eax |= (count - 1) << 26;
            let cache_level = (e.eax >> 5) & 0x7;
            if cache_level >= 2 {
                e.eax |= (count - 1) << 14;
            }
        }
        0x6 => {
            // No thermal/power management MSRs are emulated.
            e.ecx &= !1; // hardware coordination feedback (APERF/MPERF)
        }
        0xa => {
            // No virtual PMU.
            *e = kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                ..Default::default()
            };
        }
        0xb | 0x1f => {
            // Extended topology: one thread per core, `count` cores per package.
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = id_bits(shape.cpu_count);
                    e.ebx = count;
                    e.ecx = (LEVEL_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        0x8000_0008 => {
            // AMD: ECX[15:12] APIC id size, ECX[7:0] cores per package - 1.
            e.ecx = (id_bits(shape.cpu_count) << 12) | (count - 1);
        }
        0x8000_001e => {
            // AMD: extended APIC id, one thread per core, core id = APIC id.
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

/// Applies the per-vCPU fix-ups to a copy of KVM's supported CPUID.
pub fn for_vcpu(supported: &CpuId, shape: CpuidShape) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        fix_entry(e, shape);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        fix_entry(
            &mut e,
            CpuidShape {
                cpu_id: 3,
                cpu_count: 4,
                tsc_deadline: true,
            },
        );
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_the_cores() {
        let shape = CpuidShape {
            cpu_id: 2,
            cpu_count: 3,
            tsc_deadline: false,
        };
        let mut core = entry(0xb, 1);
        fix_entry(&mut core, shape);
        assert_eq!(core.eax, 2); // 3 cores need 2 id bits
        assert_eq!(core.ebx, 3);
        assert_eq!(core.edx, 2);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
