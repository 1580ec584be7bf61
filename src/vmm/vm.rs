//! The KVM VM ([`KvmVm`]): in-kernel irqchip and PIT, guest memory slots,
//! and the VM-wide state a snapshot holds (PIC, IOAPIC, PIT, kvmclock).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemoryMmap;
use super::persist::Persist;

/// The only stable KVM API version.
const KVM_API_VERSION: i32 = 12;

/// Three pages below the IOAPIC that Intel VT-x needs for its real-mode TSS.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum KvmVmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("/dev/kvm does not answer as KVM API version {KVM_API_VERSION}")]
    NotKvm,
    #[error("this host's KVM lacks a capability snapvm needs: {0:?}")]
    MissingCapability(Cap),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set up the VM ({what}): {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory with KVM: {0}")]
    RegisterMemory(kvm_ioctls::Error),
    #[error("cannot read KVM's dirty page log: {0}")]
    DirtyLog(kvm_ioctls::Error),
    #[error("cannot save the VM's {what}: {source}")]
    Save {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the VM's {what}: {source}")]
    Restore {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot list the MSRs KVM can save: {0}")]
    MsrList(kvm_ioctls::Error),
}

/// The VM-wide KVM state: interrupt controllers, PIT and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// Host wall-clock time (ns since the epoch) when `clock` was read.
    pub realtime_ns: u64,
}

/// What restoring kvmclock did, for the log.
#[derive(Clone, Copy, Debug)]
pub struct ClockRestore {
    /// Host wall-clock time that passed since the snapshot, in ns.
    pub elapsed_ns: u64,
    /// kvmclock now minus (saved kvmclock + elapsed), in ns: how far the
    /// guest clock is from the host's.
    pub error_ns: i64,
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::Pit2,
    Cap::ExtCpuid,
];

pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
}

impl KvmVm {
    /// Opens KVM and creates a VM with the in-kernel irqchip (PIC, IOAPIC,
    /// LAPICs) and PIT.
    pub fn new() -> Result<Self, KvmVmError> {
        let kvm = Kvm::new().map_err(KvmVmError::OpenKvm)?;
        if kvm.get_api_version() != KVM_API_VERSION {
            return Err(KvmVmError::NotKvm);
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(KvmVmError::MissingCapability(*cap));
        }
        let fd = kvm.create_vm().map_err(KvmVmError::CreateVm)?;
        let setup = |what| move |source| KvmVmError::Setup { what, source };
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(setup("TSS address"))?;
        fd.create_irq_chip().map_err(setup("in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("in-kernel PIT"))?;
        Ok(Self { kvm, fd })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Most vCPUs this host's KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The MSRs KVM can save and restore for this host (its index list).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, KvmVmError> {
        self.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .map_err(KvmVmError::MsrList)
    }

    fn irqchip(&self, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, KvmVmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(|source| KvmVmError::Save { what, source })?;
        Ok(chip)
    }

    /// Saves PIC, IOAPIC, PIT and kvmclock (the vCPUs must be paused).
    fn save_state(&self) -> Result<KvmVmState, KvmVmError> {
        let pic_master = self.irqchip(KVM_IRQCHIP_PIC_MASTER, "master PIC")?;
        let pic_slave = self.irqchip(KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?;
        let ioapic = self.irqchip(KVM_IRQCHIP_IOAPIC, "IOAPIC")?;
        let pit = self.fd.get_pit2().map_err(|source| KvmVmError::Save {
            what: "PIT",
            source,
        })?;
        let clock = self.fd.get_clock().map_err(|source| KvmVmError::Save {
            what: "kvmclock",
            source,
        })?;
        // KVM pairs the clock with the host's realtime when it can.
        let realtime_ns = if clock.flags & KVM_CLOCK_REALTIME != 0 {
            clock.realtime
        } else {
            realtime_ns()
        };
        Ok(KvmVmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
            realtime_ns,
        })
    }

    /// Restores the interrupt controllers and the PIT (before the vCPUs).
    fn restore_irqchip_and_pit(&self, s: &KvmVmState) -> Result<(), KvmVmError> {
        for (chip, what) in [
            (&s.pic_master, "master PIC"),
            (&s.pic_slave, "slave PIC"),
            (&s.ioapic, "IOAPIC"),
        ] {
            self.fd
                .set_irqchip(chip)
                .map_err(|source| KvmVmError::Restore { what, source })?;
        }
        self.fd
            .set_pit2(&s.pit)
            .map_err(|source| KvmVmError::Restore {
                what: "PIT",
                source,
            })
    }

    /// Restores kvmclock advanced by the host time that passed since the
    /// snapshot, so guest time agrees with the host's (a monotonic clock
    /// never goes back: a snapshot from the future is not rewound).
    pub fn restore_clock(&self, s: &KvmVmState) -> Result<ClockRestore, KvmVmError> {
        let elapsed_ns = realtime_ns().saturating_sub(s.realtime_ns);
        let target = s.clock.clock.saturating_add(elapsed_ns);
        let clock = kvm_clock_data {
            clock: target,
            ..Default::default()
        };
        let err = |source| KvmVmError::Restore {
            what: "kvmclock",
            source,
        };
        self.fd.set_clock(&clock).map_err(err)?;
        let expected = s
            .clock
            .clock
            .saturating_add(realtime_ns().saturating_sub(s.realtime_ns));
        let now = self.fd.get_clock().map_err(err)?.clock;
        Ok(ClockRestore {
            elapsed_ns,
            error_ns: now as i64 - expected as i64,
        })
    }

    /// Gives every RAM region to KVM, one memory slot each.
    /// With `log_dirty`, KVM records every page the guest writes (the
    /// dirty log, read with [`KvmVm::take_dirty_log`]) — how a diff snapshot
    /// finds the pages that changed since the restore.
    pub fn register_memory(
        &self,
        mem: &GuestMemoryMmap,
        log_dirty: bool,
    ) -> Result<(), KvmVmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| KvmVmError::RegisterMemory(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region's mapping is owned by `mem`, which the VMM
            // keeps alive for the whole life of the VM, and slots do not
            // overlap because the regions of a GuestMemoryMmap do not.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(KvmVmError::RegisterMemory)?;
        }
        Ok(())
    }

    /// The pages the guest wrote since the memory was registered with
    /// `log_dirty` (or since the last call): one bitmap per region, bit i
    /// of word i / 64 = page i. Reading clears KVM's log.
    pub fn take_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, KvmVmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(KvmVmError::DirtyLog)
            })
            .collect()
    }
}

/// A VM's own state: saved whole; restored in two steps around the
/// vCPUs — [`Persist::restore`] puts back the interrupt controllers and
/// the PIT before the vCPUs exist, [`KvmVm::restore_clock`] kvmclock after
/// their state (MSRs, TSC) is in.
impl Persist for KvmVm {
    type State = KvmVmState;
    type Error = KvmVmError;

    fn save(&self) -> Result<KvmVmState, KvmVmError> {
        self.save_state()
    }

    fn restore(&mut self, state: &KvmVmState) -> Result<(), KvmVmError> {
        self.restore_irqchip_and_pit(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_round_trips_and_the_clock_follows_host_time() {
        let Ok(vm) = KvmVm::new() else {
            eprintln!("no usable /dev/kvm: skipped");
            return;
        };
        let mut saved = vm.save().unwrap();
        // Pretend the snapshot is 3 s old.
        saved.realtime_ns -= 3_000_000_000;
        let json = serde_json::to_string(&saved).unwrap();
        let back: KvmVmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);

        let mut other = KvmVm::new().unwrap();
        other.restore(&back).unwrap();
        let report = other.restore_clock(&back).unwrap();
        assert!(report.elapsed_ns >= 3_000_000_000, "{report:?}");
        assert!(report.error_ns.abs() < 1_000_000_000, "{report:?}");
        let now = other.fd().get_clock().unwrap().clock;
        assert!(
            now >= saved.clock.clock + 3_000_000_000,
            "{now} vs {}",
            saved.clock.clock
        );
        // The interrupt controllers read back as restored.
        let again = other.save().unwrap();
        // SAFETY: reading the plain-data union member that KVM filled for
        // the IOAPIC chip id.
        let (a, b) = unsafe { (again.ioapic.chip.ioapic, back.ioapic.chip.ioapic) };
        assert_eq!(a.base_address, b.base_address);
        assert_eq!(a.id, b.id);
    }
}
