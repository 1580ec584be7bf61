//! VM snapshots on disk: the state file envelope and the snapshot's
//! description ([`format`]), crash-safe snapshot directories ([`dir`]),
//! checksums ([`hash`], [`envelope`]), the rootfs identity ([`disk`]),
//! working sets ([`ws`]) and host-side chains of layers ([`chain`]). Nothing here knows a VMM type: capturing and
//! restoring a VM live with the VM (`vmm::capture`, `vmm::restore`).
//!
//! A snapshot directory (DESIGN.md, "Snapshot directory") holds
//! `snapshot.json` — the versioned, checksummed state — and `memory`, a
//! sparse file the size of guest RAM with the guest's non-zero pages at
//! their offsets. A snapshot of a restored VM is a diff layer: its memory
//! file holds only the pages written since the restore, and its memory
//! table lists the layers below it with their state checksums.

pub mod chain;
pub(crate) mod dir;
pub(crate) mod disk;
pub(crate) mod envelope;
pub mod format;
pub mod hash;
pub mod layers;
pub mod ws;
