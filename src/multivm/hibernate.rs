//! Hibernated VMs of `keep_state` functions: instead of killing an idle
//! VM to make room or at its idle timeout, multivm has it write a layer
//! of its state (the control channel's `snapshot`, then exit) and keeps
//! the layer here; the function's next launch restores the newest one
//! (lazily) on top of the function's own layers, so the VM goes on with
//! whatever state it had built up.
//!
//! A VM's layers form a chain: the function's own layers (or none, when
//! it boots), then one hibernated layer per hibernation since, each a
//! diff over the ones below. A chain longer than [`MAX_CHAIN`] is merged
//! into one layer on the host (snapshot::chain), so hibernate/wake cycles
//! never stack layers without bound. Layers are shared by reference
//! (the image waiting for a wake, a running VM woken from it, a later
//! image over it) and a layer's directory goes when its last holder does.
//!
//! The layers on disk are limited by `hibernate.disk`: past it, the least
//! recently hibernated images are dropped (their function starts clean,
//! from its own layers). Every layer is identified by its state checksum
//! and a checksum of its pages when it is adopted, and checked again
//! before a wake: a layer changed on disk, or not the one its top names,
//! is refused and the function starts clean. Hibernated images live only
//! as long as multivm: a restart sweeps the directory.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::snapshot::chain::{self, ChainError, LayerIdentity};
use crate::snapshot::format::{MEMORY_FILE, STATE_FILE};

use super::pool::FnId;
use super::vm::VmId;

/// Most hibernated layers a chain holds before they are merged into one.
pub const MAX_CHAIN: usize = 3;

/// The name a VM writes its hibernation layer under, in its own directory.
pub const LAYER_NAME: &str = "layer";

#[derive(Debug, thiserror::Error)]
pub enum HibernateError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a layer multivm accepts: {reason}")]
    Unexpected { path: PathBuf, reason: String },
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("layer {path} changed since it was written: {reason}")]
    Changed { path: PathBuf, reason: String },
    #[error("the layers do not belong here: {0}")]
    Foreign(String),
    #[error("a VM image of {0} layers: expected 1 to {MAX_CHAIN}")]
    ChainLength(u32),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HibernateError + '_ {
    move |source| HibernateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One hibernated layer on disk; its directory is removed when the last
/// holder drops it.
pub struct Layer {
    pub dir: PathBuf,
    bytes: u64,
    identity: LayerIdentity,
    used: Arc<AtomicU64>,
}

impl Drop for Layer {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::SeqCst);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log::warn!("cannot remove layer {}: {e}", self.dir.display());
        }
    }
}

/// A hibernated VM of a function: the layers to restore on top of the
/// function's own, bottom first.
pub struct Image {
    pub function: FnId,
    pub generation: u64,
    pub chain: Vec<Arc<Layer>>,
    at: Instant,
}

impl Image {
    /// Checks every layer against the identity it had when adopted.
    pub fn verify(&self) -> Result<(), HibernateError> {
        for l in &self.chain {
            let now = chain::identify(&l.dir).map_err(|e| HibernateError::Changed {
                path: l.dir.clone(),
                reason: e.to_string(),
            })?;
            if now != l.identity {
                return Err(HibernateError::Changed {
                    path: l.dir.clone(),
                    reason: "its checksums differ".into(),
                });
            }
        }
        Ok(())
    }
}

/// What a VM of a `keep_state` function carries: the directory it writes
/// its hibernation layer in (removed with it) and the hibernated layers
/// it was woken from, which stay on disk while it runs.
pub struct Kept {
    pub dir: PathBuf,
    pub chain: Vec<Arc<Layer>>,
}

impl Kept {
    pub fn chain_dirs(&self) -> Vec<PathBuf> {
        self.chain.iter().map(|l| l.dir.clone()).collect()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                log::warn!("cannot remove {}: {e}", self.dir.display())
            }
            _ => {}
        }
    }
}

/// The hibernation directory, its layers and the images waiting for a wake.
pub struct Store {
    dir: PathBuf,
    budget_bytes: u64,
    used: Arc<AtomicU64>,
    next: AtomicU64,
    /// Oldest first.
    images: Mutex<Vec<Image>>,
}

impl Store {
    /// Opens `dir` (created if missing, root's alone) for `disk_mib` MiB of
    /// layers, removing what an earlier multivm left there.
    pub fn open(dir: &Path, disk_mib: u64) -> Result<Self, HibernateError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("vm-") || name.starts_with("layer-") {
                log::info!("removing {} left by an earlier multivm", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            budget_bytes: disk_mib << 20,
            used: Arc::new(AtomicU64::new(0)),
            next: AtomicU64::new(1),
            images: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Image>> {
        self.images.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of layers on disk (images and running VMs' chains).
    pub fn disk_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Hibernated images waiting, per function id.
    pub fn waiting(&self, function: FnId) -> usize {
        self.lock()
            .iter()
            .filter(|i| i.function == function)
            .count()
    }

    /// A fresh, empty directory for VM `id` to write its layer in
    /// (`--snapshot_dir`).
    pub fn vm_dir(&self, id: VmId) -> Result<PathBuf, HibernateError> {
        let d = self.dir.join(format!("vm-{id}"));
        if d.symlink_metadata().is_ok() {
            std::fs::remove_dir_all(&d).map_err(io(&d))?;
        }
        std::fs::create_dir(&d).map_err(io(&d))?;
        Ok(d)
    }

    /// Takes the newest image of `function` at `generation`.
    pub fn take(&self, function: FnId, generation: u64) -> Option<Image> {
        let mut images = self.lock();
        let i = images
            .iter()
            .rposition(|i| i.function == function && i.generation == generation)?;
        Some(images.remove(i))
    }

    /// Drops the images of `function` other than those of `generation`
    /// (all of them when `None`): after an update or a removal.
    pub fn forget(&self, function: FnId, generation: Option<u64>) {
        let gone: Vec<Image> = {
            let mut images = self.lock();
            let (gone, kept) = std::mem::take(&mut *images)
                .into_iter()
                .partition(|i| i.function == function && Some(i.generation) != generation);
            *images = kept;
            gone
        };
        drop(gone);
    }

    /// Takes in the layer a VM wrote in `vm_dir` before it exited: checks
    /// it holds nothing but a layer's two regular files, makes it root's,
    /// moves it beside the others and stacks it on `below` (merging when
    /// the chain grows past [`MAX_CHAIN`]).
    pub fn adopt(
        &self,
        (function, generation): (FnId, u64),
        vm_dir: &Path,
        mut below: Vec<Arc<Layer>>,
    ) -> Result<Image, HibernateError> {
        let written = vm_dir.join(LAYER_NAME);
        let bytes = check_layer_files(&written)?;
        let dir = self.new_layer_path();
        std::fs::rename(&written, &dir).map_err(io(&dir))?;
        let _ = std::fs::remove_dir_all(vm_dir);
        let layer = self.layer(dir, bytes)?;
        below.push(Arc::new(layer));
        if below.len() > MAX_CHAIN {
            let dirs: Vec<PathBuf> = below.iter().map(|l| l.dir.clone()).collect();
            let target = self.new_layer_path();
            let t = Instant::now();
            let merged = chain::merge(&dirs, &target)?;
            let bytes = check_layer_files(&merged)?;
            log::info!(
                "merged {} hibernated layers into {} ({} KiB) in {} us",
                dirs.len(),
                merged.display(),
                bytes >> 10,
                t.elapsed().as_micros()
            );
            below = vec![Arc::new(self.layer(merged, bytes)?)];
        }
        Ok(Image {
            function,
            generation,
            chain: below,
            at: Instant::now(),
        })
    }

    /// Keeps `image` for its function's next launch; returns how many
    /// images were dropped to stay within the disk budget.
    pub fn keep(&self, image: Image) -> usize {
        self.lock().push(image);
        self.trim()
    }

    /// The bytes [`Store::send`] writes for `image`.
    pub fn stream_len(image: &Image) -> Result<u64, HibernateError> {
        let mut n = 4;
        for l in &image.chain {
            n += chain::stream_len(&l.dir)?;
        }
        Ok(n)
    }

    /// Writes `image` to `out`: its layer count (u32, little endian), then
    /// each layer bottom first (snapshot::chain::send).
    pub fn send(image: &Image, out: &mut impl Write) -> Result<(), HibernateError> {
        let n = image.chain.len() as u32;
        out.write_all(&n.to_le_bytes())
            .map_err(io(Path::new("the stream")))?;
        for l in &image.chain {
            chain::send(&l.dir, out)?;
        }
        Ok(())
    }

    /// Reads an image [`Store::send`] wrote, for a function of `ram` bytes
    /// that restores `own` (its snapshot layers, bottom first): each layer
    /// is checked as it arrives, then the top one must name exactly `own`
    /// and the layers received below it, and have been taken on a CPU
    /// like the one `own`'s top layer was (CPUID and TSC frequency).
    pub fn receive(
        &self,
        (function, generation): (FnId, u64),
        input: &mut impl Read,
        ram: u64,
        own: &[PathBuf],
    ) -> Result<Image, HibernateError> {
        let Some(own_top) = own.last() else {
            return Err(HibernateError::Foreign(
                "the function boots: there is no snapshot of this host to compare the VM's CPU with"
                    .into(),
            ));
        };
        let mut n = [0u8; 4];
        input
            .read_exact(&mut n)
            .map_err(io(Path::new("the stream")))?;
        let n = u32::from_le_bytes(n);
        if n == 0 || n as usize > MAX_CHAIN {
            return Err(HibernateError::ChainLength(n));
        }
        let mut layers: Vec<Arc<Layer>> = Vec::new();
        for _ in 0..n {
            let dir = chain::receive(input, &self.new_layer_path(), ram)?;
            let bytes = check_layer_files(&dir).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?;
            layers.push(Arc::new(self.layer(dir, bytes)?));
        }
        let mut want = Vec::new();
        for d in own {
            want.push(crate::snapshot::format::checksum(d).map_err(ChainError::from)?);
        }
        want.extend(
            layers[..layers.len() - 1]
                .iter()
                .map(|l| l.identity.state_checksum.clone()),
        );
        let top = &layers[layers.len() - 1].dir;
        if chain::lower_checksums(top)? != want {
            return Err(HibernateError::Foreign(
                "the VM's layers do not stack on this node's snapshot of the function".into(),
            ));
        }
        if chain::cpu_of(top)? != chain::cpu_of(own_top)? {
            return Err(HibernateError::Foreign(
                "the VM ran on a CPU with another CPUID or TSC frequency than this node's".into(),
            ));
        }
        Ok(Image {
            function,
            generation,
            chain: layers,
            at: Instant::now(),
        })
    }

    fn new_layer_path(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.dir.join(format!("layer-{n}"))
    }

    fn layer(&self, dir: PathBuf, bytes: u64) -> Result<Layer, HibernateError> {
        self.used.fetch_add(bytes, Ordering::SeqCst);
        // From here its drop returns the bytes and removes the directory.
        let mut layer = Layer {
            dir,
            bytes,
            identity: LayerIdentity {
                state_checksum: String::new(),
                memory_hash: 0,
            },
            used: Arc::clone(&self.used),
        };
        layer.identity = chain::identify(&layer.dir)?;
        Ok(layer)
    }

    /// Drops the oldest images while the layers on disk exceed the budget;
    /// returns how many went. (Layers a running VM or a newer image holds
    /// stay on disk until their last holder goes.)
    fn trim(&self) -> usize {
        let mut dropped = 0;
        loop {
            let oldest = {
                let mut images = self.lock();
                if self.disk_bytes() <= self.budget_bytes || images.is_empty() {
                    return dropped;
                }
                images.remove(0)
            };
            log::info!(
                "dropping a hibernated VM of function {} ({:?} old): over the hibernation disk budget",
                oldest.function,
                oldest.at.elapsed()
            );
            drop(oldest);
            dropped += 1;
        }
    }
}

/// Checks that `dir` is a directory holding exactly a state file and a
/// memory file, both regular files with one link, makes them root's and
/// readable by every VM's user (jailed wakes run as another user), and
/// returns the bytes they occupy on disk.
fn check_layer_files(dir: &Path) -> Result<u64, HibernateError> {
    let bad = |reason: String| HibernateError::Unexpected {
        path: dir.to_owned(),
        reason,
    };
    let m = dir.symlink_metadata().map_err(io(dir))?;
    if !m.file_type().is_dir() {
        return Err(bad("not a directory".into()));
    }
    let mut names = Vec::new();
    let mut bytes = 0;
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let path = e.path();
        let m = path.symlink_metadata().map_err(io(&path))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !m.file_type().is_file() || m.nlink() != 1 {
            return Err(bad(format!("{name} is not a plain file")));
        }
        names.push(name);
        bytes += m.blocks() * 512;
    }
    names.sort();
    let mut want = vec![MEMORY_FILE.to_string(), STATE_FILE.to_string()];
    want.sort();
    if names != want {
        return Err(bad(format!("it holds {names:?}, not {want:?}")));
    }
    let root = nix::unistd::geteuid().is_root();
    for (path, mode) in [
        (dir.to_owned(), 0o755),
        (dir.join(MEMORY_FILE), 0o644),
        (dir.join(STATE_FILE), 0o644),
    ] {
        if root {
            std::os::unix::fs::lchown(&path, Some(0), Some(0)).map_err(io(&path))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io(&path))?;
    }
    Ok(bytes)
}
