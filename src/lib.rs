//! snapvm: a VM-isolated Function-as-a-Service runtime.
//!
//! `vmm` is the monitor that `firerunner` runs (one process per VM).

pub mod vmm;
