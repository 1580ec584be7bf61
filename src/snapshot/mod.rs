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
//! Diff snapshots (next) fit this format: the memory table lists layers
//! bottom first, each a memory file with the ranges it holds and its
//! parent; a diff layer will hold exactly the pages written since its
//! parent was restored (KVM dirty log with `KVM_MEM_LOG_DIRTY_PAGES` on
//! the restored slots, plus the VMM's own writes from the regions'
//! `AtomicBitmap`), and restore will map each layer's ranges over the one
//! below (`MAP_FIXED | MAP_PRIVATE`, adjacent ranges merged).

pub mod create;
pub mod dir;
pub mod disk;
pub mod format;
pub mod hash;
pub mod quiesce;
