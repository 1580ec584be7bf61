//! Persistence beside each part: the [`Persist`] trait every saved part of
//! a VM implements next to its own code (vCPU, KVM VM, serial port, virtio
//! transport, block, vsock), and [`MicrovmState`], the tree of their
//! states that `snapshot.json` holds.
//!
//! The tree is built by walking the VM's parts — the device list
//! (`vmm::devices::VirtioDevices`) saves every virtio device in slot
//! order — so a new device cannot be left out of its snapshot. Each
//! part's state is its own type: handing a block device a vsock state does
//! not compile. A snapshot *file* whose device list differs from the VM's
//! is refused when it is loaded (`vmm::restore`), before any part is
//! touched.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::devices::serial::SerialPersist;
use super::devices::VirtioDeviceState;
use super::vcpu::VcpuState;
use super::vm::KvmVmState;
use crate::snapshot::format::{self, DiskIdentity, FormatError, MemoryTable, VmShape};

/// A part of a VM that a snapshot saves and a restore puts back.
///
/// A restore builds the part afresh from the command line (a device from
/// its image path, a vCPU from its VM) and then applies the saved state
/// with [`Persist::restore`]; the part performs its own side effects there
/// (vsock tells the guest its connections are gone, block announces a
/// resized image).
pub trait Persist {
    /// What the snapshot holds for this part.
    type State;
    type Error;
    /// Captures the part's state; the VM is paused.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Puts `state` back into a freshly built part, before the VM runs.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// Everything a snapshot layer's state file holds: the snapshot's own
/// description (shape, rootfs identity, memory table) and the tree of the
/// VM's part states. Field names and order are the file format (version
/// [`format::VERSION`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// Host wall-clock time of the snapshot, ns since the epoch.
    pub created_ns: u64,
    /// The snapvm version that wrote it (informational).
    pub snapvm: String,
    pub shape: VmShape,
    pub rootfs: DiskIdentity,
    pub memory: MemoryTable,
    pub vcpus: Vec<VcpuState>,
    pub vm: KvmVmState,
    /// The virtio devices (transport + device state), in slot order.
    pub devices: Vec<VirtioDeviceState>,
    pub serial: SerialPersist,
}

impl MicrovmState {
    /// Decodes a state file's bytes (`path` names it in errors): format,
    /// version, checksum, then the state.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self, FormatError> {
        format::decode(path, bytes)
    }

    /// Reads and checks `dir/snapshot.json`; returns the state and the
    /// file's checksum.
    pub fn read(dir: &Path) -> Result<(Self, String), FormatError> {
        format::read(dir)
    }
}
