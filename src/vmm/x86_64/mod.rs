//! x86_64 boot plumbing: CPUID, MSRs, registers and page tables for the
//! Linux 64-bit boot protocol, the MP table and the zero page.

pub mod boot_params;
pub mod cpu_template;
pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod regs;
