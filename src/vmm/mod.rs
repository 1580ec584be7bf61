//! The virtual machine monitor: KVM VM and vCPUs, guest memory, x86_64
//! boot, devices and the device event loop.
//!
//! Rooms: [`config`] says what to build; [`boot`] builds a fresh VM and
//! [`restore`] rebuilds one from snapshot layers (into a [`shell`] built
//! ahead, or a new VM); [`runner`] runs either
//! until it ends; [`capture`] writes a snapshot of a running VM, whose
//! state is the tree of [`persist::Persist`] states of its parts (each
//! saved and restored beside its own code: [`vcpu`], [`vm`], [`memory`],
//! [`devices`]).

pub(crate) mod boot;
pub mod bus;
pub mod capture;
pub(crate) mod config;
pub mod devices;
pub mod event_loop;
pub(crate) mod kernel;
pub(crate) mod layout;
pub mod memory;
pub mod persist;
pub(crate) mod restore;
pub mod runner;
pub mod seccomp;
pub mod shell;
pub(crate) mod vcpu;
pub(crate) mod vm;
pub(crate) mod x86_64;

/// Most vCPUs a VM may have: the MP table has to fit in the 1 KiB EBDA.
pub const MAX_VCPUS: u8 = 32;

/// Why a VM stopped; each maps to a documented firerunner exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset, KVM system event).
    Reset,
    /// The controller asked the VM to stop, or went away.
    Shutdown,
    /// vCPU `n` triple-faulted.
    TripleFault(u8),
    /// The guest reported that its app failed to load (control port 125).
    AppFailed,
    /// A termination signal (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
    /// An unrecoverable KVM or VMM error, with the details for the log.
    Fatal(String),
    /// A snapshot was written here at the guest's snapshot point.
    Snapshotted(std::path::PathBuf),
}

impl VmExit {
    /// firerunner's exit code for this reason (see the README).
    pub fn code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Shutdown | VmExit::Snapshotted(_) => 0,
            VmExit::TripleFault(_) => 2,
            VmExit::Fatal(_) => 3,
            VmExit::AppFailed => 4,
            VmExit::Signal(s) => 128 + s,
        }
    }
}
