//! The floor a snapshot restore is measured against (scripts/bench-snapshot.sh):
//! create a KVM VM, register `--mem_size` MiB of anonymous memory, create
//! one vCPU and enter `KVM_RUN` — nothing else. Prints one line with the
//! time from the parent's spawn (`SNAPVM_SPAWN_MONO_NS`, CLOCK_MONOTONIC
//! ns set just before exec) to just before the first `KVM_RUN`, the same
//! point firerunner's "first KVM_RUN ... us after spawn" reports.
//!
//! Usage: restore_floor [--mem_size MiB]

use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn main() {
    let main_ns = mono_ns();
    let start = Instant::now();
    let mut args = std::env::args().skip(1);
    let mut mib: usize = 128;
    while let Some(a) = args.next() {
        if a == "--mem_size" || a == "--mem-size" {
            mib = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--mem_size MiB");
        }
    }
    let spawned = std::env::var("SNAPVM_SPAWN_MONO_NS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    vm.create_irq_chip().expect("irqchip");
    let t_vm = start.elapsed();
    let size = mib << 20;
    // SAFETY: a fresh private anonymous mapping; checked below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED, "mmap");
    // A real-mode guest at 0x1000: `hlt` (0xf4)... but with the in-kernel
    // irqchip hlt blocks, so write to a port instead: out 0x80, al.
    // SAFETY: the mapping is at least 2 pages and ours alone.
    unsafe {
        std::ptr::copy_nonoverlapping([0xe6u8, 0x80].as_ptr(), host.cast::<u8>().add(0x1000), 2)
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping lives until the process exits.
    unsafe { vm.set_user_memory_region(region) }.expect("register memory");
    let t_mem = start.elapsed();
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("sregs");
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("regs");
    let t_run = start.elapsed();
    let exit = vcpu.run().map(|e| matches!(e, VcpuExit::IoOut(0x80, _)));
    let t_exit = start.elapsed();
    let exec = spawned.map_or(0, |s| main_ns.saturating_sub(s) / 1000);
    println!(
        "floor: spawn→main {exec}, create VM {}, register {} MiB {}, →first KVM_RUN {}, \
         first exit {} (port write: {:?}); first KVM_RUN {} us after spawn",
        t_vm.as_micros(),
        mib,
        (t_mem - t_vm).as_micros(),
        (t_run - t_mem).as_micros(),
        (t_exit - t_run).as_micros(),
        exit.is_ok_and(|x| x),
        exec + t_run.as_micros() as u64
    );
}
