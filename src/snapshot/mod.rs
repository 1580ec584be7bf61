//! VM snapshots: the on-disk format, crash-safe snapshot directories, the
//! rootfs identity check, and taking a snapshot of a running VM.
//!
//! A snapshot directory (DESIGN.md, "Snapshot directory") holds
//! `snapshot.json` — the versioned, checksummed state ([`format`]) — and
//! `memory`, a sparse file the size of guest RAM with the guest's non-zero
//! pages at their offsets. The restore side lives in the VM builder
//! (`vmm::builder`), next to the boot path it mirrors; each saved part
//! saves and restores itself next to its own code (vCPU, VM, memory,
//! devices).
//!
//! A snapshot of a restored VM is a diff layer: its memory file holds only
//! the pages written since the restore (`create`), its memory table lists
//! the layers below it with their state checksums (`format`), and restore
//! maps each layer's ranges over the one below (`vmm::builder`,
//! `vmm::memory`).

pub mod create;
pub mod dir;
pub mod disk;
pub mod envelope;
pub mod format;
pub mod hash;
pub mod quiesce;
pub mod ws;
