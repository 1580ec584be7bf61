//! Emulated devices: legacy PC devices on the port-I/O bus and virtio-mmio
//! devices on the MMIO bus.

pub mod control;
pub mod i8042;
pub mod serial;
pub mod virtio;
