//! vCPUs: configuration for boot and the per-vCPU run loop thread.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use super::bus::Bus;
use super::memory::GuestMemoryMmap;
use super::x86_64::{cpuid, msr, regs};
use super::VmExit;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("cannot set the CPUID of vCPU {id}: {source}")]
    SetCpuid { id: u8, source: kvm_ioctls::Error },
    #[error("cannot set the boot MSRs of vCPU {id}: {reason}")]
    SetMsrs { id: u8, reason: String },
    #[error("cannot set up the registers of vCPU {id}: {source}")]
    Regs { id: u8, source: regs::RegsError },
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn { id: u8, source: std::io::Error },
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

/// What a running vCPU shares with the rest of the VM.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub exit: Sender<VmExit>,
    pub start: Instant,
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Self { id, fd })
    }

    /// Sets CPUID, MSRs, FPU and LAPIC wiring. The boot vCPU (id 0) also
    /// gets the long-mode register state to enter the kernel at `entry`; the
    /// others wait for INIT-SIPI-SIPI as on hardware.
    pub fn configure(
        &self,
        supported: &CpuId,
        shape: cpuid::CpuidShape,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        self.fd
            .set_cpuid2(&cpuid::for_vcpu(supported, shape))
            .map_err(|source| VcpuError::SetCpuid { id, source })?;
        let msrs = msr::boot_msrs().map_err(|e| VcpuError::SetMsrs {
            id,
            reason: e.to_string(),
        })?;
        let written = self.fd.set_msrs(&msrs).map_err(|e| VcpuError::SetMsrs {
            id,
            reason: e.to_string(),
        })?;
        if written != msrs.as_slice().len() {
            let failed = msrs.as_slice()[written].index;
            return Err(VcpuError::SetMsrs {
                id,
                reason: format!("KVM refused MSR {failed:#x}"),
            });
        }
        let regs_err = |source| VcpuError::Regs { id, source };
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        regs::setup_lint(&self.fd).map_err(regs_err)?;
        if id == 0 {
            regs::setup_boot_cpu(&self.fd, entry).map_err(regs_err)?;
        }
        Ok(())
    }

    /// Starts the run loop on its own thread.
    pub fn spawn(self, ctx: VcpuContext) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(ctx))
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn run(mut self, ctx: VcpuContext) {
        let mut first = true;
        loop {
            if first && self.id == 0 {
                log::info!(
                    "first KVM_RUN {} us after start",
                    ctx.start.elapsed().as_micros()
                );
                first = false;
            }
            let exit = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if ctx.pio.read(u64::from(port), data).is_err() {
                        // Nothing decodes this port: the bus floats high.
                        data.fill(0xff);
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if ctx.pio.write(u64::from(port), data).is_err() {
                        log::trace!("vcpu{}: write to unclaimed port {port:#x}", self.id);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if ctx.mmio.read(addr, data).is_err() {
                        log::debug!("vcpu{}: read of unclaimed MMIO {addr:#x}", self.id);
                        data.fill(0xff);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if ctx.mmio.write(addr, data).is_err() {
                        log::debug!("vcpu{}: write to unclaimed MMIO {addr:#x}", self.id);
                    }
                    continue;
                }
                Ok(VcpuExit::Shutdown) => VmExit::TripleFault(self.id),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    log::info!("vcpu{}: system event {kind}", self.id);
                    VmExit::Reset
                }
                Ok(VcpuExit::InternalError) => VmExit::Fatal(format!(
                    "KVM internal error (emulation failure?); {}",
                    self.dump(&ctx.mem)
                )),
                Ok(VcpuExit::FailEntry(reason, cpu)) => VmExit::Fatal(format!(
                    "KVM entry failure, hardware reason {reason:#x} on cpu {cpu}; {}",
                    self.dump(&ctx.mem)
                )),
                Ok(VcpuExit::Hlt) => VmExit::Fatal(format!(
                    "vCPU halted in userspace, which the in-kernel irqchip should prevent; {}",
                    self.dump(&ctx.mem)
                )),
                Ok(other) => {
                    let what = format!("{other:?}");
                    VmExit::Fatal(format!(
                        "unexpected KVM exit {what}; {}",
                        self.dump(&ctx.mem)
                    ))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => VmExit::Fatal(format!("KVM_RUN failed: {e}")),
            };
            // The VM ends: report and stop this vCPU. The owner exits the
            // process, which tears down the other vCPUs.
            let _ = ctx.exit.send(exit);
            return;
        }
    }

    /// Registers and the instruction bytes at RIP, for a fatal-exit log line.
    fn dump(&self, mem: &GuestMemoryMmap) -> String {
        let (regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => return format!("registers unavailable: {e}"),
        };
        let mut bytes = [0u8; 16];
        let code = match self.fd.translate_gva(regs.rip) {
            Ok(t) if t.valid != 0 => {
                match mem.read_slice(&mut bytes, GuestAddress(t.physical_address)) {
                    Ok(()) => bytes
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    Err(e) => format!("unreadable ({e})"),
                }
            }
            _ => "unmapped".to_string(),
        };
        format!(
            "vcpu{} rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
             cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}; code at rip: {code}",
            self.id, regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi,
            regs.rdi, sregs.cs.selector, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
        )
    }
}
