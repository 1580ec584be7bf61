//! Emulated devices: legacy PC devices on the port-I/O bus and virtio-mmio
//! devices on the MMIO bus, and the VM's one list of virtio devices.
//!
//! [`VirtioDevices`] is that list, in slot order (DESIGN.md, "Guest
//! protocol": vda = rootfs, vdb = appfs, vsock, then virtio-net only for a
//! VM given a TAP). Everything that walks the
//! devices walks it: placing them on the bus, announcing them on the
//! kernel command line, the snapshot's device list, saving and restoring
//! their state. A new device is one more [`VirtioSlot`] variant.

use std::fs::File;
use std::io::LineWriter;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::serial::{ConsoleSink, SerialDevice};
use self::virtio::block::{Block, BlockError};
use self::virtio::mmio::{self, MmioDeviceHandle, MmioError, TransportState};
use self::virtio::net::{Net, NetError};
use self::virtio::vsock::{Vsock, VsockError};
use self::virtio::DeviceState;
use super::bus::{lock, Bus};
use super::config::NetConfig;
use super::event_loop::EventManager;
use super::layout;
use super::memory::GuestMemoryMmap;
use super::persist::Persist;
use super::vm::KvmVm;
use crate::snapshot::format::DeviceEntry;

pub(crate) mod control;
pub(crate) mod i8042;
pub(crate) mod serial;
pub mod virtio;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{what}: {source}")]
    Disk {
        what: &'static str,
        source: BlockError,
    },
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("--tap: {0}")]
    Net(#[from] NetError),
    #[error("cannot attach a virtio device: {0}")]
    Attach(#[from] MmioError),
    #[error("cannot save a {kind} device: {source}")]
    Save {
        kind: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot restore a {kind} device: {source}")]
    Restore {
        kind: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the snapshot holds {saved} devices, this VM has {ours}")]
    Count { saved: usize, ours: usize },
    #[error("the snapshot holds a {saved} device where this VM has a {kind} device")]
    Kind {
        saved: &'static str,
        kind: &'static str,
    },
    #[error("cannot open the console file {path}: {source}")]
    Console {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot wire interrupt line {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
}

/// What each virtio slot serves, in slot order: the one list of the
/// VM's devices (DESIGN.md, "Guest protocol"); a VM given a network has
/// [`Role::Net`] after them.
const SLOTS: [Role; 3] = [Role::Rootfs, Role::Appfs, Role::Vsock];

/// The roles of a VM's slots: [`SLOTS`], then the network card if any.
fn roles(net: bool) -> impl Iterator<Item = Role> {
    SLOTS.into_iter().chain(net.then_some(Role::Net))
}

/// What a virtio device serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Rootfs,
    Appfs,
    Vsock,
    Net,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Rootfs => "rootfs",
            Role::Appfs => "appfs",
            Role::Vsock => "vsock",
            Role::Net => "net",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Role::Rootfs | Role::Appfs => "block",
            Role::Vsock => "vsock",
            Role::Net => "net",
        }
    }
}

/// The device list a snapshot of a VM records, and a restore requires:
/// the three of every VM, and the network card when it has one.
pub fn device_list(net: bool) -> Vec<DeviceEntry> {
    roles(net)
        .map(|r| DeviceEntry {
            kind: r.kind().into(),
            role: r.name().into(),
        })
        .collect()
}

/// One virtio device of the VM, typed.
pub enum VirtioSlot {
    Block(Arc<Mutex<Block>>),
    Vsock(Arc<Mutex<Vsock>>),
    Net(Arc<Mutex<Net>>),
}

impl VirtioSlot {
    fn kind(&self) -> &'static str {
        match self {
            VirtioSlot::Block(_) => "block",
            VirtioSlot::Vsock(_) => "vsock",
            VirtioSlot::Net(_) => "net",
        }
    }

    fn shared(&self) -> mmio::SharedDevice {
        match self {
            VirtioSlot::Block(device) => device.clone(),
            VirtioSlot::Vsock(device) => device.clone(),
            VirtioSlot::Net(device) => device.clone(),
        }
    }

    fn save(&self) -> Result<DeviceState, DeviceError> {
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::Save {
            kind: self.kind(),
            source,
        };
        Ok(match self {
            VirtioSlot::Block(device) => {
                DeviceState::Block(lock(device).save().map_err(|e| fail(e.into()))?)
            }
            VirtioSlot::Vsock(device) => {
                DeviceState::Vsock(lock(device).save().map_err(|e| fail(e.into()))?)
            }
            VirtioSlot::Net(device) => {
                DeviceState::Net(lock(device).save().map_err(|e| fail(e.into()))?)
            }
        })
    }

    /// Applies a saved device state of the same kind (checked at load by
    /// [`VirtioDevices::check_kinds`]).
    fn restore(&self, state: &DeviceState) -> Result<(), DeviceError> {
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::Restore {
            kind: self.kind(),
            source,
        };
        match (self, state) {
            (VirtioSlot::Block(device), DeviceState::Block(s)) => {
                lock(device).restore(s).map_err(|e| fail(e.into()))
            }
            (VirtioSlot::Vsock(device), DeviceState::Vsock(s)) => {
                lock(device).restore(s).map_err(|e| fail(e.into()))
            }
            (VirtioSlot::Net(device), DeviceState::Net(s)) => {
                lock(device).restore(s).map_err(|e| fail(e.into()))
            }
            (ours, saved) => Err(DeviceError::Kind {
                saved: state_kind(saved),
                kind: ours.kind(),
            }),
        }
    }
}

fn state_kind(s: &DeviceState) -> &'static str {
    match s {
        DeviceState::Block(_) => "block",
        DeviceState::Vsock(_) => "vsock",
        DeviceState::Net(_) => "net",
    }
}

/// One virtio device's entry in `snapshot.json`: its transport's registers
/// and queues, and the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    #[serde(flatten)]
    pub transport: TransportState,
    pub device: DeviceState,
}

/// What the virtio devices are built from (the command line).
pub struct DeviceConfig<'a> {
    pub rootfs: &'a std::path::Path,
    pub appfs: Option<&'a std::path::Path>,
    pub cid: u64,
    pub vsock_uds: &'a std::path::Path,
    pub net: Option<&'a NetConfig>,
}

/// The VM's virtio devices in slot order, before and after they are
/// placed on the bus.
pub struct VirtioDevices {
    devices: Vec<VirtioSlot>,
    /// Whether the last slot is a network card.
    net: bool,
    handles: Vec<MmioDeviceHandle>,
}

impl VirtioDevices {
    /// Opens the devices of [`device_list`], in slot order: the rootfs,
    /// the appfs (an empty disk without one), vsock, and the network card
    /// when one is configured.
    pub fn open(c: &DeviceConfig<'_>) -> Result<Self, DeviceError> {
        let disk = |what, path: &std::path::Path| {
            Block::new(path).map_err(|source| DeviceError::Disk { what, source })
        };
        let block = |b| VirtioSlot::Block(Arc::new(Mutex::new(b)));
        let mut devices = Vec::new();
        for role in roles(c.net.is_some()) {
            devices.push(match role {
                Role::Rootfs => block(disk("--rootfs", c.rootfs)?),
                Role::Appfs => block(match c.appfs {
                    Some(path) => disk("--appfs", path)?,
                    None => Block::empty(),
                }),
                Role::Vsock => {
                    VirtioSlot::Vsock(Arc::new(Mutex::new(Vsock::new(c.cid, c.vsock_uds)?)))
                }
                Role::Net => match c.net {
                    Some(n) => VirtioSlot::Net(Arc::new(Mutex::new(Net::new(&n.tap, n.mac)?))),
                    None => continue,
                },
            });
        }
        Ok(Self {
            devices,
            net: c.net.is_some(),
            handles: Vec::new(),
        })
    }

    /// This VM's device list, as its snapshots record it.
    pub fn device_list(&self) -> Vec<DeviceEntry> {
        device_list(self.net)
    }

    /// Places every device in its slot: MMIO window, interrupt line, queue
    /// notifications, event-loop subscriber.
    pub fn attach(
        &mut self,
        vm: &KvmVm,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        event_manager: &mut EventManager,
    ) -> Result<(), DeviceError> {
        for (slot, device) in self.devices.iter().enumerate() {
            self.handles.push(mmio::register(
                vm.fd(),
                mmio,
                event_manager,
                mem,
                device.shared(),
                slot as u32,
            )?);
        }
        Ok(())
    }

    /// The kernel command-line announcements of the attached devices.
    pub fn cmdline_fragments(&self) -> Vec<String> {
        self.handles
            .iter()
            .map(MmioDeviceHandle::cmdline_fragment)
            .collect()
    }

    /// Saves every attached device (transport, then device), in slot order.
    /// The VM must be paused.
    pub fn save(&self) -> Result<Vec<VirtioDeviceState>, DeviceError> {
        self.devices
            .iter()
            .zip(&self.handles)
            .map(|(device, handle)| {
                Ok(VirtioDeviceState {
                    transport: lock(handle.transport()).save_state(),
                    device: device.save()?,
                })
            })
            .collect()
    }

    /// Refuses saved states that do not pair one to one, kind for kind,
    /// with this VM's devices.
    pub fn check_kinds(&self, saved: &[VirtioDeviceState]) -> Result<(), DeviceError> {
        if saved.len() != self.devices.len() {
            return Err(DeviceError::Count {
                saved: saved.len(),
                ours: self.devices.len(),
            });
        }
        for (ours, s) in self.devices.iter().zip(saved) {
            if ours.kind() != state_kind(&s.device) {
                return Err(DeviceError::Kind {
                    saved: state_kind(&s.device),
                    kind: ours.kind(),
                });
            }
        }
        Ok(())
    }

    /// Restores every attached device from `saved` (its transport, which
    /// reactivates a running device with its queues, then the device's
    /// own state and side effects).
    pub fn restore(&self, saved: &[VirtioDeviceState]) -> Result<(), DeviceError> {
        self.check_kinds(saved)?;
        for ((device, handle), s) in self.devices.iter().zip(&self.handles).zip(saved) {
            lock(handle.transport()).restore_state(&s.transport)?;
            device.restore(&s.device)?;
        }
        Ok(())
    }
}

/// Where the guest console goes: the file `path`, or stdout.
pub fn console_sink(path: Option<&PathBuf>) -> Result<ConsoleSink, DeviceError> {
    match path {
        None => Ok(Box::new(std::io::stdout())),
        Some(p) => {
            let f = File::create(p).map_err(|source| DeviceError::Console {
                path: p.display().to_string(),
                source,
            })?;
            Ok(Box::new(LineWriter::new(f)))
        }
    }
}

/// The serial port on COM1, its interrupt an irqfd on IRQ 4.
pub fn serial(vm: &KvmVm, out: ConsoleSink) -> Result<SerialDevice, DeviceError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.fd()
        .register_irqfd(&irq, layout::SERIAL_IRQ)
        .map_err(|source| DeviceError::Irqfd {
            gsi: layout::SERIAL_IRQ,
            source,
        })?;
    Ok(SerialDevice::new(irq, out))
}
