//! Working sets (REAP) on disk: the guest pages one request touches,
//! recorded in first-touch order by a `--dump_ws` run and loaded eagerly
//! by a `--load_ws` restore (the recording and the loading are the VMM's:
//! `vmm::memory::fault_handler`, `vmm::memory::ws_loader`).
//!
//! Files (DESIGN.md, "Snapshot directory"): `ws.json` lists the recorded
//! pages as ranges in first-touch order, each either data — its bytes are
//! the next ones in `ws` — or zero (no layer holds it, or it is all zero),
//! which takes no room in `ws`; it also names the layer stack it was
//! recorded on. `ws` holds the data ranges' bytes back to back. Both are
//! written crash-safely, `ws.json` last, by [`write()`]; [`read()`] checks
//! them.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::envelope::{self, Kind, Refusal};
use super::layers::PageSource;

/// Page granularity of working sets (the guest's pages).
pub const PAGE_SIZE: usize = 4096;

/// Name of the working-set data file in a snapshot directory.
pub const WS_FILE: &str = "ws";
/// Name of the working-set index in a snapshot directory.
pub const WS_INDEX_FILE: &str = "ws.json";
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("cannot read the guest page at RAM offset {ram_offset:#x} from the snapshot layers: {source}")]
    Source { ram_offset: u64, source: io::Error },
    #[error("{0} holds no working set (no ws.json): record one with --dump_ws")]
    Missing(PathBuf),
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is truncated or corrupt ({reason}): record the working set again with --dump_ws"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} was written by a newer snapvm (working-set format version {found}; this snapvm \
         reads version {VERSION}): upgrade snapvm or record the working set again"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error(
        "{path} belongs to another snapshot (recorded on the layer stack {found}, this restore \
         uses {expected}): record the working set again with --dump_ws"
    )]
    Stale {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} was recorded for {found} bytes of guest RAM, this VM has {expected}")]
    RamSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("cannot write a working set from this page list: {0}")]
    BadPages(String),
    #[error("cannot encode ws.json: {0}")]
    Encode(serde_json::Error),
}

/// The `format` member of `ws.json`.
const FORMAT: &str = "snapvm-ws";
/// The `ws.json` version this snapvm writes and reads.
const VERSION: u32 = 1;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> WsError + '_ {
    move |source| WsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One run of the working set: `len` bytes of guest RAM from RAM offset
/// `ram_offset`, both page aligned. A data run's bytes are the next `len`
/// bytes of `ws`; a zero run takes no room there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsRange {
    pub ram_offset: u64,
    pub len: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
}

/// The body of `ws.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    /// Names the layer stack the set was recorded on.
    identity: String,
    ram_size: u64,
    pages: u64,
    /// Size of `ws`: the data runs' total length.
    data_bytes: u64,
    /// In first-touch order, which is also `ws`'s order.
    ranges: Vec<WsRange>,
}

/// `ws.json` as an envelope.
const KIND: Kind = Kind {
    format: FORMAT,
    version: VERSION,
    member: "ws",
};

/// A checked working set, ready to load.
#[derive(Debug)]
pub struct WorkingSet {
    ranges: Vec<WsRange>,
    pages: u64,
    data_bytes: u64,
    /// `ws`, opened while the index was read, so both are of one write.
    file: File,
    path: PathBuf,
}

impl WorkingSet {
    /// The runs in first-touch order.
    pub fn ranges(&self) -> &[WsRange] {
        &self.ranges
    }

    /// Pages in the set.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of `ws` (the pages that are not zero).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// `ws`, open, and its path (for errors).
    pub fn data_file(&self) -> (&File, &Path) {
        (&self.file, &self.path)
    }
}

/// Takes `dir`'s lock (shared for readers, exclusive for the writer), so a
/// reader never pairs one writer's `ws.json` with another's `ws`.
fn lock_dir(dir: &Path, how: FlockArg) -> Result<Flock<File>, WsError> {
    let file = File::open(dir).map_err(io_at(dir))?;
    Flock::lock(file, how).map_err(|(_, e)| WsError::Io {
        path: dir.to_owned(),
        source: e.into(),
    })
}

fn fsync_dir(dir: &Path) -> Result<(), WsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Removes `dir`'s index (`ws.json`) durably, before a new set is put in
/// place: until the new one lands there is none, so a crash half way never
/// leaves an index describing the wrong `ws`. Returns the index's path.
fn remove_index(dir: &Path) -> Result<PathBuf, WsError> {
    let index_path = dir.join(WS_INDEX_FILE);
    match fs::remove_file(&index_path) {
        Ok(()) => fsync_dir(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&index_path)(e)),
    }
    Ok(index_path)
}

/// Moves the working set [`write`] wrote into `from` into the layer
/// directory `dir` on the same file system, with the same guarantees: a
/// reader of `dir` finds the complete new set, the complete old one, or
/// none. How the jailer hands over the set of a jailed VM, which may write
/// only into its staging directory.
pub fn publish(from: &Path, dir: &Path) -> Result<(), WsError> {
    let lock = lock_dir(dir, FlockArg::LockExclusive)?;
    let index_path = remove_index(dir)?;
    let ws_path = dir.join(WS_FILE);
    fs::rename(from.join(WS_FILE), &ws_path).map_err(io_at(&ws_path))?;
    fs::rename(from.join(WS_INDEX_FILE), &index_path).map_err(io_at(&index_path))?;
    fsync_dir(dir)?;
    drop(lock);
    Ok(())
}

/// Writes `ws` and `ws.json` into the snapshot layer directory `dir`: the
/// contents of `pages` (RAM offsets in first-touch order, as
/// the fault handler's `stop_recording` returns them) read from `source` — the
/// layers as they were at restore, not the memory the request has since
/// changed — recorded on the layer stack `identity` with `ram_size` bytes
/// of RAM. Crash-safe: a reader finds the complete new set, the complete
/// old one, or none. Returns the set as [`read`] sees it.
pub fn write(
    dir: &Path,
    pages: &[u64],
    source: &dyn PageSource,
    ram_size: u64,
    identity: &str,
) -> Result<WorkingSet, WsError> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    if let Some(p) = sorted
        .iter()
        .find(|&&p| p % PAGE_SIZE as u64 != 0 || p >= ram_size)
    {
        return Err(WsError::BadPages(format!(
            "{p:#x} is not a page of {ram_size:#x} bytes of RAM"
        )));
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(WsError::BadPages(format!("{:#x} is listed twice", w[0])));
    }

    let lock = lock_dir(dir, FlockArg::LockExclusive)?;
    let index_path = remove_index(dir)?;

    let ws_path = dir.join(WS_FILE);
    let ws_tmp = dir.join(format!("{WS_FILE}.tmp"));
    let file = File::create(&ws_tmp).map_err(io_at(&ws_tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut ranges: Vec<WsRange> = Vec::new();
    let mut data_bytes = 0;
    let mut page = vec![0u8; PAGE_SIZE];
    for &ram_offset in pages {
        let held = source
            .read_page(ram_offset, &mut page)
            .map_err(|source| WsError::Source { ram_offset, source })?;
        let zero = !held || page.iter().all(|&b| b == 0);
        if !zero {
            out.write_all(&page).map_err(io_at(&ws_tmp))?;
            data_bytes += PAGE_SIZE as u64;
        }
        match ranges.last_mut() {
            Some(r) if r.zero == zero && r.ram_offset + r.len == ram_offset => {
                r.len += PAGE_SIZE as u64
            }
            _ => ranges.push(WsRange {
                ram_offset,
                len: PAGE_SIZE as u64,
                zero,
            }),
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| io_at(&ws_tmp)(e.into_error()))?;
    file.sync_all().map_err(io_at(&ws_tmp))?;
    fs::rename(&ws_tmp, &ws_path).map_err(io_at(&ws_path))?;

    let index = Index {
        identity: identity.to_owned(),
        ram_size,
        pages: pages.len() as u64,
        data_bytes,
        ranges,
    };
    let body = serde_json::to_string(&index).map_err(WsError::Encode)?;
    let text = envelope::seal(&KIND, VERSION, &body);
    let index_tmp = dir.join(format!("{WS_INDEX_FILE}.tmp"));
    File::create(&index_tmp)
        .and_then(|mut f| {
            f.write_all(&text)?;
            f.sync_all()
        })
        .map_err(io_at(&index_tmp))?;
    fs::rename(&index_tmp, &index_path).map_err(io_at(&index_path))?;
    fsync_dir(dir)?;
    drop(lock);
    read(dir, ram_size, identity)
}

/// Reads and checks the working set in the snapshot layer directory `dir`
/// for a VM with `ram_size` bytes of RAM restored from the layer stack
/// `identity`: the index's format, version and checksum, that it was
/// recorded on this stack and RAM size, that its ranges are page aligned,
/// inside RAM and disjoint, and that `ws` has the size it describes.
pub fn read(dir: &Path, ram_size: u64, identity: &str) -> Result<WorkingSet, WsError> {
    let _lock = lock_dir(dir, FlockArg::LockShared)?;
    let path = dir.join(WS_INDEX_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(WsError::Missing(dir.to_owned()))
        }
        Err(e) => return Err(io_at(&path)(e)),
    };
    let corrupt = |reason: String| WsError::Corrupt {
        path: path.clone(),
        reason,
    };
    let body = match envelope::open(&KIND, &bytes) {
        Ok((_, body)) => body,
        Err(Refusal::Newer(found)) => return Err(WsError::Newer { path, found }),
        Err(Refusal::Malformed(reason)) => return Err(corrupt(reason)),
        Err(Refusal::OtherFormat(found)) => return Err(corrupt(format!("format {found:?}"))),
        Err(Refusal::Older(found)) => return Err(corrupt(format!("unknown version {found}"))),
        Err(Refusal::Checksum) => {
            return Err(corrupt("its checksum does not match its content".into()))
        }
    };
    let index: Index = serde_json::from_str(body).map_err(|e| corrupt(e.to_string()))?;
    if index.identity != identity {
        return Err(WsError::Stale {
            path,
            found: index.identity,
            expected: identity.to_owned(),
        });
    }
    if index.ram_size != ram_size {
        return Err(WsError::RamSize {
            path,
            found: index.ram_size,
            expected: ram_size,
        });
    }

    let page = PAGE_SIZE as u64;
    let (mut total, mut data) = (0u64, 0u64);
    for r in &index.ranges {
        if r.ram_offset % page != 0 || r.len % page != 0 || r.len == 0 {
            return Err(corrupt(format!(
                "range {:#x}+{:#x} is not whole pages",
                r.ram_offset, r.len
            )));
        }
        if r.ram_offset.checked_add(r.len).is_none_or(|e| e > ram_size) {
            return Err(corrupt(format!(
                "range {:#x}+{:#x} lies outside guest RAM",
                r.ram_offset, r.len
            )));
        }
        total += r.len;
        if !r.zero {
            data += r.len;
        }
    }
    let mut by_address: Vec<(u64, u64)> =
        index.ranges.iter().map(|r| (r.ram_offset, r.len)).collect();
    by_address.sort_unstable();
    if let Some(w) = by_address.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(corrupt(format!("ranges overlap at {:#x}", w[1].0)));
    }
    if total != index.pages * page || data != index.data_bytes {
        return Err(corrupt("its page counts do not add up".into()));
    }

    let ws_path = dir.join(WS_FILE);
    let file = File::open(&ws_path).map_err(io_at(&ws_path))?;
    let len = file.metadata().map_err(io_at(&ws_path))?.len();
    if len != data {
        return Err(WsError::Corrupt {
            path: ws_path,
            reason: format!("it holds {len} bytes, {WS_INDEX_FILE} describes {data}"),
        });
    }
    Ok(WorkingSet {
        ranges: index.ranges,
        pages: index.pages,
        data_bytes: data,
        file,
        path: ws_path,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::snapshot::layers::test_util::{pattern, sparse_source};
    use crate::snapshot::layers::LayerStack;

    const PAGE: u64 = PAGE_SIZE as u64;

    /// The native-endian `u64` at byte `at`.
    fn word(bytes: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_ne_bytes(w)
    }

    /// Writes the set of `touch` (RAM offsets in first-touch order, as the
    /// recorder returns them) on `mem_mib` MiB into `dir`.
    fn record_set(dir: &Path, mem_mib: u64, source: Arc<LayerStack>, touch: &[u64]) -> WorkingSet {
        write(dir, touch, source.as_ref(), mem_mib << 20, "stack-1").unwrap()
    }

    #[test]
    fn write_keeps_first_touch_order_and_read_gives_it_back() {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path();
        let source = sparse_source(d, 4, &[(0x10000, 0x8000), (0x30_0000, 0x2000)]);
        // Three pages of data, two zero pages, then data again, adjacent
        // in RAM to the first run but later in time.
        let touch = [
            0x11000, 0x12000, 0x13000, 0x1000, 0x2000, 0x30_1000, 0x14000,
        ];
        let ws = record_set(d, 4, source, &touch);
        assert_eq!(
            ws.ranges(),
            &[
                WsRange {
                    ram_offset: 0x11000,
                    len: 0x3000,
                    zero: false
                },
                WsRange {
                    ram_offset: 0x1000,
                    len: 0x2000,
                    zero: true
                },
                WsRange {
                    ram_offset: 0x30_1000,
                    len: 0x1000,
                    zero: false
                },
                WsRange {
                    ram_offset: 0x14000,
                    len: 0x1000,
                    zero: false
                },
            ]
        );
        assert_eq!((ws.pages(), ws.data_bytes()), (7, 5 * PAGE));
        let bytes = fs::read(d.join(WS_FILE)).unwrap();
        let firsts: Vec<u64> = bytes.chunks_exact(PAGE_SIZE).map(|p| word(p, 0)).collect();
        let want: Vec<u64> = [0x11000, 0x12000, 0x13000, 0x30_1000, 0x14000]
            .into_iter()
            .map(pattern)
            .collect();
        assert_eq!(firsts, want);
        let again = read(d, 4 << 20, "stack-1").unwrap();
        assert_eq!(again.ranges(), ws.ranges());
        let names: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");

        // A new recording replaces the old one.
        let source = Arc::new(LayerStack::new(vec![(
            File::open(d.join("memory")).unwrap(),
            vec![],
        )]));
        let ws = record_set(d, 4, source, &[0x5000]);
        assert_eq!(ws.data_bytes(), 0);
        assert_eq!(fs::metadata(d.join(WS_FILE)).unwrap().len(), 0);

        let none = Arc::new(LayerStack::new(vec![(
            File::open(d.join("memory")).unwrap(),
            vec![],
        )]));
        for bad in [&[0x1000, 0x1000][..], &[0x1001], &[4 << 20]] {
            let err = write(d, bad, none.as_ref(), 4 << 20, "s").unwrap_err();
            assert!(matches!(err, WsError::BadPages(_)), "{err}");
        }
    }

    /// `ws.json` text around `body`, with a correct checksum.
    fn seal(version: u32, body: &serde_json::Value) -> String {
        let text = envelope::seal(&KIND, version, &body.to_string());
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn read_refuses_missing_mismatched_and_corrupt_sets() {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path();
        let err = |r: Result<WorkingSet, WsError>| r.unwrap_err();
        assert!(matches!(err(read(d, 4 << 20, "s")), WsError::Missing(_)));

        let source = sparse_source(d, 4, &[(0, 0x10_0000)]);
        record_set(d, 4, source, &[0x1000, 0x2000, 0x8000]);
        let index = fs::read_to_string(d.join(WS_INDEX_FILE)).unwrap();
        assert!(matches!(
            err(read(d, 4 << 20, "stack-2")),
            WsError::Stale { .. }
        ));
        assert!(matches!(
            err(read(d, 8 << 20, "stack-1")),
            WsError::RamSize { .. }
        ));

        let corrupt = |text: &str| {
            fs::write(d.join(WS_INDEX_FILE), text).unwrap();
            let e = err(read(d, 4 << 20, "stack-1"));
            assert!(matches!(e, WsError::Corrupt { .. }), "{text}: {e}");
            e.to_string()
        };
        corrupt(&index[..index.len() / 2]);
        let msg = corrupt(&index.replacen("8192", "8193", 1));
        assert!(msg.contains("checksum"), "{msg}");
        let body: serde_json::Value =
            serde_json::from_str::<serde_json::Value>(&index).unwrap()["ws"].clone();
        let with_ranges = |ranges: serde_json::Value, pages: u64, data: u64| {
            let mut b = body.clone();
            b["ranges"] = ranges;
            b["pages"] = pages.into();
            b["data_bytes"] = data.into();
            seal(VERSION, &b)
        };
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x3ff000, "len": 0x2000}]),
            2,
            0x2000,
        ));
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x800, "len": 0x1000}]),
            1,
            0x1000,
        ));
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x1000, "len": 0x2000}, {"ram_offset": 0x2000, "len": 0x1000}]),
            3,
            0x3000,
        ));
        corrupt(&with_ranges(
            serde_json::json!([{"ram_offset": 0x1000, "len": 0x1000}]),
            2,
            0x1000,
        ));

        fs::write(d.join(WS_INDEX_FILE), seal(VERSION + 1, &body)).unwrap();
        assert!(matches!(
            err(read(d, 4 << 20, "stack-1")),
            WsError::Newer { .. }
        ));

        // A truncated `ws` under an intact index.
        fs::write(d.join(WS_INDEX_FILE), &index).unwrap();
        read(d, 4 << 20, "stack-1").unwrap();
        let ws = fs::OpenOptions::new()
            .write(true)
            .open(d.join(WS_FILE))
            .unwrap();
        ws.set_len(PAGE).unwrap();
        let e = err(read(d, 4 << 20, "stack-1"));
        assert!(e.to_string().contains("describes"), "{e}");
    }
}
