//! `snapshot.json`: the versioned, checksummed state file of a snapshot
//! layer, in the envelope of [`super::envelope`]:
//!
//! ```text
//! {"format":"snapvm-snapshot","version":2,"checksum":"<16 hex>","state":{...}}
//! ```
//!
//! The state itself is the VMM's (`vmm::persist::MicrovmState`): this
//! module seals and opens the envelope around any serializable state and
//! holds the parts of it that describe the snapshot rather than the VM —
//! its shape, the rootfs identity and the memory table of layers.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::envelope::{self, Kind, Refusal};

/// The `format` member of every snapvm state file.
pub const FORMAT: &str = "snapvm-snapshot";
/// The state file version this snapvm writes and reads (2: layered memory
/// tables for diff snapshots).
pub const VERSION: u32 = 2;
/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "snapshot.json";
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is truncated or corrupt (not a complete snapvm state file: {reason})")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} is not a snapvm snapshot (format {found:?})")]
    NotSnapshot { path: PathBuf, found: String },
    #[error(
        "{path} was written by a newer snapvm (state format version {found}; this snapvm reads \
         version {VERSION}): upgrade snapvm or re-create the snapshot"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error(
        "{path} has state format version {found}, which this snapvm no longer reads \
         (it reads version {VERSION}): re-create the snapshot"
    )]
    Older { path: PathBuf, found: u32 },
    #[error("{path} is corrupt: its checksum does not match its content")]
    Checksum { path: PathBuf },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(serde_json::Error),
}

/// The VM shape a snapshot can only be restored into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    pub mem_mib: u64,
    pub vcpus: u8,
    /// The virtio devices, in slot order.
    pub devices: Vec<DeviceEntry>,
}

/// One virtio device of the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// `block` or `vsock`.
    pub kind: String,
    /// What it serves: `rootfs`, `appfs`, `vsock`.
    pub role: String,
}

/// How a restore recognises the rootfs a snapshot was taken with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The path at snapshot time (informational).
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// (device, inode) of the file.
    pub file_id: (u64, u64),
    /// XXH64 of sampled blocks (see `disk.rs`), 16 hex digits.
    pub sample_hash: String,
    /// XXH64 of the whole content, 16 hex digits.
    pub content_hash: String,
}

/// One RAM region and where it sits in a memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionEntry {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// One memory layer: a snapshot directory's `memory` file and the byte
/// ranges it holds (`(RAM offset, length)`, page aligned, ascending). In
/// a layer's memory file each page sits at its RAM offset; a page inside
/// a range may still be a hole in the file (a page that was zeroed), so
/// the ranges, not the file's holes, say which pages the layer holds.
///
/// A full snapshot has one layer, its own. A diff snapshot lists every
/// layer of the stack it was taken on, bottom first, then its own: each
/// layer's parent is the one before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayer {
    /// The layer's directory when this state file was written (`.` is
    /// this one). Informational: a restore takes the directories from
    /// its command line and checks them against `state_checksum`.
    pub dir: PathBuf,
    /// The checksum of that layer's state file; `None` for this
    /// directory's own layer.
    pub state_checksum: Option<String>,
    pub ranges: Vec<(u64, u64)>,
}

/// The memory table: RAM regions and layers, bottom layer first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryTable {
    pub regions: Vec<RegionEntry>,
    pub layers: Vec<MemoryLayer>,
}

/// `snapshot.json` as an envelope.
const KIND: Kind = Kind {
    format: FORMAT,
    version: VERSION,
    member: "state",
};

/// Encodes a state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let body = serde_json::to_string(state).map_err(FormatError::Encode)?;
    Ok(envelope::seal(&KIND, VERSION, &body))
}

/// Checks a state file's format, version and checksum; returns the
/// checksum and the state's JSON text.
fn open_envelope<'a>(path: &Path, bytes: &'a [u8]) -> Result<(String, &'a str), FormatError> {
    let path = path.to_owned();
    envelope::open(&KIND, bytes).map_err(|r| match r {
        Refusal::Malformed(reason) => FormatError::Malformed { path, reason },
        Refusal::OtherFormat(found) => FormatError::NotSnapshot { path, found },
        Refusal::Newer(found) => FormatError::Newer { path, found },
        Refusal::Older(found) => FormatError::Older { path, found },
        Refusal::Checksum => FormatError::Checksum { path },
    })
}

/// Decodes a state file's bytes (`path` names it in errors): format,
/// version, checksum, then the state.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, FormatError> {
    let (_, body) = open_envelope(path, bytes)?;
    serde_json::from_str(body).map_err(|e| FormatError::Malformed {
        path: path.to_owned(),
        reason: format!("state: {e}"),
    })
}

/// Fails like [`read`] when `dir` holds no state file, without reading it.
pub fn check_present(dir: &Path) -> Result<(), FormatError> {
    let path = dir.join(STATE_FILE);
    std::fs::metadata(&path)
        .map(drop)
        .map_err(|source| FormatError::Read { path, source })
}

fn read_bytes(dir: &Path) -> Result<(PathBuf, Vec<u8>), FormatError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|source| FormatError::Read {
        path: path.clone(),
        source,
    })?;
    Ok((path, bytes))
}

/// Reads and decodes `dir/snapshot.json`; returns the state and the
/// file's checksum (how a diff layer names this one as its parent).
pub fn read<T: DeserializeOwned>(dir: &Path) -> Result<(T, String), FormatError> {
    let (path, bytes) = read_bytes(dir)?;
    let (checksum, body) = open_envelope(&path, &bytes)?;
    let state = serde_json::from_str(body).map_err(|e| FormatError::Malformed {
        path: path.clone(),
        reason: format!("state: {e}"),
    })?;
    Ok((state, checksum))
}

/// Checks `dir/snapshot.json` (format, version, checksum) without parsing
/// its state, and returns its checksum: enough for a lower layer of a
/// stack, whose state the restore does not use.
pub fn checksum(dir: &Path) -> Result<String, FormatError> {
    let (path, bytes) = read_bytes(dir)?;
    open_envelope(&path, &bytes).map(|(c, _)| c)
}

/// The bytes of a state file holding `state` (any JSON value) with a
/// correct checksum. For tests and tools that edit a state file.
pub fn seal_value(version: u32, state: &serde_json::Value) -> Result<Vec<u8>, FormatError> {
    let body = serde_json::to_string(state).map_err(FormatError::Encode)?;
    Ok(envelope::seal(&KIND, version, &body))
}

/// The `state` value of a state file, unchecked (for tests and tools).
pub fn state_value(bytes: &[u8]) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get_mut("state").map(serde_json::Value::take)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands for a whole state: a struct the samples are not.
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Full {
        shape: VmShape,
    }

    fn sample() -> Vec<u8> {
        seal_value(VERSION, &serde_json::json!({"a": [1, 2, 3]})).unwrap()
    }

    #[test]
    fn checksum_covers_the_state_bytes() {
        let p = Path::new("x/snapshot.json");
        let good = sample();
        // The sample is not a full state: the checksum passes, the parse fails.
        let e = decode::<Full>(p, &good).unwrap_err();
        assert!(matches!(e, FormatError::Malformed { .. }), "{e}");
        let mut bad = good.clone();
        let at = bad.windows(7).position(|w| w == b"[1,2,3]").unwrap() + 3;
        bad[at] = b'7';
        assert!(matches!(
            decode::<Full>(p, &bad).unwrap_err(),
            FormatError::Checksum { .. }
        ));
        let cut = &good[..good.len() - 10];
        let e = decode::<Full>(p, cut).unwrap_err();
        assert!(matches!(e, FormatError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("truncated or corrupt"));
    }

    #[test]
    fn version_is_checked_before_the_checksum() {
        let p = Path::new("s/snapshot.json");
        let newer = seal_value(VERSION + 1, &serde_json::json!({"whatever": 1})).unwrap();
        let e = decode::<Full>(p, &newer).unwrap_err();
        assert!(matches!(e, FormatError::Newer { found, .. } if found == VERSION + 1));
        assert!(e.to_string().contains("newer snapvm"));
        let other = br#"{"format":"other","version":1}"#;
        assert!(matches!(
            decode::<Full>(p, other).unwrap_err(),
            FormatError::NotSnapshot { .. }
        ));
    }
}
