//! snapvm: a VM-isolated Function-as-a-Service runtime.
//!
//! `vmm` is the monitor that `firerunner` runs (one process per VM).

pub mod cli;
pub mod control;
pub mod jail;
pub mod launcher;
pub mod multivm;
pub mod network;
pub mod protocol;
pub mod singlevm;
pub mod snapshot;
pub mod vmm;
