//! Chains of diff layers on the host side, where multivm keeps them for
//! hibernated VMs: a layer's identity (its state checksum and a checksum
//! of the memory it holds), merging the top layers of a stack into one
//! so that repeated hibernation does not stack layers without bound, and
//! a layer as a byte stream (its state file, then the pages it holds), as
//! multivm moves one to another node.
//!
//! Both work on the files alone: the state stays an opaque JSON value
//! except for its memory table.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::dir::{DirError, SnapshotDir};
use super::format::{self, FormatError, MemoryLayer, MemoryTable, MEMORY_FILE, STATE_FILE};
use super::hash::Xxh64;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("{path}: {reason}")]
    Table { path: PathBuf, reason: String },
    #[error("{path} is not the layer its top's memory table names (state checksum {found}, expected {expected})")]
    Foreign {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ChainError + '_ {
    move |source| ChainError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What identifies a layer's content: its state file's checksum and an
/// XXH64 of the pages it holds (its own ranges of its memory file, read
/// in order). A layer whose files changed since has another identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIdentity {
    pub state_checksum: String,
    pub memory_hash: u64,
}

/// Reads a state file as a JSON value and its memory table.
fn read_table(dir: &Path) -> Result<(Value, MemoryTable, String), ChainError> {
    let (state, checksum): (Value, String) = format::read(dir)?;
    let table = table_of(&state, &dir.join(STATE_FILE))?;
    Ok((state, table, checksum))
}

/// The memory table of a state value, its ranges checked (`path` names
/// the state file in errors).
fn table_of(state: &Value, path: &Path) -> Result<MemoryTable, ChainError> {
    let table = state
        .get("memory")
        .cloned()
        .ok_or_else(|| "no memory table".to_string())
        .and_then(|m| serde_json::from_value::<MemoryTable>(m).map_err(|e| e.to_string()))
        .map_err(|reason| ChainError::Table {
            path: path.to_owned(),
            reason,
        })?;
    let bad = |reason: String| ChainError::Table {
        path: path.to_owned(),
        reason,
    };
    if table.layers.is_empty() {
        return Err(bad("the memory table lists no layer".into()));
    }
    // A layer written by a VM is as trusted as the VM: every range must be
    // whole pages that fit in a u64 before any arithmetic on it.
    for (o, l) in table.layers.iter().flat_map(|l| l.ranges.iter()) {
        if o % PAGE != 0 || l % PAGE != 0 || o.checked_add(*l).is_none() {
            return Err(bad(format!("range ({o:#x}, {l:#x}) is not whole pages")));
        }
    }
    Ok(table)
}

/// Chunk size of the copies and reads below.
const CHUNK: u64 = 1 << 20;

/// Page size of memory ranges.
const PAGE: u64 = 4096;

/// Calls `f(offset, bytes)` for `ranges` of `file`, in CHUNK pieces.
fn each_chunk(
    file: &File,
    path: &Path,
    ranges: &[(u64, u64)],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    let mut buf = vec![0u8; CHUNK as usize];
    for &(start, len) in ranges {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(CHUNK) as usize;
            file.read_exact_at(&mut buf[..n], off).map_err(io(path))?;
            f(off, &buf[..n])?;
            off += n as u64;
        }
    }
    Ok(())
}

/// The identity of the layer in `dir` (its state file checked).
pub fn identify(dir: &Path) -> Result<LayerIdentity, ChainError> {
    let (_, table, state_checksum) = read_table(dir)?;
    let own = &table.layers[table.layers.len() - 1];
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io(&path))?;
    let mut h = Xxh64::new();
    each_chunk(&file, &path, &own.ranges, |off, bytes| {
        h.update(&off.to_le_bytes());
        h.update(bytes);
        Ok(())
    })?;
    Ok(LayerIdentity {
        state_checksum,
        memory_hash: h.finish(),
    })
}

/// Largest state file a layer stream may carry.
const MAX_STATE: u64 = 16 << 20;

/// The bytes [`send`] writes for the layer in `dir`.
pub fn stream_len(dir: &Path) -> Result<u64, ChainError> {
    let (_, table, _) = read_table(dir)?;
    let state = dir.join(STATE_FILE);
    let state_len = std::fs::metadata(&state).map_err(io(&state))?.len();
    let own = &table.layers[table.layers.len() - 1];
    Ok(8 + state_len + own.ranges.iter().map(|r| r.1).sum::<u64>())
}

/// Writes the layer in `dir` to `out`: its state file's length (u64, little
/// endian) and bytes, then the pages of each of its own ranges, in the
/// order its memory table lists them.
pub fn send(dir: &Path, out: &mut impl Write) -> Result<(), ChainError> {
    let (_, table, _) = read_table(dir)?;
    let state_path = dir.join(STATE_FILE);
    let state = std::fs::read(&state_path).map_err(io(&state_path))?;
    let sending = |e| ChainError::Io {
        path: dir.to_owned(),
        source: e,
    };
    out.write_all(&(state.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&state))
        .map_err(sending)?;
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io(&path))?;
    let own = &table.layers[table.layers.len() - 1];
    each_chunk(&file, &path, &own.ranges, |_, bytes| {
        out.write_all(bytes).map_err(sending)
    })
}

/// Reads one layer [`send`] wrote from `input` into a new snapshot
/// directory at `target`, for a VM of `ram` bytes: the state file is
/// checked (format, version, checksum, memory table) before any page is
/// read, and its own ranges must lie inside the RAM, in ascending order,
/// without overlap. Nothing is left at `target` on failure.
pub fn receive(input: &mut impl Read, target: &Path, ram: u64) -> Result<PathBuf, ChainError> {
    let state_path = target.join(STATE_FILE);
    let reading = |e| ChainError::Io {
        path: target.to_owned(),
        source: e,
    };
    let mut len = [0u8; 8];
    input.read_exact(&mut len).map_err(reading)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_STATE {
        return Err(ChainError::Table {
            path: state_path,
            reason: format!("a state file of {len} bytes (at most {MAX_STATE})"),
        });
    }
    let mut state = vec![0u8; len as usize];
    input.read_exact(&mut state).map_err(reading)?;
    let value: Value = format::decode(&state_path, &state)?;
    let table = table_of(&value, &state_path)?;
    let own = &table.layers[table.layers.len() - 1];
    let mut end = 0;
    for &(o, l) in &own.ranges {
        if o < end || o + l > ram {
            return Err(ChainError::Table {
                path: state_path,
                reason: format!(
                    "range ({o:#x}, {l:#x}) overlaps the one before or lies outside {ram:#x} bytes of RAM"
                ),
            });
        }
        end = o + l;
    }
    let out = SnapshotDir::create(target)?;
    let mem = out.create_sparse(MEMORY_FILE, ram)?;
    let mem_path = out.path(MEMORY_FILE);
    let mut buf = vec![0u8; CHUNK as usize];
    for &(start, l) in &own.ranges {
        let mut off = start;
        while off < start + l {
            let n = (start + l - off).min(CHUNK) as usize;
            input.read_exact(&mut buf[..n]).map_err(reading)?;
            mem.write_all_at(&buf[..n], off).map_err(io(&mem_path))?;
            off += n as u64;
        }
    }
    mem.sync_all().map_err(io(&mem_path))?;
    out.write_file(STATE_FILE, &state)?;
    Ok(out.commit()?)
}

/// The state checksums the memory table of the layer in `dir` names for
/// the layers below it, bottom first (what a restore checks them against).
pub fn lower_checksums(dir: &Path) -> Result<Vec<String>, ChainError> {
    let (_, table, _) = read_table(dir)?;
    let n = table.layers.len() - 1;
    Ok(table.layers[..n]
        .iter()
        .map(|l| l.state_checksum.clone().unwrap_or_default())
        .collect())
}

/// What the layer in `dir` recorded of the host CPU it ran on: each
/// vCPU's CPUID and TSC frequency. Two layers with the same values can be
/// restored on the same hosts.
pub fn cpu_of(dir: &Path) -> Result<Value, ChainError> {
    let (state, _): (Value, String) = format::read(dir)?;
    let vcpus = state.get("vcpus").and_then(Value::as_array);
    Ok(Value::Array(
        vcpus
            .into_iter()
            .flatten()
            .map(|v| serde_json::json!([v.get("cpuid"), v.get("tsc_khz")]))
            .collect(),
    ))
}

/// Sorted, coalesced union of `ranges`.
fn union(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

/// Writes at `target` one layer equal to the stack `top` (bottom first,
/// the top-most layers of a longer stack): the top's state, and the
/// pages every one of them holds, upper layers winning. The merged layer
/// sits on the same lower layers as `top[0]` did, so a restore takes
/// those lower layers and then `target` in place of `top`. Every layer of
/// `top` below the last is checked against the last one's memory table.
pub fn merge(top: &[PathBuf], target: &Path) -> Result<PathBuf, ChainError> {
    let Some(last) = top.last() else {
        return Err(ChainError::Table {
            path: target.to_owned(),
            reason: "nothing to merge".into(),
        });
    };
    let (mut state, mut table, _) = read_table(last)?;
    let k = top.len();
    let Some(keep) = table.layers.len().checked_sub(k) else {
        return Err(ChainError::Table {
            path: last.join(STATE_FILE),
            reason: format!(
                "its memory table lists {} layers, fewer than the {k} to merge",
                table.layers.len()
            ),
        });
    };
    for (dir, entry) in top.iter().zip(&table.layers[keep..]).take(k - 1) {
        let found = format::checksum(dir)?;
        let expected = entry.state_checksum.clone().unwrap_or_default();
        if found != expected {
            return Err(ChainError::Foreign {
                path: dir.clone(),
                found,
                expected,
            });
        }
    }
    let last_mem = last.join(MEMORY_FILE);
    let size = std::fs::metadata(&last_mem).map_err(io(&last_mem))?.len();
    let out = SnapshotDir::create(target)?;
    let mem = out.create_sparse(MEMORY_FILE, size)?;
    let mem_path = out.path(MEMORY_FILE);
    for (dir, entry) in top.iter().zip(&table.layers[keep..]) {
        let path = dir.join(MEMORY_FILE);
        let file = File::open(&path).map_err(io(&path))?;
        each_chunk(&file, &path, &entry.ranges, |off, bytes| {
            mem.write_all_at(bytes, off).map_err(io(&mem_path))
        })?;
    }
    mem.sync_all().map_err(io(&mem_path))?;
    let ranges = union(
        table.layers[keep..]
            .iter()
            .flat_map(|l| l.ranges.iter().copied())
            .collect(),
    );
    table.layers.truncate(keep);
    table.layers.push(MemoryLayer {
        dir: PathBuf::from("."),
        state_checksum: None,
        ranges,
    });
    let encoded = serde_json::to_value(&table).map_err(|e| ChainError::Table {
        path: target.to_owned(),
        reason: e.to_string(),
    })?;
    if let Some(m) = state.get_mut("memory") {
        *m = encoded;
    }
    out.write_file(STATE_FILE, &format::seal_value(format::VERSION, &state)?)?;
    Ok(out.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format::RegionEntry;

    const SIZE: u64 = 64 * PAGE;

    /// Writes a layer at `dir`: pages `own` filled with `fill`, over
    /// `lower` (dir, ranges) layers named by their checksums.
    fn layer(dir: &Path, lower: &[(&Path, Vec<(u64, u64)>)], own: &[(u64, u64)], fill: u8) {
        let out = SnapshotDir::create(dir).unwrap();
        let mem = out.create_sparse(MEMORY_FILE, SIZE).unwrap();
        for &(o, l) in own {
            mem.write_all_at(&vec![fill; l as usize], o).unwrap();
        }
        let mut layers: Vec<MemoryLayer> = lower
            .iter()
            .map(|(d, r)| MemoryLayer {
                dir: d.to_path_buf(),
                state_checksum: Some(format::checksum(d).unwrap()),
                ranges: r.clone(),
            })
            .collect();
        layers.push(MemoryLayer {
            dir: ".".into(),
            state_checksum: None,
            ranges: own.to_vec(),
        });
        let table = MemoryTable {
            regions: vec![RegionEntry {
                guest_addr: 0,
                size: SIZE,
                file_offset: 0,
            }],
            layers,
        };
        let state = serde_json::json!({"memory": table, "vcpus": [fill]});
        out.write_file(
            STATE_FILE,
            &format::seal_value(format::VERSION, &state).unwrap(),
        )
        .unwrap();
        out.commit().unwrap();
    }

    fn page_fill(dir: &Path, page: u64) -> u8 {
        let f = File::open(dir.join(MEMORY_FILE)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, page * PAGE).unwrap();
        b[0]
    }

    #[test]
    fn merging_keeps_the_lower_layers_and_the_newest_pages() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let p = |n: &str| t.as_path().join(n);
        let base_r = vec![(0, 8 * PAGE)];
        layer(&p("base"), &[], &base_r, 1);
        let h1_r = vec![(2 * PAGE, 4 * PAGE), (20 * PAGE, PAGE)];
        layer(&p("h1"), &[(&p("base"), base_r.clone())], &h1_r, 2);
        let h2_r = vec![(4 * PAGE, 4 * PAGE)];
        layer(
            &p("h2"),
            &[(&p("base"), base_r.clone()), (&p("h1"), h1_r.clone())],
            &h2_r,
            3,
        );

        let merged = merge(&[p("h1"), p("h2")], &p("m")).unwrap();
        let (state, table, _) = read_table(&merged).unwrap();
        assert_eq!(state["vcpus"], serde_json::json!([3]), "the top's state");
        assert_eq!(table.layers.len(), 2);
        assert_eq!(table.layers[0].ranges, base_r);
        assert_eq!(
            table.layers[0].state_checksum,
            Some(format::checksum(&p("base")).unwrap())
        );
        assert_eq!(table.layers[1].dir, Path::new("."));
        assert_eq!(
            table.layers[1].ranges,
            vec![(2 * PAGE, 6 * PAGE), (20 * PAGE, PAGE)]
        );
        let fills: Vec<u8> = [2, 3, 4, 7, 8, 20, 21]
            .iter()
            .map(|&pg| page_fill(&merged, pg))
            .collect();
        assert_eq!(fills, vec![2, 2, 3, 3, 0, 2, 0]);
    }

    #[test]
    fn a_layer_travels_as_a_stream_and_bad_streams_leave_nothing() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let p = |n: &str| t.as_path().join(n);
        layer(&p("base"), &[], &[(0, 8 * PAGE)], 1);
        let own = vec![(2 * PAGE, 2 * PAGE), (30 * PAGE, PAGE)];
        layer(&p("h1"), &[(&p("base"), vec![(0, 8 * PAGE)])], &own, 7);
        let mut wire = Vec::new();
        send(&p("h1"), &mut wire).unwrap();
        assert_eq!(wire.len() as u64, stream_len(&p("h1")).unwrap());
        let got = receive(&mut wire.as_slice(), &p("copy"), SIZE).unwrap();
        assert_eq!(identify(&got).unwrap(), identify(&p("h1")).unwrap());
        assert_eq!(
            (page_fill(&got, 3), page_fill(&got, 30), page_fill(&got, 4)),
            (7, 7, 0)
        );

        // Cut short, a RAM too small for its ranges, a state too large: refused.
        let cut = receive(&mut &wire[..wire.len() - 1], &p("cut"), SIZE);
        assert!(matches!(cut, Err(ChainError::Io { .. })), "{cut:?}");
        let small = receive(&mut wire.as_slice(), &p("small"), 16 * PAGE);
        assert!(matches!(small, Err(ChainError::Table { .. })), "{small:?}");
        let mut huge = (MAX_STATE + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(&wire[8..]);
        assert!(receive(&mut huge.as_slice(), &p("huge"), SIZE).is_err());
        let mut flipped = wire.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            receive(&mut flipped.as_slice(), &p("flipped"), SIZE),
            Err(ChainError::Format(_))
        ));
        for n in ["cut", "small", "huge", "flipped"] {
            assert!(!p(n).exists(), "{n} left behind");
        }
    }

    #[test]
    fn a_foreign_lower_layer_or_a_changed_page_is_noticed() {
        let t = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let p = |n: &str| t.as_path().join(n);
        layer(&p("base"), &[], &[(0, PAGE)], 1);
        layer(
            &p("h1"),
            &[(&p("base"), vec![(0, PAGE)])],
            &[(PAGE, PAGE)],
            2,
        );
        layer(
            &p("other"),
            &[(&p("base"), vec![(0, PAGE)])],
            &[(PAGE, PAGE)],
            9,
        );
        layer(
            &p("h2"),
            &[
                (&p("base"), vec![(0, PAGE)]),
                (&p("h1"), vec![(PAGE, PAGE)]),
            ],
            &[(2 * PAGE, PAGE)],
            3,
        );
        let err = merge(&[p("other"), p("h2")], &p("m")).unwrap_err();
        assert!(matches!(err, ChainError::Foreign { .. }), "{err}");
        assert!(!p("m").exists(), "nothing written");
        let too_many = merge(&[p("base"), p("h1"), p("other"), p("h2")], &p("m"));
        assert!(matches!(too_many, Err(ChainError::Table { .. })));
        // A range past the end of the address space, sealed correctly.
        let state_path = p("base").join(STATE_FILE);
        let mut state = format::state_value(&std::fs::read(&state_path).unwrap()).unwrap();
        state["memory"]["layers"][0]["ranges"] = serde_json::json!([[u64::MAX - PAGE + 1, PAGE]]);
        std::fs::write(
            &state_path,
            format::seal_value(format::VERSION, &state).unwrap(),
        )
        .unwrap();
        let err = identify(&p("base")).unwrap_err();
        assert!(err.to_string().contains("not whole pages"), "{err}");

        let before = identify(&p("h1")).unwrap();
        assert_eq!(before, identify(&p("h1")).unwrap());
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p("h1").join(MEMORY_FILE))
            .unwrap();
        // Outside its ranges: not the layer's content.
        f.write_all_at(&[7], 10 * PAGE).unwrap();
        assert_eq!(before, identify(&p("h1")).unwrap());
        f.write_all_at(&[7], PAGE + 100).unwrap();
        let after = identify(&p("h1")).unwrap();
        assert_eq!(after.state_checksum, before.state_checksum);
        assert_ne!(after.memory_hash, before.memory_hash);
    }
}
