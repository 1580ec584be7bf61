//! vCPUs: configuration for boot, KVM state save and restore, and the
//! per-vCPU thread.
//!
//! Each vCPU thread is a small state machine — running, paused, gone —
//! driven by [`VcpuEvent`]s on a channel and answering on another. A vCPU
//! inside `KVM_RUN` is kicked out by setting `immediate_exit` in its
//! `kvm_run` page and then sending it [`kick_signal`] (a no-op handler):
//! the flag covers the window where the signal lands before the thread
//! enters `KVM_RUN`, the signal the case where it is already inside.
//!
//! Pausing always re-enters `KVM_RUN` once with `immediate_exit` set, which
//! completes a pending port-I/O or MMIO exit without running guest code
//! (KVM API, "immediate_exit"): the saved RIP is past the instruction that
//! exited, e.g. the guest's `outb 124`.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::bus::Bus;
use super::event_loop::Wake;
use super::memory::GuestMemoryMmap;
use super::persist::Persist;
use super::seccomp::{self, ThreadClass};
use super::x86_64::{cpu_template, cpuid, msr, regs};
use super::VmExit;

/// MSR_IA32_TSC_DEADLINE: restored after MSR_IA32_TSC, which it is
/// relative to (and after the LAPIC, whose timer mode gives it meaning).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// How far ahead of its saved value the first vCPU's TSC is written before
/// the saved value ([`Vcpu::step_tsc_away`]): 2^40 cycles, minutes at any
/// TSC frequency, where KVM's synchronization window is one second.
const TSC_STEP: u64 = 1 << 40;
/// Pending exits a pause may have to complete (string I/O can take
/// several rounds); a guard against a loop, never reached in practice.
const MAX_COMPLETION_ROUNDS: usize = 4096;

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
    #[error("cannot map the kvm_run page of vCPU {id}: {source}")]
    MapRun { id: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("cannot save the {what} of vCPU {id}: {source}")]
    Save {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the {what} of vCPU {id}: {reason}")]
    Restore {
        id: u8,
        what: &'static str,
        reason: String,
    },
    #[error("vCPU {id} is not paused; its state cannot be saved")]
    NotPaused { id: u8 },
    #[error("vCPU {id} did not answer within {0:?}", .timeout)]
    Timeout { id: u8, timeout: Duration },
    #[error("vCPU {id} has stopped")]
    Gone { id: u8 },
    #[error("vCPU {id}: {reason}")]
    Failed { id: u8, reason: String },
    #[error("cannot apply the CPU template to vCPU {id}: {source}")]
    CpuTemplate {
        id: u8,
        source: cpu_template::CpuTemplateError,
    },
    #[error("cannot apply the CPU template to vCPU {id}: KVM refused MSR {index:#x}{reason}")]
    TemplateMsr { id: u8, index: u32, reason: String },
}

/// The saved KVM state of one vCPU, in the order KVM wants it restored.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC frequency, when the host reports it.
    pub tsc_khz: Option<u32>,
}

/// What the VM's owner asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Complete any pending exit, then stop running guest code.
    Pause,
    /// Run guest code again. (Unused by firerunner, which exits after a
    /// snapshot; the tests drive the pause/save/resume cycle that
    /// on-demand snapshots will use.)
    #[allow(dead_code)]
    Resume,
    /// Answer with the vCPU's state (only while paused).
    SaveState,
    /// End the thread (the VM is being torn down).
    Stop,
}

/// A vCPU thread's answer to one event.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<VcpuState>),
    Error(String),
}

/// What a running vCPU shares with the rest of the VM.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub exit: Wake<VmExit>,
    /// Called on this vCPU's thread just before its first `KVM_RUN`.
    pub on_first_run: Option<Box<dyn FnOnce() + Send>>,
}

thread_local! {
    /// Set by an exit handler (the control port at a snapshot point) on
    /// the vCPU's own thread: pause right after this exit completes.
    static PAUSE_REQUESTED: Cell<bool> = const { Cell::new(false) };
}

/// Called from an exit handler on a vCPU thread: that vCPU pauses as soon
/// as the handler returns, with the exiting instruction completed.
pub fn pause_this_vcpu() {
    PAUSE_REQUESTED.with(|p| p.set(true));
}

/// The real-time signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (no-op) kick handler once per process.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(|errno| VcpuError::KickHandler(vmm_sys_util::errno::Error::new(errno)))
}

/// A second mapping of a vCPU's `kvm_run` page, owned independently of
/// the `VcpuFd`, through which other threads set `immediate_exit`.
struct RunPage {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only accessed through the atomic byte at
// `immediate_exit`, which is safe from any thread; the pointer itself is
// never handed out.
unsafe impl Send for RunPage {}
// SAFETY: as above: shared access is one atomic byte.
unsafe impl Sync for RunPage {}

impl RunPage {
    fn map(id: u8, fd: &VcpuFd) -> Result<Self, VcpuError> {
        let len = std::mem::size_of::<kvm_bindings::kvm_run>().next_multiple_of(4096);
        // SAFETY: a fresh shared mapping of the vCPU fd's kvm_run area
        // (offset 0, which KVM allows mapping any number of times); the
        // result is checked, and the mapping is unmapped only in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(VcpuError::MapRun {
                id,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { addr, len })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        let offset = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);
        // SAFETY: the byte lies inside the live mapping (offset < len), is
        // suitably aligned for a u8, and KVM reads it with READ_ONCE, so
        // treating it as an atomic is sound for the mapping's lifetime,
        // which outlives the returned reference (bound to &self).
        unsafe { AtomicU8::from_ptr(self.addr.cast::<u8>().add(offset)) }
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`, which no
        // reference outlives (they borrow self).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    run_page: Arc<RunPage>,
    /// The MSRs a snapshot saves: KVM's index list for this host (the
    /// ones this vCPU refuses to read are left out).
    msr_list: Arc<Vec<u32>>,
}

/// How one `KVM_RUN` ended.
enum RunOutcome {
    /// An exit was handled; keep going.
    Handled,
    /// `KVM_RUN` returned EINTR/EAGAIN (a kick, or `immediate_exit`).
    Interrupted,
    /// The VM ends.
    Stop(VmExit),
}

impl Vcpu {
    /// Creates vCPU `id` of `vm`; `msr_list` is what its snapshot saves
    /// (`KvmVm::msr_index_list`).
    pub fn new(vm: &VmFd, id: u8, msr_list: Arc<Vec<u32>>) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let run_page = Arc::new(RunPage::map(id, &fd)?);
        Ok(Self {
            id,
            fd,
            run_page,
            msr_list,
        })
    }

    pub fn id(&self) -> u8 {
        self.id
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

    /// Applies a CPU template after [`Vcpu::configure`]: the CPUID becomes
    /// the fixed-up one with the template's edits on top, and the template's
    /// MSR overrides are written after the boot MSRs. Nothing to do for an
    /// empty template. Must run before the vCPU first runs (KVM refuses a
    /// CPUID change after that).
    pub fn apply_cpu_template(
        &self,
        template: &cpu_template::CpuTemplate,
        supported: &CpuId,
        shape: cpuid::CpuidShape,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        if template.cpuid_edits().next().is_some() {
            let mut cpuid = cpuid::for_vcpu(supported, shape);
            template
                .apply_cpuid(&mut cpuid)
                .map_err(|source| VcpuError::CpuTemplate { id, source })?;
            self.fd
                .set_cpuid2(&cpuid)
                .map_err(|source| VcpuError::SetCpuid { id, source })?;
        }
        let msrs = template
            .msr_list()
            .map_err(|source| VcpuError::CpuTemplate { id, source })?;
        let entries = msrs.as_slice();
        if entries.is_empty() {
            return Ok(());
        }
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::TemplateMsr {
                id,
                index: entries[0].index,
                reason: format!(" (or one after it): {e}"),
            })?;
        if written != entries.len() {
            return Err(VcpuError::TemplateMsr {
                id,
                index: entries[written].index,
                reason: " (this host's KVM does not have it, or not that value)".into(),
            });
        }
        Ok(())
    }

    /// Saves the vCPU's KVM state. The vCPU must not be running. The MSRs
    /// are the candidates of its MSR list; the ones this vCPU refuses to
    /// read are left out.
    ///
    /// Order (KVM's requirements, as Firecracker documents them): CPUID,
    /// then mp_state (reading it may deliver pending LAPIC events), regs,
    /// sregs, xsave, xcrs, debug registers, LAPIC, MSRs (TSC before the
    /// TSC deadline), and vcpu events last (the LAPIC read may change
    /// them).
    fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let msrs: &[u32] = &self.msr_list;
        let id = self.id;
        let err = |what| move |source| VcpuError::Save { id, what, source };
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("CPUID"))?
            .as_slice()
            .to_vec();
        let mp_state = self.fd.get_mp_state().map_err(err("mp_state"))?;
        let regs = self.fd.get_regs().map_err(err("registers"))?;
        let sregs = self.fd.get_sregs().map_err(err("special registers"))?;
        let xsave = self.fd.get_xsave().map_err(err("xsave area"))?;
        let xcrs = match self.fd.get_xcrs() {
            Ok(x) => Some(x),
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => None,
            Err(e) => return Err(err("xcrs")(e)),
        };
        let debugregs = self.fd.get_debug_regs().map_err(err("debug registers"))?;
        let lapic = self.fd.get_lapic().map_err(err("local APIC"))?;
        let msrs = self.save_msrs(msrs)?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let vcpu_events = self.fd.get_vcpu_events().map_err(err("vcpu events"))?;
        Ok(VcpuState {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Reads every MSR in `indexes` that this vCPU accepts, in restore
    /// order: the TSC deadline last, after the TSC.
    fn save_msrs(&self, indexes: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let id = self.id;
        let mut order: Vec<u32> = indexes
            .iter()
            .copied()
            .filter(|&i| i != MSR_IA32_TSC_DEADLINE)
            .collect();
        if indexes.contains(&MSR_IA32_TSC_DEADLINE) {
            order.push(MSR_IA32_TSC_DEADLINE);
        }
        let mut saved = Vec::with_capacity(order.len());
        let mut next = 0;
        while next < order.len() {
            let chunk = &order[next..order.len().min(next + KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Failed {
                id,
                reason: format!("cannot build an MSR list: {e:?}"),
            })?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|source| VcpuError::Save {
                    id,
                    what: "MSRs",
                    source,
                })?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            next += read;
            if read < chunk.len() {
                // KVM stops at the first MSR this vCPU does not have.
                log::trace!("vcpu{id}: MSR {:#x} not readable; skipped", chunk[read]);
                next += 1;
            }
        }
        Ok(saved)
    }

    /// Restores a saved state into this (fresh, not yet running) vCPU:
    /// CPUID first, then mp_state, regs, sregs, xsave, xcrs, debug
    /// registers, LAPIC (after sregs, which hold the APIC base), MSRs
    /// (after the LAPIC; the TSC before the TSC deadline, as saved) and the
    /// vcpu events last.
    fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let id = self.id;
        let err = |what: &'static str| {
            move |e: kvm_ioctls::Error| VcpuError::Restore {
                id,
                what,
                reason: e.to_string(),
            }
        };
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| VcpuError::Restore {
            id,
            what: "CPUID",
            reason: format!("{e:?}"),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(err("CPUID"))?;
        self.fd.set_mp_state(s.mp_state).map_err(err("mp_state"))?;
        self.fd.set_regs(&s.regs).map_err(err("registers"))?;
        self.fd
            .set_sregs(&s.sregs)
            .map_err(err("special registers"))?;
        // SAFETY: `s.xsave` is a whole legacy kvm_xsave (4 KiB); snapvm
        // never enables dynamic xstate features (arch_prctl), so KVM reads
        // no more than that.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(err("xsave area"))?;
        if let Some(xcrs) = &s.xcrs {
            self.fd.set_xcrs(xcrs).map_err(err("xcrs"))?;
        }
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(err("debug registers"))?;
        self.fd.set_lapic(&s.lapic).map_err(err("local APIC"))?;
        if self.id == 0 {
            self.step_tsc_away(s)?;
        }
        for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| VcpuError::Restore {
                id,
                what: "MSRs",
                reason: format!("{e:?}"),
            })?;
            let written = self.fd.set_msrs(&msrs).map_err(err("MSRs"))?;
            if written != chunk.len() {
                return Err(VcpuError::Restore {
                    id,
                    what: "MSRs",
                    reason: format!("KVM refused MSR {:#x}", chunk[written].index),
                });
            }
        }
        if let Some(khz) = s.tsc_khz {
            self.match_tsc_khz(khz);
        }
        self.fd
            .set_vcpu_events(&s.vcpu_events)
            .map_err(err("vcpu events"))?;
        Ok(())
    }

    /// Writes the first vCPU's TSC far ahead of its saved value before
    /// the MSRs are restored. KVM takes a host write of the TSC that lands
    /// within a second of where the VM's last write would be by now for a
    /// synchronization of vCPUs: it keeps the earlier offset (or adds the
    /// time since, where the host TSC is unstable) instead of the value
    /// written. In a VM whose vCPU was made N seconds ago (a shell), a
    /// snapshot whose TSC read about N seconds would then resume with its
    /// TSC seconds off, its timers and clocks with it. After this write the
    /// saved value is far from KVM's expectation and is taken as written;
    /// the other vCPUs' saved values, close to the first's, still count as
    /// synchronized with it.
    fn step_tsc_away(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let Some(saved) = s.msrs.iter().find(|m| m.index == msr::MSR_IA32_TSC) else {
            return Ok(());
        };
        let away = kvm_msr_entry {
            index: msr::MSR_IA32_TSC,
            data: saved.data.wrapping_add(TSC_STEP),
            ..Default::default()
        };
        let fail = |reason: String| VcpuError::Restore {
            id: self.id,
            what: "TSC",
            reason,
        };
        let msrs = Msrs::from_entries(&[away]).map_err(|e| fail(format!("{e:?}")))?;
        match self.fd.set_msrs(&msrs) {
            Ok(1) => Ok(()),
            Ok(_) => Err(fail("KVM refused the TSC".into())),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// Warns (or scales, where KVM can) when the guest TSC frequency the
    /// snapshot saw differs from this vCPU's.
    fn match_tsc_khz(&self, saved: u32) {
        let Ok(now) = self.fd.get_tsc_khz() else {
            return;
        };
        // Within 250 ppm is the same clock (NTP-grade tolerance).
        if u64::from(now.abs_diff(saved)) * 4000 <= u64::from(saved) {
            return;
        }
        match self.fd.set_tsc_khz(saved) {
            Ok(()) => log::info!("vcpu{}: TSC scaled from {now} to {saved} kHz", self.id),
            Err(e) => log::warn!(
                "vcpu{}: snapshot TSC ran at {saved} kHz, this host at {now} kHz, and KVM \
                 cannot scale it ({e}); guest time may drift",
                self.id
            ),
        }
    }

    /// Starts the vCPU thread (running guest code).
    pub fn spawn(self, ctx: VcpuContext) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let (event_tx, event_rx) = unbounded();
        let (resp_tx, resp_rx) = bounded(4);
        let run_page = self.run_page.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(ctx, event_rx, resp_tx))
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            events: event_tx,
            responses: resp_rx,
            run_page,
            thread,
        })
    }

    /// The thread's state machine.
    fn run(mut self, mut ctx: VcpuContext, events: Receiver<VcpuEvent>, out: Sender<VcpuResponse>) {
        if let Err(e) = seccomp::install(ThreadClass::Vcpu) {
            return self.stop(&ctx, VmExit::Fatal(format!("vcpu{}: {e}", self.id)));
        }
        let mut paused = false;
        if let Some(f) = ctx.on_first_run.take() {
            f();
        }
        loop {
            let event = if paused {
                match events.recv() {
                    Ok(e) => e,
                    Err(_) => return,
                }
            } else {
                // Clear a kick before looking at the events: a kick that
                // comes after this makes the next KVM_RUN return at once.
                self.run_page.immediate_exit().swap(0, Ordering::SeqCst);
                match events.try_recv() {
                    Ok(e) => e,
                    Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => {
                        match self.run_once(&ctx) {
                            RunOutcome::Handled | RunOutcome::Interrupted => {}
                            RunOutcome::Stop(exit) => return self.stop(&ctx, exit),
                        }
                        if PAUSE_REQUESTED.with(|p| p.replace(false)) {
                            if let Err(exit) = self.pause(&ctx) {
                                return self.stop(&ctx, exit);
                            }
                            paused = true;
                        }
                        continue;
                    }
                }
            };
            let reply = match event {
                VcpuEvent::Pause => {
                    if !paused {
                        if let Err(exit) = self.pause(&ctx) {
                            return self.stop(&ctx, exit);
                        }
                        paused = true;
                    }
                    VcpuResponse::Paused
                }
                VcpuEvent::Resume => {
                    paused = false;
                    VcpuResponse::Resumed
                }
                VcpuEvent::SaveState if paused => match self.save() {
                    Ok(s) => VcpuResponse::State(Box::new(s)),
                    Err(e) => VcpuResponse::Error(e.to_string()),
                },
                VcpuEvent::SaveState => {
                    VcpuResponse::Error(VcpuError::NotPaused { id: self.id }.to_string())
                }
                VcpuEvent::Stop => return,
            };
            if out.send(reply).is_err() {
                return;
            }
        }
    }

    /// Reports why the VM ends; the owner exits the process.
    fn stop(&self, ctx: &VcpuContext, exit: VmExit) {
        let _ = ctx.exit.send(exit);
    }

    /// Completes a pending exit without running guest code, then tells the
    /// guest's kvmclock it was paused.
    fn pause(&mut self, ctx: &VcpuContext) -> Result<(), VmExit> {
        for _ in 0..MAX_COMPLETION_ROUNDS {
            self.fd.set_kvm_immediate_exit(1);
            match self.run_once(ctx) {
                RunOutcome::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    PAUSE_REQUESTED.with(|p| p.set(false));
                    // EINVAL: the guest does not use kvmclock.
                    if let Err(e) = self.fd.kvmclock_ctrl() {
                        log::trace!("vcpu{}: KVM_KVMCLOCK_CTRL: {e}", self.id);
                    }
                    return Ok(());
                }
                RunOutcome::Handled => {}
                RunOutcome::Stop(exit) => return Err(exit),
            }
        }
        Err(VmExit::Fatal(format!(
            "vcpu{}: a pending exit did not complete while pausing",
            self.id
        )))
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self, ctx: &VcpuContext) -> RunOutcome {
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if ctx.pio.read(u64::from(port), data).is_err() {
                    // Nothing decodes this port: the bus floats high.
                    data.fill(0xff);
                }
                return RunOutcome::Handled;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if ctx.pio.write(u64::from(port), data).is_err() {
                    log::trace!("vcpu{}: write to unclaimed port {port:#x}", self.id);
                }
                return RunOutcome::Handled;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if ctx.mmio.read(addr, data).is_err() {
                    log::debug!("vcpu{}: read of unclaimed MMIO {addr:#x}", self.id);
                    data.fill(0xff);
                }
                return RunOutcome::Handled;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if ctx.mmio.write(addr, data).is_err() {
                    log::debug!("vcpu{}: write to unclaimed MMIO {addr:#x}", self.id);
                }
                return RunOutcome::Handled;
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
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return RunOutcome::Interrupted
            }
            Err(e) => VmExit::Fatal(format!("KVM_RUN failed: {e}")),
        };
        RunOutcome::Stop(exit)
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

impl Persist for Vcpu {
    type State = VcpuState;
    type Error = VcpuError;

    fn save(&self) -> Result<VcpuState, VcpuError> {
        self.save_state()
    }

    fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        self.restore_state(state)
    }
}

/// The owner's end of a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    run_page: Arc<RunPage>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Queues `event` and kicks the vCPU out of `KVM_RUN` so it sees it.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone { id: self.id })?;
        self.kick();
        Ok(())
    }

    fn kick(&self) {
        self.run_page.immediate_exit().store(1, Ordering::SeqCst);
        if let Err(e) = self.thread.kill(kick_signal()) {
            // ESRCH: the thread has ended; its response channel says so.
            log::debug!("vcpu{}: cannot signal the thread: {e}", self.id);
        }
    }

    /// The vCPU's next answer.
    pub fn recv(&self, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        match self.responses.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout {
                id: self.id,
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone { id: self.id }),
        }
    }
}

/// Every vCPU of a VM, driven together.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
}

impl Vcpus {
    pub fn new(handles: Vec<VcpuHandle>) -> Self {
        Self { handles }
    }

    /// Sends `event` to every vCPU, then collects one answer from each.
    fn broadcast(
        &self,
        event: impl Fn() -> VcpuEvent,
        timeout: Duration,
    ) -> Result<Vec<VcpuResponse>, VcpuError> {
        for h in &self.handles {
            h.send(event())?;
        }
        let deadline = Instant::now() + timeout;
        self.handles
            .iter()
            .map(|h| h.recv(deadline.saturating_duration_since(Instant::now())))
            .collect()
    }

    /// Pauses every vCPU (each completes its pending exit first).
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        for (h, r) in self
            .handles
            .iter()
            .zip(self.broadcast(|| VcpuEvent::Pause, timeout)?)
        {
            if !matches!(r, VcpuResponse::Paused) {
                return Err(VcpuError::Failed {
                    id: h.id,
                    reason: format!("answered {r:?} to pause"),
                });
            }
        }
        Ok(())
    }

    /// Resumes every vCPU (see [`VcpuEvent::Resume`]).
    #[allow(dead_code)]
    pub fn resume(&self, timeout: Duration) -> Result<(), VcpuError> {
        for (h, r) in self
            .handles
            .iter()
            .zip(self.broadcast(|| VcpuEvent::Resume, timeout)?)
        {
            if !matches!(r, VcpuResponse::Resumed) {
                return Err(VcpuError::Failed {
                    id: h.id,
                    reason: format!("answered {r:?} to resume"),
                });
            }
        }
        Ok(())
    }

    /// Ends every vCPU thread and waits for them, at most `timeout` in
    /// all. Returns whether they all ended (a thread that did not is left
    /// running; the process exit ends it).
    pub fn stop(self, timeout: Duration) -> bool {
        for h in &self.handles {
            // A thread that already ended has closed its channel.
            let _ = h.send(VcpuEvent::Stop);
        }
        let deadline = Instant::now() + timeout;
        let mut all = true;
        for h in self.handles {
            // The response channel closes when the thread returns.
            let ended = loop {
                match h.responses.recv_deadline(deadline) {
                    Ok(_) => continue,
                    Err(RecvTimeoutError::Disconnected) => break true,
                    Err(RecvTimeoutError::Timeout) => break false,
                }
            };
            if ended {
                let _ = h.thread.join();
            } else {
                log::warn!("vcpu{} did not stop within {timeout:?}", h.id);
                all = false;
            }
        }
        all
    }

    /// The state of every (paused) vCPU, in id order.
    pub fn save(&self, timeout: Duration) -> Result<Vec<VcpuState>, VcpuError> {
        self.handles
            .iter()
            .zip(self.broadcast(|| VcpuEvent::SaveState, timeout)?)
            .map(|(h, r)| match r {
                VcpuResponse::State(s) => Ok(*s),
                VcpuResponse::Error(reason) => Err(VcpuError::Failed { id: h.id, reason }),
                other => Err(VcpuError::Failed {
                    id: h.id,
                    reason: format!("answered {other:?} to save"),
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pause, save, resume on real KVM with a tiny real-mode guest that
    /// loops writing a port: the pause lands right after an `out`, with
    /// RIP past it.
    #[test]
    fn pause_completes_the_port_write_and_state_round_trips() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = super::super::memory::create(2).unwrap();
        // 0x1000: mov al, 1; out 0x80, al; inc al... as a loop:
        // b0 01        mov al, 1
        // e6 80        out 0x80, al
        // eb fc        jmp -4 (back to the out)
        let code = [0xb0, 0x01, 0xe6, 0x80, 0xeb, 0xfc];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        let host = {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            let r = mem.iter().next().unwrap();
            r.get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap() as u64
        };
        // SAFETY: `mem` outlives the VM in this test.
        unsafe {
            vm.set_user_memory_region(kvm_bindings::kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: 2 << 20,
                userspace_addr: host,
            })
            .unwrap();
        }
        let msrs = Arc::new(kvm.get_msr_index_list().unwrap().as_slice().to_vec());
        let vcpu = Vcpu::new(&vm, 0, msrs.clone()).unwrap();
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.fd.set_sregs(&sregs).unwrap();
        let regs = kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        };
        vcpu.fd.set_regs(&regs).unwrap();

        let (exit_tx, exit_rx) = unbounded();
        let waker = super::super::event_loop::Waker::new().unwrap();
        let handle = vcpu
            .spawn(VcpuContext {
                pio: Arc::new(Bus::new()),
                mmio: Arc::new(Bus::new()),
                mem: mem.clone(),
                exit: Wake::new(exit_tx, &waker),
                on_first_run: None,
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let vcpus = Vcpus::new(vec![handle]);
        let t = Duration::from_secs(10);
        vcpus.pause(t).unwrap();
        let states = vcpus.save(t).unwrap();
        let s = &states[0];
        // Paused inside the loop, never on the `out` itself: a completed
        // port write leaves RIP at the jmp.
        assert!([0x1002, 0x1004].contains(&s.regs.rip), "{:#x}", s.regs.rip);
        assert!(!s.msrs.is_empty());
        assert!(s.msrs.iter().any(|m| m.index == msr::MSR_IA32_TSC));
        // JSON round trip.
        let json = serde_json::to_string(s).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, s.regs.rip);
        assert_eq!(back.msrs.len(), s.msrs.len());
        vcpus.resume(t).unwrap();
        vcpus.pause(t).unwrap();
        assert!(exit_rx.try_recv().is_err());

        // The state restores into a fresh vCPU of another VM.
        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        let mut v2 = Vcpu::new(&vm2, 0, msrs).unwrap();
        v2.restore(&back).unwrap();
        assert_eq!(v2.fd.get_regs().unwrap().rip, s.regs.rip);
    }
}
