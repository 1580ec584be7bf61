//! The boot path: a fresh VM that enters the kernel. It reads top to
//! bottom — guest memory, the KVM VM, the devices, the kernel, the boot
//! tables, the vCPUs — and hands the built VM to the run loop
//! (`super::runner`).

use std::sync::{Arc, Mutex};

use super::bus::{Bus, BusError};
use super::config::{BootConfig, VmConfig};
use super::devices::{self, DeviceConfig, DeviceError, VirtioDevices};
use super::event_loop::EventManager;
use super::kernel::{self, KernelError};
use super::memory::{self, MemoryError};
use super::runner::{legacy_bus, BuiltVm, Wiring};
use super::vcpu::{Vcpu, VcpuError};
use super::vm::{KvmVm, KvmVmError};
use super::x86_64::cpu_template::{CpuTemplate, CpuTemplateError};
use super::x86_64::{boot_params, cpuid::CpuidShape, mptable, regs};
use super::MAX_VCPUS;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    CpuTemplate(#[from] CpuTemplateError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] KvmVmError),
    #[error("--vcpu_count must be between 1 and {max}, got {got}")]
    VcpuCount { got: u8, max: usize },
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("cannot create the device event loop: {0}")]
    EventLoop(event_manager::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot get KVM's supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("memory registration panicked")]
    Panicked,
}

/// Refuses more vCPUs than this host's KVM allows in one VM.
pub(super) fn check_vcpu_limit(vm: &KvmVm, vcpus: u8) -> Result<(), BootError> {
    let max = vm.max_vcpus().min(MAX_VCPUS as usize);
    if usize::from(vcpus) > max {
        return Err(BootError::VcpuCount { got: vcpus, max });
    }
    Ok(())
}

/// Builds a VM that boots `boot.kernel`.
pub(super) fn boot(
    config: &VmConfig,
    boot: &BootConfig,
    wiring: &Wiring,
) -> Result<BuiltVm, BootError> {
    // Refuse a bad CPU template or an unusable command line before any work.
    let template = match &boot.cpu_template {
        Some(path) => CpuTemplate::from_file(path)?,
        None => CpuTemplate::default(),
    };
    let mut devices = VirtioDevices::open(&DeviceConfig {
        rootfs: &config.rootfs,
        appfs: config.appfs.as_deref(),
        cid: config.cid,
        vsock_uds: &config.vsock_path(),
        net: config.net.as_ref(),
    })?;
    kernel::cmdline(&boot.kernel_args, &[])?;

    let mem = memory::create(config.mem_mib)?;
    let vm = KvmVm::new()?;
    check_vcpu_limit(&vm, config.vcpus)?;
    // KVM_SET_USER_MEMORY_REGION costs milliseconds whatever the size:
    // register the slots on a second thread while the rest is built (vCPUs
    // only run once both are done).
    std::thread::scope(|s| {
        let slots = s.spawn(|| vm.register_memory(&mem, false));
        let rest = build_on(config, boot, &template, &vm, &mem, &mut devices, wiring);
        slots.join().map_err(|_| BootError::Panicked)??;
        rest
    })
    .map(|(vcpus, serial, pio, mmio, event_manager)| {
        let start = wiring.start;
        BuiltVm {
            vm,
            mem,
            vcpus,
            devices,
            serial,
            pio,
            mmio,
            event_manager,
            layers: Vec::new(),
            ws: None,
            on_first_run: Box::new(move || {
                log::info!(
                    "first KVM_RUN {} us after start",
                    start.elapsed().as_micros()
                );
            }),
        }
    })
}

type Built = (
    Vec<Vcpu>,
    Arc<Mutex<devices::serial::SerialDevice>>,
    Bus,
    Bus,
    EventManager,
);

/// Everything but the memory slots: kernel, devices, boot tables, vCPUs.
fn build_on(
    config: &VmConfig,
    boot: &BootConfig,
    template: &CpuTemplate,
    vm: &KvmVm,
    mem: &memory::GuestMemoryMmap,
    devices: &mut VirtioDevices,
    wiring: &Wiring,
) -> Result<Built, BootError> {
    let kernel = kernel::load(mem, &boot.kernel)?;

    // virtio devices on the MMIO bus, in the order of DESIGN.md.
    let mut mmio = Bus::new();
    let mut event_manager = EventManager::new().map_err(BootError::EventLoop)?;
    devices.attach(vm, mem, &mut mmio, &mut event_manager)?;

    // Boot structures.
    let cmdline = kernel::cmdline(&boot.kernel_args, &devices.cmdline_fragments())?;
    let (cmdline_addr, cmdline_size) = kernel::write_cmdline(mem, &cmdline)?;
    log::debug!("kernel command line: {:?}", cmdline.as_cstring().ok());
    boot_params::write(mem, kernel.setup_header, cmdline_addr, cmdline_size)?;
    mptable::setup(mem, config.vcpus)?;
    regs::write_boot_tables(mem)?;

    // Legacy devices on the port-I/O bus.
    let console = devices::console_sink(config.console.as_ref())?;
    let serial = Arc::new(Mutex::new(devices::serial(vm, console)?));
    let pio = legacy_bus(serial.clone(), wiring)?;

    // vCPUs: CPUID for their shape, the template's edits, boot registers.
    let supported = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BootError::Cpuid)?;
    template.check_leaves(&supported)?;
    let tsc_deadline = vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let msrs = Arc::new(vm.msr_index_list()?);
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(vm.fd(), id, msrs.clone())?;
        let shape = CpuidShape {
            cpu_id: id,
            cpu_count: config.vcpus,
            tsc_deadline,
        };
        vcpu.configure(&supported, shape, kernel.entry)?;
        vcpu.apply_cpu_template(template, &supported, shape)?;
        vcpus.push(vcpu);
    }
    Ok((vcpus, serial, pio, mmio, event_manager))
}
