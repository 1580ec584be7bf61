//! The KVM VM: in-kernel irqchip and PIT, guest memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemoryMmap;

/// The only stable KVM API version.
const KVM_API_VERSION: i32 = 12;

/// Three pages below the IOAPIC that Intel VT-x needs for its real-mode TSS.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
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
}

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::Pit2,
    Cap::ExtCpuid,
];

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens KVM and creates a VM with the in-kernel irqchip (PIC, IOAPIC,
    /// LAPICs) and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        if kvm.get_api_version() != KVM_API_VERSION {
            return Err(VmError::NotKvm);
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(VmError::MissingCapability(*cap));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let setup = |what| move |source| VmError::Setup { what, source };
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

    /// Gives every RAM region to KVM, one memory slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::RegisterMemory(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region's mapping is owned by `mem`, which the VMM
            // keeps alive for the whole life of the VM, and slots do not
            // overlap because the regions of a GuestMemoryMmap do not.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(VmError::RegisterMemory)?;
        }
        Ok(())
    }
}
