//! Deployed functions on disk, so they survive a restart of multivm:
//! `STATE/functions/<name>.json` holds what was deployed (the
//! FunctionDeployment as received, and a `min_idle` set by scaling);
//! `STATE/build/` holds what preparation makes from it (appfs images,
//! diff snapshots), one fresh directory per preparation, and is rebuilt
//! from the records at every start.
//!
//! Every record is written crash-safely: a temporary file in the same
//! directory, fsynced, renamed over the record, then the directory
//! fsynced; a removal is an unlink followed by a directory fsync. A
//! reader finds either the old record or the new one, never half of one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::types::FunctionDeployment;

const RECORD_EXT: &str = "json";
const TMP_EXT: &str = "tmp";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a deployment record: {reason}; move it away or fix it")]
    Corrupt { path: String, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One deployed function as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub deployment: FunctionDeployment,
    /// Set by POST /system/scale-function; overrides the deployment's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_idle: Option<usize>,
}

pub struct Store {
    records: PathBuf,
    build: PathBuf,
    next_build: AtomicU64,
}

impl Store {
    /// Opens (creating) `state_dir`; empties its build directory, whose
    /// contents the records make again.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let records = state_dir.join("functions");
        let build = state_dir.join("build");
        std::fs::create_dir_all(&records).map_err(io(&records))?;
        if build.exists() {
            std::fs::remove_dir_all(&build).map_err(io(&build))?;
        }
        std::fs::create_dir_all(&build).map_err(io(&build))?;
        Ok(Self {
            records,
            build,
            next_build: AtomicU64::new(1),
        })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.records.join(format!("{name}.{RECORD_EXT}"))
    }

    /// Every stored record, by function name; removes temporary files a
    /// crash left behind.
    pub fn load_all(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.records).map_err(io(&self.records))? {
            let path = e.map_err(io(&self.records))?.path();
            match path.extension().and_then(|x| x.to_str()) {
                Some(TMP_EXT) => {
                    log::info!("removing {} left by an interrupted write", path.display());
                    let _ = std::fs::remove_file(&path);
                }
                Some(RECORD_EXT) => {
                    let bytes = std::fs::read(&path).map_err(io(&path))?;
                    let record: Record =
                        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        })?;
                    let name = record.deployment.service.clone();
                    if path != self.record_path(&name) {
                        return Err(StoreError::Corrupt {
                            path: path.display().to_string(),
                            reason: format!("it holds function {name:?}"),
                        });
                    }
                    out.push((name, record));
                }
                _ => {}
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Writes `record` for function `name`, durably.
    pub fn save(&self, name: &str, record: &Record) -> Result<(), StoreError> {
        let target = self.record_path(name);
        let tmp = self.records.join(format!("{name}.{TMP_EXT}"));
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Corrupt {
            path: target.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        self.sync_dir()
    }

    /// Removes the record of function `name`, durably.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let target = self.record_path(name);
        match std::fs::remove_file(&target) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&target)(e)),
        }
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.records)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.records))
    }

    /// A new, empty directory for one preparation of function `name`.
    pub fn new_build_dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        let n = self.next_build.fetch_add(1, Ordering::Relaxed);
        let dir = self.build.join(format!("{name}.{n}"));
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_removal_is_durable() {
        let dir = std::env::temp_dir().join(format!("snapvm-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let record = |name: &str| Record {
            deployment: FunctionDeployment {
                service: name.into(),
                image: "x.img".into(),
                ..Default::default()
            },
            min_idle: Some(2),
        };
        store.save("a", &record("a")).unwrap();
        store.save("b", &record("b")).unwrap();
        store.save("b", &record("b")).unwrap();
        let build = store.new_build_dir("a").unwrap();
        std::fs::write(build.join("appfs.img"), b"x").unwrap();
        // A crash between write and rename leaves a temporary file only.
        std::fs::write(dir.join("functions/c.tmp"), b"{").unwrap();
        let store = Store::open(&dir).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(
            all,
            vec![("a".into(), record("a")), ("b".into(), record("b"))]
        );
        assert!(!dir.join("functions/c.tmp").exists());
        assert!(!build.exists(), "builds are made again after a restart");
        store.remove("a").unwrap();
        store.remove("a").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
        // A record under another function's name is refused.
        std::fs::copy(dir.join("functions/b.json"), dir.join("functions/d.json")).unwrap();
        assert!(matches!(store.load_all(), Err(StoreError::Corrupt { .. })));
        std::fs::write(dir.join("functions/d.json"), b"{\"deployment\": 1}").unwrap();
        let e = store.load_all().unwrap_err().to_string();
        assert!(e.contains("d.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
