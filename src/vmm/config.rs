//! What a VM is built from: [`VmConfig`], which says whether the VM boots
//! a kernel or restores a snapshot, and for a restore how its memory is
//! filled. Invalid flag mixes cannot be expressed; `cli::VmArgs` is the
//! one place that turns flags into a config (and refuses the rest), for
//! firerunner, singlevm and multivm alike.

use std::path::PathBuf;

use super::devices::virtio::net::Mac;

/// Kernel command line used when the user gives none.
pub const DEFAULT_KERNEL_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Everything needed to build one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub rootfs: PathBuf,
    pub appfs: Option<PathBuf>,
    pub mem_mib: u64,
    /// 1 to `vmm::MAX_VCPUS`.
    pub vcpus: u8,
    /// The guest's vsock CID.
    pub cid: u64,
    /// Guest console destination; stdout when absent.
    pub console: Option<PathBuf>,
    /// Base path of the vsock Unix sockets (see the vsock device).
    pub vsock_uds: Option<PathBuf>,
    /// At the guest's snapshot point, write a snapshot here and exit: a
    /// full snapshot of a booted VM, a diff layer on top of a restored
    /// one.
    pub dump_dir: Option<PathBuf>,
    /// Where the controller's `snapshot` commands write (`--snapshot_dir`).
    pub snapshot_dir: Option<PathBuf>,
    /// A network card on a TAP (`--tap`/`--network`): the fourth virtio
    /// device, present only when given.
    pub net: Option<NetConfig>,
    /// Boot a kernel, or restore a snapshot.
    pub start: Start,
}

/// The VM's network card: the TAP interface it is attached to, and the
/// guest's MAC if given (else the default, or a snapshot's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: Option<Mac>,
}

/// Where the card's TAP comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// An interface of firerunner's own network namespace, opened by name.
    Name(String),
    /// An inherited descriptor of a TAP a controller opened, in a network
    /// namespace firerunner need not be in (`--tap_fd`).
    Fd(std::os::fd::RawFd),
}

/// How the VM comes to life.
#[derive(Clone, Debug)]
pub enum Start {
    Boot(BootConfig),
    Restore(RestoreConfig),
}

/// A fresh VM entering a kernel.
#[derive(Clone, Debug)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub kernel_args: String,
    /// CPU template (JSON) applied to every vCPU.
    pub cpu_template: Option<PathBuf>,
}

/// A VM rebuilt from a stack of snapshot layers.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// The layers, base first, then its diff layers; never empty.
    pub layers: Vec<PathBuf>,
    pub memory: RestoreMemory,
}

impl RestoreConfig {
    /// The top layer: the one whose state is restored.
    pub fn top(&self) -> &std::path::Path {
        self.layers.last().map_or(std::path::Path::new("."), |p| p)
    }
}

/// Which layers are copied into the VM's memory up front instead of
/// being served page by page on first touch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copies {
    pub base: bool,
    pub diffs: bool,
}

/// How a restored VM's memory is filled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreMemory {
    /// The layers' memory files mapped `MAP_PRIVATE` over each other
    /// (lazy: each page is read on first touch), or copied.
    Layers(Copies),
    /// `--dump_ws`: anonymous memory served on first touch by the fault
    /// handler, which records the pages the first request touches; the
    /// working set is written into this directory.
    RecordWorkingSet { into: PathBuf },
    /// `--load_ws`: anonymous memory; the copied layers go in first, then
    /// the top layer's working set, and the fault handler serves the
    /// rest.
    LoadWorkingSet(Copies),
}

impl RestoreMemory {
    /// Whether the memory is anonymous and served by the fault handler.
    pub fn uses_fault_handler(&self) -> bool {
        !matches!(self, RestoreMemory::Layers(_))
    }

    /// The layers copied up front.
    pub fn copies(&self) -> Copies {
        match self {
            RestoreMemory::Layers(c) | RestoreMemory::LoadWorkingSet(c) => *c,
            RestoreMemory::RecordWorkingSet { .. } => Copies::default(),
        }
    }
}

impl VmConfig {
    /// The restore half of the config, if the VM restores.
    pub fn restore(&self) -> Option<&RestoreConfig> {
        match &self.start {
            Start::Restore(r) => Some(r),
            Start::Boot(_) => None,
        }
    }

    /// Whether the VM writes files while it runs: a snapshot (`--dump_dir`,
    /// `--snapshot_dir`) or a working set (`--dump_ws`).
    pub fn writes_files(&self) -> bool {
        self.snapshots() || self.records_working_set()
    }

    /// Whether the VM may write a snapshot (`--dump_dir`, `--snapshot_dir`):
    /// a restored one then keeps a dirty log for its diff layer.
    pub fn snapshots(&self) -> bool {
        self.dump_dir.is_some() || self.snapshot_dir.is_some()
    }

    /// Whether the VM records its working set (`--dump_ws`).
    pub fn records_working_set(&self) -> bool {
        self.restore()
            .is_some_and(|r| matches!(r.memory, RestoreMemory::RecordWorkingSet { .. }))
    }

    /// Where the vsock device listens (`--vsock_uds`, else a per-process
    /// path).
    pub fn vsock_path(&self) -> PathBuf {
        self.vsock_uds.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("snapvm-{}.vsock", std::process::id()))
        })
    }
}
