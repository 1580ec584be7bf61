//! Read-only virtio-blk device (virtio 1.x, 5.2) backed by a host file.
//!
//! The backing file is opened read-only and never written. Requests run on
//! the event-loop thread with positioned reads (`pread`) into a bounce
//! buffer that is then copied into guest memory through vm-memory's checked
//! accessors, so a descriptor can never make the VMM touch memory outside
//! the guest, and the device dirty bitmap sees every byte it writes.
//!
//! Disk size: the capacity is the file size in 512-byte sectors, rounded
//! **up**; a file whose size is not a multiple of 512 is served with the
//! tail of its last sector reading as zeros.
//!
//! Request handling (the descriptor chain is untrusted guest input):
//! - layout: a device-readable header of at least 16 bytes (`type`,
//!   `ioprio`, `sector`) first, a device-writable status descriptor last
//!   (its first byte receives the status), data descriptors in between, all
//!   device-writable for IN/GET_ID, non-empty, inside guest memory;
//! - IN: data length a multiple of 512 and within the capacity, else IOERR;
//!   OUT: IOERR (read-only disk); FLUSH: OK; GET_ID: 20-byte serial (hex of
//!   a stable hash of the file's name); anything else: UNSUPP;
//! - a malformed chain gets IOERR in its status byte when the last
//!   descriptor can hold one, and is otherwise returned used with length 0;
//! - the used length counts every byte written into the chain, status
//!   included.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateContext, ActivateError, Interrupt, VirtioDevice, BACKEND_EVENT_BASE, INT_CONFIG_CHANGE,
    INT_USED_RING, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::vmm::memory::GuestMemoryMmap;
use crate::vmm::persist::Persist;

/// Size of the device's single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector (the unit of `sector` and of the capacity).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Data segments per request: the queue minus header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest chain we look at; anything longer (possible only through
/// indirect tables) is malformed.
const MAX_DESCRIPTORS: usize = 1024;
/// Chains served per run before the device yields the event loop and
/// resumes through its own eventfd: a driver that keeps refilling the ring
/// — or whose reads land on its own available ring and re-publish the
/// request, with no guest CPU at all — cannot hold the event-loop thread.
const MAX_CHAINS_PER_RUN: usize = 4 * QUEUE_SIZE as usize;
/// Event data of the resume eventfd (the device's only backend fd).
const RESUME_EVENT: u32 = BACKEND_EVENT_BASE as u32;
/// Largest data length of one request: its used length (data + status)
/// must fit the used ring's 32-bit length field.
const MAX_DATA_LEN: u64 = u32::MAX as u64 - 1;
/// Bytes read from the file per `pread`.
const BOUNCE_SIZE: usize = 128 << 10;
/// Request header: `le32 type, le32 reserved/ioprio, le64 sector`.
const HEADER_LEN: u32 = 16;
/// Config space we expose: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path} for reading: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {0} is a directory; give a raw image file or a block device")]
    NotADisk(PathBuf),
}

/// The open backing file.
struct Backing {
    file: File,
    path: PathBuf,
    size: u64,
}

impl Backing {
    fn open(path: &Path) -> Result<Self, BlockError> {
        let file = File::open(path).map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| BlockError::Size {
            path: path.to_owned(),
            source,
        })?;
        if meta.is_dir() {
            return Err(BlockError::NotADisk(path.to_owned()));
        }
        // Seeking to the end also sizes block devices (their metadata says 0).
        // Reads are positioned, so the file offset is never used after this.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// Fills `buf` from byte `pos` of the file; bytes past the end of the
    /// file read as zeros. Returns `Err` only for an I/O error.
    fn read_at(&self, mut pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    pos += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }
}

/// The GET_ID serial: 20 hex digits of the FNV-1a/128 hash of the file's
/// name (its last path component), so it stays the same when the image
/// moves to another directory (e.g. a copied snapshot).
fn serial_for(path: Option<&Path>) -> [u8; SERIAL_LEN] {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let name = path.map_or(&[][..], |p| {
        p.file_name().unwrap_or(p.as_os_str()).as_bytes()
    });
    let hash = name
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME));
    let hex = format!("{:020x}", hash >> 48);
    let mut serial = [0u8; SERIAL_LEN];
    serial.copy_from_slice(&hex.as_bytes()[..SERIAL_LEN]);
    serial
}

/// The saved state of a block device. The image itself is not saved:
/// restore serves the file the command line names, and when its capacity
/// differs from `capacity` the driver is told (config change).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Capacity in sectors the driver last saw.
    pub capacity: u64,
    pub config_generation: u32,
    /// The driver corrupted the queue before the snapshot.
    pub broken: bool,
    /// The image served at snapshot time (informational).
    pub path: Option<PathBuf>,
}

/// State that exists between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    /// The driver corrupted the queue; nothing is processed until reset.
    broken: bool,
}

/// A read-only virtio-blk device.
pub struct Block {
    backing: Option<Backing>,
    /// In 512-byte sectors.
    capacity: u64,
    serial: [u8; SERIAL_LEN],
    config_generation: u32,
    queue_max_sizes: [u16; 1],
    active: Option<Active>,
    bounce: Vec<u8>,
    /// Written when a run stopped at [`MAX_CHAINS_PER_RUN`]; the event loop
    /// then runs the queue again. `None` until the event loop registered it
    /// (runs are unbounded then).
    resume: Option<EventFd>,
}

/// Outcome of one request: status byte and data bytes written into the
/// chain (the status byte not included).
struct Completion {
    status: u8,
    written: u32,
}

impl Completion {
    fn ok(written: u32) -> Self {
        Self {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        }
    }

    fn ioerr(written: u32) -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR as u8,
            written,
        }
    }

    fn malformed(why: &str) -> Self {
        warn!("virtio-blk: malformed request ({why}); answered with IOERR");
        Self::ioerr(0)
    }
}

impl Block {
    /// A disk serving the file at `path`, opened read-only.
    pub fn new(path: &Path) -> Result<Self, BlockError> {
        let backing = Backing::open(path)?;
        Ok(Self::with_backing(Some(backing)))
    }

    /// A zero-length disk (no `--appfs`): every read fails with IOERR.
    pub fn empty() -> Self {
        Self::with_backing(None)
    }

    fn with_backing(backing: Option<Backing>) -> Self {
        let size = backing.as_ref().map_or(0, |b| b.size);
        Self {
            serial: serial_for(backing.as_ref().map(|b| b.path.as_path())),
            capacity: size.div_ceil(SECTOR_SIZE),
            backing,
            config_generation: 0,
            queue_max_sizes: [QUEUE_SIZE],
            active: None,
            bounce: Vec::new(),
            resume: None,
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The backing file, `None` for an empty disk.
    pub fn path(&self) -> Option<&Path> {
        self.backing.as_ref().map(|b| b.path.as_path())
    }

    /// The GET_ID serial.
    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// Serves `path` from now on (read-only): the capacity and serial follow
    /// the new file, the config generation is bumped and, if the driver is
    /// running, a configuration-change interrupt tells it to re-read the
    /// capacity. On error the old backing stays in place.
    pub fn replace_backing(&mut self, path: &Path) -> Result<(), BlockError> {
        let backing = Backing::open(path)?;
        self.capacity = backing.size.div_ceil(SECTOR_SIZE);
        self.serial = serial_for(Some(path));
        self.backing = Some(backing);
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.trigger(INT_CONFIG_CHANGE) {
                error!("virtio-blk: cannot announce the new capacity: {e}");
            }
        }
        Ok(())
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // 8..12 size_max: not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20 geometry: not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// Processes every available request and notifies the driver.
    fn process_queue(&mut self) {
        let Self {
            active,
            backing,
            bounce,
            serial,
            capacity,
            resume,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        if active.broken || !active.queue.ready() {
            return;
        }
        let disk = Disk {
            backing: backing.as_ref(),
            capacity: *capacity,
            serial,
        };
        let Active {
            mem,
            queue,
            interrupt,
            broken,
        } = active;
        let mut completed = 0usize;
        let fatal = |what: &str, broken: &mut bool| {
            error!("virtio-blk: {what}; the device needs a reset");
            *broken = true;
            if let Err(e) = interrupt.signal_needs_reset() {
                error!("virtio-blk: {e}");
            }
        };
        let mut served = 0usize;
        let mut yielded = false;
        'runs: loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                return fatal(&format!("cannot update the used ring flags: {e}"), broken);
            }
            let mut popped = 0usize;
            loop {
                if served == MAX_CHAINS_PER_RUN && resume.is_some() {
                    // Notifications stay off: the resume event brings us back.
                    yielded = true;
                    break 'runs;
                }
                // `iter`, not `pop_descriptor_chain`: that one logs a corrupt
                // index itself, and this says it once, with the remedy.
                let chain = match queue.iter(&*mem) {
                    Ok(mut chains) => match chains.next() {
                        Some(chain) => chain,
                        None => break,
                    },
                    Err(e) => {
                        return fatal(&format!("the available ring is corrupt ({e})"), broken)
                    }
                };
                popped += 1;
                served += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    warn!("virtio-blk: the driver made descriptor {head} available, beyond the queue size; skipped");
                    continue;
                }
                let len = disk.handle_chain(mem, chain, bounce);
                if let Err(e) = queue.add_used(&*mem, head, len) {
                    return fatal(&format!("cannot return a request: {e}"), broken);
                }
                completed += 1;
            }
            match queue.enable_notification(&*mem) {
                Ok(true) if popped > 0 => continue,
                Ok(true) => {
                    return fatal(
                        "the available ring index is corrupt (more entries than the queue holds)",
                        broken,
                    )
                }
                Ok(false) => break,
                Err(e) => return fatal(&format!("cannot update the used ring flags: {e}"), broken),
            }
        }
        if let Some(resume) = resume.as_ref().filter(|_| yielded) {
            if let Err(e) = resume.write(1) {
                error!("virtio-blk: cannot schedule the rest of the queue: {e}");
            }
        }
        if completed == 0 {
            return;
        }
        match queue.needs_notification(&*mem) {
            Ok(true) => {
                if let Err(e) = interrupt.trigger(INT_USED_RING) {
                    error!("virtio-blk: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => fatal(&format!("cannot read used_event: {e}"), broken),
        }
    }
}

/// What a request needs to know about the disk.
struct Disk<'a> {
    backing: Option<&'a Backing>,
    capacity: u64,
    serial: &'a [u8; SERIAL_LEN],
}

impl Disk<'_> {
    /// Runs one request; returns the used length (0 when no status byte
    /// could be written).
    fn handle_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        bounce: &mut Vec<u8>,
    ) -> u32 {
        let mut descs: Vec<Descriptor> = Vec::new();
        for d in chain {
            if descs.len() == MAX_DESCRIPTORS {
                warn!("virtio-blk: request with more than {MAX_DESCRIPTORS} descriptors dropped");
                return 0;
            }
            descs.push(d);
        }
        // The chain iterator stops early on loops, indexes past the queue,
        // unreadable indirect tables and 4 GiB overflows: the last
        // descriptor we got then still says "next".
        if descs.last().is_none_or(|d| d.has_next()) {
            warn!("virtio-blk: broken descriptor chain (loop, bad index or too long) dropped");
            return 0;
        }
        let Some((status_desc, rest)) = descs.split_last() else {
            return 0;
        };
        let status_addr = status_desc.addr();
        if !status_desc.is_write_only()
            || status_desc.len() == 0
            || !mem.address_in_range(status_addr)
        {
            warn!("virtio-blk: request without a writable status byte dropped");
            return 0;
        }
        let done = self.execute(mem, rest, bounce);
        if let Err(e) = mem.write_obj(done.status, status_addr) {
            warn!("virtio-blk: cannot write the request status: {e}");
            return 0;
        }
        done.written + 1
    }

    /// Runs a request whose status descriptor is known good; `descs` are
    /// the header and data descriptors.
    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        bounce: &mut Vec<u8>,
    ) -> Completion {
        let Some((header, data)) = descs.split_first() else {
            return Completion::malformed("no header");
        };
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Completion::malformed("header not a readable 16-byte buffer");
        }
        let mut h = [0u8; HEADER_LEN as usize];
        if mem.read_slice(&mut h, header.addr()).is_err() {
            return Completion::malformed("header outside guest memory");
        }
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = h;
        let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        match req_type {
            VIRTIO_BLK_T_IN => self.read(mem, data, sector, bounce),
            VIRTIO_BLK_T_OUT => {
                debug!("virtio-blk: write to a read-only disk refused");
                Completion::ioerr(0)
            }
            VIRTIO_BLK_T_FLUSH => Completion::ok(0),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, data),
            t => {
                debug!("virtio-blk: unsupported request type {t}");
                Completion {
                    status: VIRTIO_BLK_S_UNSUPP as u8,
                    written: 0,
                }
            }
        }
    }

    /// Checks that `data` is a non-empty list of non-empty, device-writable
    /// buffers inside guest memory; returns their total length.
    fn writable_data(mem: &GuestMemoryMmap, data: &[Descriptor]) -> Result<u64, &'static str> {
        if data.is_empty() {
            return Err("no data buffer");
        }
        let mut total = 0u64;
        for d in data {
            if !d.is_write_only() {
                return Err("data buffer not device-writable");
            }
            if d.len() == 0 {
                return Err("zero-length data buffer");
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                return Err("data buffer outside guest memory");
            }
            total += u64::from(d.len());
        }
        if total > MAX_DATA_LEN {
            return Err("request longer than 4 GiB");
        }
        Ok(total)
    }

    fn read(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        sector: u64,
        bounce: &mut Vec<u8>,
    ) -> Completion {
        let total = match Self::writable_data(mem, data) {
            Ok(t) => t,
            Err(why) => return Completion::malformed(why),
        };
        if total % SECTOR_SIZE != 0 {
            return Completion::malformed("data length not a multiple of 512");
        }
        let start = sector.checked_mul(SECTOR_SIZE);
        let end = start.and_then(|s| s.checked_add(total));
        let (Some(mut pos), Some(end)) = (start, end) else {
            debug!("virtio-blk: read at sector {sector} overflows");
            return Completion::ioerr(0);
        };
        if end > self.capacity * SECTOR_SIZE {
            debug!(
                "virtio-blk: read of {total} bytes at sector {sector} beyond the disk end ({} sectors)",
                self.capacity
            );
            return Completion::ioerr(0);
        }
        let Some(backing) = self.backing else {
            // Capacity 0: unreachable, every range is out of bounds.
            return Completion::ioerr(0);
        };
        if bounce.len() < BOUNCE_SIZE {
            bounce.resize(BOUNCE_SIZE, 0);
        }
        let mut written: u32 = 0;
        for d in data {
            let mut addr = d.addr();
            let mut left = d.len() as usize;
            while left > 0 {
                let n = left.min(BOUNCE_SIZE);
                let buf = &mut bounce[..n];
                if let Err(e) = backing.read_at(pos, buf) {
                    error!(
                        "virtio-blk: reading {} at offset {pos}: {e}",
                        backing.path.display()
                    );
                    return Completion::ioerr(written);
                }
                // Checked above to lie in guest memory; still checked here.
                if mem.write_slice(buf, addr).is_err() {
                    return Completion::ioerr(written);
                }
                // n ≤ 128 KiB and the total fits u32 (MAX_DATA_LEN).
                written += n as u32;
                pos += n as u64;
                left -= n;
                addr = addr.unchecked_add(n as u64);
            }
        }
        Completion::ok(written)
    }

    fn get_id(&self, mem: &GuestMemoryMmap, data: &[Descriptor]) -> Completion {
        if let Err(why) = Self::writable_data(mem, data) {
            return Completion::malformed(why);
        }
        let mut src: &[u8] = self.serial;
        let mut written = 0u32;
        for d in data {
            if src.is_empty() {
                break;
            }
            let n = src.len().min(d.len() as usize);
            if mem.write_slice(&src[..n], d.addr()).is_err() {
                return Completion::ioerr(written);
            }
            written += n as u32;
            src = &src[n..];
        }
        Completion::ok(written)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << VIRTIO_BLK_F_RO)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored (no writable fields)",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let n = ctx.queues.len();
        let Some(queue) = ctx.queues.into_iter().next().filter(|_| n == 1) else {
            return Err(ActivateError::Backend(format!(
                "virtio-blk has 1 queue, the transport gave {n}"
            )));
        };
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            broken: false,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // The bounce buffer is kept: it is reused at the next activation.
    }

    fn queue_notify(&mut self, index: usize) {
        if index != 0 {
            debug!("virtio-blk: notification of absent queue {index} ignored");
            return;
        }
        self.process_queue();
    }

    fn init_backend(&mut self, ops: &mut EventOps) {
        let registered = EventFd::new(EFD_NONBLOCK).and_then(|fd| {
            ops.add(Events::with_data(&fd, RESUME_EVENT, EventSet::IN))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(fd)
        });
        match registered {
            Ok(fd) => self.resume = Some(fd),
            Err(e) => error!("virtio-blk: no resume eventfd ({e}); queue runs are unbounded"),
        }
    }

    fn backend_event(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(fd) = &self.resume {
            // Drain it: one run serves everything that was pending.
            let _ = fd.read();
        }
        self.process_queue();
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }
}

impl Persist for Block {
    type State = BlockState;
    type Error = BlockError;

    fn save(&self) -> Result<BlockState, BlockError> {
        Ok(BlockState {
            capacity: self.capacity,
            config_generation: self.config_generation,
            broken: self.active.as_ref().is_some_and(|a| a.broken),
            path: self.path().map(Path::to_path_buf),
        })
    }

    /// Applies `s` to a device built from the command line — after
    /// `activate` with the restored queues if it was running. Another
    /// image than at snapshot time (another size) is announced to the
    /// driver.
    fn restore(&mut self, s: &BlockState) -> Result<(), BlockError> {
        self.config_generation = s.config_generation;
        if let Some(active) = &mut self.active {
            active.broken = s.broken;
        }
        if s.capacity != self.capacity {
            // Another image than at snapshot time: announce its size.
            debug!(
                "virtio-blk: capacity {} sectors at snapshot, {} now",
                s.capacity, self.capacity
            );
            self.config_generation = self.config_generation.wrapping_add(1);
            if let Some(active) = &self.active {
                if let Err(e) = active.interrupt.trigger(INT_CONFIG_CHANGE) {
                    error!("virtio-blk: cannot announce the new capacity: {e}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempdir::TempDir;
    use vmm_sys_util::tempfile::TempFile;

    const MEM_SIZE: usize = 4 << 20;
    const HDR: u64 = 0x8000;
    const STATUS: u64 = 0x9000;
    const DATA: u64 = 0x10_0000;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    /// An address past the end of guest memory.
    const OUTSIDE: u64 = 0x1000_0000;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    fn disk(contents: &[u8]) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(contents).unwrap();
        f
    }

    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        vq: MockSplitQueue<'a, GuestMemoryMmap>,
        blk: Block,
        irq: Arc<Interrupt>,
        next_desc: u16,
    }

    /// One descriptor: (address, length, device-writable).
    type D = (u64, u32, bool);

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, blk: Block) -> Self {
            Self::with_event_idx(mem, blk, false)
        }

        fn with_event_idx(mem: &'a GuestMemoryMmap, mut blk: Block, event_idx: bool) -> Self {
            let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
            let mut q: Queue = vq.create_queue().unwrap();
            q.set_event_idx(event_idx);
            let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
            blk.activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![q],
                interrupt: irq.clone(),
                acked_features: blk.device_features(),
            })
            .unwrap();
            Self {
                mem,
                vq,
                blk,
                irq,
                next_desc: 0,
            }
        }

        /// Makes a chain available without notifying.
        fn add(&mut self, descs: &[D]) -> u16 {
            let start = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, w))| {
                    let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if i + 1 < descs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    let next = (start + i as u16 + 1) % QUEUE_SIZE;
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
                })
                .collect();
            self.vq.add_desc_chains(&raw, start).unwrap();
            self.next_desc = (start + descs.len() as u16) % QUEUE_SIZE;
            start
        }

        fn header(&self, addr: u64, req_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
        }

        /// Adds a chain, notifies, and returns (used len, status byte).
        fn run(&mut self, descs: &[D]) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let used_before = self.used_idx();
            let head = self.add(descs);
            self.blk.queue_notify(0);
            assert_eq!(self.used_idx(), used_before.wrapping_add(1));
            let elem = self
                .vq
                .used()
                .ring()
                .ref_at(used_before as usize % QUEUE_SIZE as usize)
                .unwrap()
                .load();
            assert_eq!(elem.id(), u32::from(head));
            (elem.len(), self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        /// A request with the standard layout: header, data, status.
        fn request(&mut self, req_type: u32, sector: u64, data: &[D]) -> (u32, u8) {
            self.header(HDR, req_type, sector);
            let mut descs = vec![(HDR, 16, false)];
            descs.extend_from_slice(data);
            descs.push((STATUS, 1, true));
            self.run(&descs)
        }

        fn used_idx(&self) -> u16 {
            self.vq.used().idx().load()
        }

        fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    #[test]
    fn capacity_features_and_config() {
        let f = disk(&pattern(1000));
        let blk = Block::new(f.as_path()).unwrap();
        assert_eq!(blk.capacity(), 2);
        let feats = blk.device_features();
        for bit in [
            VIRTIO_BLK_F_RO,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
        ] {
            assert_ne!(feats & (1 << bit), 0);
        }
        assert_ne!(feats & VIRTIO_F_VERSION_1, 0);
        assert_ne!(feats & VIRTIO_RING_F_EVENT_IDX, 0);
        let mut c = [0u8; 8];
        blk.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 2);
        let mut w = [0u8; 4];
        blk.read_config(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), 254);
        blk.read_config(20, &mut w);
        assert_eq!(u32::from_le_bytes(w), 512);
        // Partial and out-of-range config reads.
        let mut b = [0xffu8; 4];
        blk.read_config(21, &mut b);
        assert_eq!(b, [2, 0, 0, 0]);
        blk.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(blk.queue_max_sizes(), &[256]);
        assert_eq!(
            Block::new(disk(&pattern(4096)).as_path())
                .unwrap()
                .capacity(),
            8
        );
        assert_eq!(Block::new(disk(&[]).as_path()).unwrap().capacity(), 0);
    }

    #[test]
    fn open_errors_name_the_file() {
        let e = Block::new(Path::new("/nonexistent/rootfs.img"))
            .err()
            .unwrap();
        assert!(matches!(e, BlockError::Open { .. }));
        assert!(e.to_string().contains("/nonexistent/rootfs.img"), "{e}");
        let d = TempDir::new().unwrap();
        let e = Block::new(d.as_path()).err().unwrap();
        assert!(matches!(e, BlockError::NotADisk(_)), "{e}");
    }

    #[test]
    fn reads_at_start_middle_and_end_match_the_file() {
        let contents = pattern(64 << 10);
        let f = disk(&contents);
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        let irqfd_before = r.irq.irqfd().read().is_ok();
        assert!(!irqfd_before);

        // First sector.
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]),
            (513, OK)
        );
        assert_eq!(r.guest(DATA, 512), &contents[..512]);
        assert_eq!(r.irq.status() & INT_USED_RING, INT_USED_RING);
        assert_eq!(r.irq.irqfd().read().unwrap(), 1);

        // Middle, split over three buffers of different sizes.
        let bufs = [
            (DATA, 1024, true),
            (DATA + 0x10000, 512, true),
            (DATA + 0x20000, 2048, true),
        ];
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 50, &bufs), (3585, OK));
        let at = 50 * 512;
        assert_eq!(r.guest(DATA, 1024), &contents[at..at + 1024]);
        assert_eq!(
            r.guest(DATA + 0x10000, 512),
            &contents[at + 1024..at + 1536]
        );
        assert_eq!(
            r.guest(DATA + 0x20000, 2048),
            &contents[at + 1536..at + 3584]
        );

        // Last sector.
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 127, &[(DATA, 512, true)]),
            (513, OK)
        );
        assert_eq!(r.guest(DATA, 512), &contents[(64 << 10) - 512..]);

        // The whole disk in one buffer, larger than the bounce buffer.
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 64 << 10, true)]),
            ((64 << 10) + 1, OK)
        );
        assert_eq!(r.guest(DATA, 64 << 10), contents);
    }

    #[test]
    fn read_larger_than_the_bounce_buffer() {
        let contents = pattern(3 * BOUNCE_SIZE + 4096);
        let f = disk(&contents);
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        let len = contents.len() as u32 - 1024;
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 2, &[(DATA, len, true)]),
            (len + 1, OK)
        );
        assert_eq!(r.guest(DATA, len as usize), &contents[1024..]);
    }

    #[test]
    fn thousand_byte_disk_reads_zeros_past_the_file_end() {
        let contents = pattern(1000);
        let f = disk(&contents);
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        m.write_slice(&[0xee; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 1024, true)]),
            (1025, OK)
        );
        let got = r.guest(DATA, 1024);
        assert_eq!(&got[..1000], &contents[..]);
        assert_eq!(&got[1000..], &[0u8; 24]);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]),
            (513, OK)
        );
        assert_eq!(&r.guest(DATA, 488)[..], &contents[512..]);
        // Sector 2 does not exist.
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 2, &[(DATA, 512, true)]),
            (1, IOERR)
        );
    }

    #[test]
    fn writes_fail_and_leave_the_file_alone() {
        let contents = pattern(4096);
        let f = disk(&contents);
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        m.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]),
            (1, IOERR)
        );
        assert_eq!(std::fs::read(f.as_path()).unwrap(), contents);
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let f = disk(&pattern(4096));
        let m = mem();
        let blk = Block::new(f.as_path()).unwrap();
        let serial = *blk.serial();
        let mut r = Rig::new(&m, blk);
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
        assert_eq!(
            r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]),
            (21, OK)
        );
        assert_eq!(r.guest(DATA, 20), serial);
        assert!(serial.iter().all(|b| b.is_ascii_hexdigit()));
        // A short buffer gets what fits; a split one gets it in pieces.
        assert_eq!(
            r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 8, true)]),
            (9, OK)
        );
        let split = [(DATA + 0x100, 5, true), (DATA + 0x200, 64, true)];
        assert_eq!(r.request(VIRTIO_BLK_T_GET_ID, 0, &split), (21, OK));
        assert_eq!(r.guest(DATA + 0x100, 5), &serial[..5]);
        assert_eq!(r.guest(DATA + 0x200, 15), &serial[5..]);
        for t in [2, 11, 13, 0xdead_beef] {
            assert_eq!(r.request(t, 0, &[]), (1, UNSUPP), "type {t}");
        }
    }

    #[test]
    fn serial_is_a_stable_hash_of_the_file_name() {
        let d1 = TempDir::new().unwrap();
        let d2 = TempDir::new().unwrap();
        let p1 = d1.as_path().join("rootfs.ext4");
        let p2 = d2.as_path().join("rootfs.ext4");
        let p3 = d2.as_path().join("appfs.img");
        for p in [&p1, &p2, &p3] {
            std::fs::write(p, b"x").unwrap();
        }
        let s1 = *Block::new(&p1).unwrap().serial();
        assert_eq!(s1, *Block::new(&p2).unwrap().serial());
        assert_ne!(s1, *Block::new(&p3).unwrap().serial());
        // Pinned: must not change between builds or Rust versions.
        assert_eq!(&serial_for(Some(Path::new("/x/rootfs.ext4"))), &s1);
        assert_eq!(&serial_for(None), b"6c62272e07bb014262b8");
        assert_eq!(Block::empty().serial(), b"6c62272e07bb014262b8");
    }

    #[test]
    fn out_of_range_sectors_fail() {
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        let one = [(DATA, 512, true)];
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 8, &one), (1, IOERR));
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 1024, true)]),
            (1, IOERR)
        );
        assert_eq!(r.request(VIRTIO_BLK_T_IN, u64::MAX, &one), (1, IOERR));
        assert_eq!(r.request(VIRTIO_BLK_T_IN, u64::MAX / 512, &one), (1, IOERR));
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 7, &one), (513, OK));
    }

    #[test]
    fn empty_disk() {
        let m = mem();
        let blk = Block::empty();
        assert_eq!((blk.capacity(), blk.path()), (0, None));
        let mut r = Rig::new(&m, blk);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]),
            (1, IOERR)
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]),
            (21, OK)
        );
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
    }

    #[test]
    fn malformed_chains_get_ioerr_when_possible() {
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        let hdr = (HDR, 16, false);
        let st = (STATUS, 1, true);
        let cases: &[(&str, Vec<D>)] = &[
            ("no data", vec![hdr, st]),
            ("zero-length data", vec![hdr, (DATA, 0, true), st]),
            ("device-readable data", vec![hdr, (DATA, 512, false), st]),
            (
                "data not a multiple of 512",
                vec![hdr, (DATA, 500, true), st],
            ),
            (
                "data outside guest memory",
                vec![hdr, (OUTSIDE, 512, true), st],
            ),
            (
                "data straddling the end of guest memory",
                vec![hdr, (MEM_SIZE as u64 - 256, 512, true), st],
            ),
            (
                "data at the top of the address space",
                vec![hdr, (u64::MAX - 100, 512, true), st],
            ),
            ("short header", vec![(HDR, 8, false), (DATA, 512, true), st]),
            (
                "writable header",
                vec![(HDR, 16, true), (DATA, 512, true), st],
            ),
            (
                "header outside guest memory",
                vec![(OUTSIDE, 16, false), (DATA, 512, true), st],
            ),
            ("status only", vec![st]),
        ];
        for (what, chain) in cases {
            m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
            assert_eq!(r.run(chain), (1, IOERR), "{what}");
            assert_eq!(r.guest(DATA, 512), [0xab; 512], "{what}: no data written");
        }
    }

    #[test]
    fn chains_without_a_usable_status_byte_are_returned_empty() {
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        let hdr = (HDR, 16, false);
        let cases: &[(&str, Vec<D>)] = &[
            ("header only", vec![hdr]),
            (
                "read-only status",
                vec![hdr, (DATA, 512, true), (STATUS, 1, false)],
            ),
            (
                "zero-length status",
                vec![hdr, (DATA, 512, true), (STATUS, 0, true)],
            ),
            (
                "status outside guest memory",
                vec![hdr, (DATA, 512, true), (OUTSIDE, 1, true)],
            ),
        ];
        for (what, chain) in cases {
            m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
            assert_eq!(r.run(chain), (0, 0xff), "{what}");
            assert_eq!(r.guest(DATA, 512), [0xab; 512], "{what}: no data written");
        }
        // The device still works afterwards.
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]),
            (513, OK)
        );
    }

    #[test]
    fn looping_and_overlong_chains_terminate() {
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ...
        let raw = [
            RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(Descriptor::new(
                STATUS,
                1,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                0,
            )),
        ];
        r.vq.add_desc_chains(&raw, 0).unwrap();
        r.blk.queue_notify(0);
        assert_eq!(r.used_idx(), 1);
        assert_eq!(r.vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        // A "next" index past the queue.
        let raw = [RawDescriptor::from(Descriptor::new(
            HDR,
            16,
            VRING_DESC_F_NEXT as u16,
            QUEUE_SIZE + 5,
        ))];
        r.vq.add_desc_chains(&raw, 10).unwrap();
        r.blk.queue_notify(0);
        assert_eq!(r.used_idx(), 2);
        assert_eq!(r.vq.used().ring().ref_at(1).unwrap().load().len(), 0);
        // A chain through the whole table (256 descriptors) is well formed
        // if it ends; this one is 255 data buffers of 512 bytes: too much
        // for a 4 KiB disk, so IOERR, but not a hang or a panic.
        r.next_desc = 0;
        let mut chain: Vec<D> = vec![(HDR, 16, false)];
        chain.extend((0..254).map(|i| (DATA + i * 512, 512, true)));
        chain.push((STATUS, 1, true));
        assert_eq!(r.run(&chain), (1, IOERR));
    }

    #[test]
    fn bogus_head_index_is_skipped() {
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        // avail ring entry 0 = 300 (beyond the 256-entry table), idx = 1.
        r.vq.avail().ring().ref_at(0).unwrap().store(300);
        r.vq.avail().idx().store(1);
        r.blk.queue_notify(0);
        assert_eq!(r.used_idx(), 0);
        assert!(!r.irq.needs_reset());
        // The next request is served normally.
        r.next_desc = 0;
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]),
            (513, OK)
        );
    }

    #[test]
    fn corrupt_available_index_needs_reset_without_hanging() {
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        r.vq.avail().idx().store(1000);
        r.blk.queue_notify(0);
        assert!(r.irq.needs_reset());
        assert_eq!(r.irq.status() & INT_CONFIG_CHANGE, INT_CONFIG_CHANGE);
        // Further notifications are ignored until reset.
        r.blk.queue_notify(0);
        assert_eq!(r.used_idx(), 0);
        r.blk.reset();
        r.blk.queue_notify(0);
    }

    #[test]
    fn event_idx_suppresses_interrupts_until_used_event() {
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::with_event_idx(&m, Block::new(f.as_path()).unwrap(), true);
        // used_event sits after the avail ring entries.
        let used_event = GuestAddress(r.vq.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE));
        m.write_obj(5u16, used_event).unwrap();
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
        assert!(
            r.irq.irqfd().read().is_err(),
            "no interrupt before used_event"
        );
        m.write_obj(1u16, used_event).unwrap();
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
        assert_eq!(r.irq.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn queue_notify_before_activation_or_after_reset_is_harmless() {
        let f = disk(&pattern(4096));
        let mut blk = Block::new(f.as_path()).unwrap();
        blk.queue_notify(0);
        blk.queue_notify(3);
        let m = mem();
        let mut r = Rig::new(&m, blk);
        r.blk.reset();
        r.add(&[(HDR, 16, false), (STATUS, 1, true)]);
        r.blk.queue_notify(0);
        assert_eq!(r.used_idx(), 0);
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let m = mem();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut blk = Block::empty();
        let ctx = |queues| ActivateContext {
            mem: m.clone(),
            queues,
            interrupt: irq.clone(),
            acked_features: 0,
        };
        assert!(blk.activate(ctx(vec![])).is_err());
        let two = vec![Queue::new(8).unwrap(), Queue::new(8).unwrap()];
        assert!(blk.activate(ctx(two)).is_err());
    }

    #[test]
    fn replace_backing_updates_capacity_and_signals_the_driver() {
        let small = pattern(1024);
        let big = pattern(8192);
        let (f1, f2) = (disk(&small), disk(&big));
        let m = mem();
        let mut blk = Block::new(f1.as_path()).unwrap();
        // Before activation: no interrupt, but the generation moves.
        blk.replace_backing(f2.as_path()).unwrap();
        assert_eq!((blk.capacity(), blk.config_generation()), (16, 1));
        blk.replace_backing(f1.as_path()).unwrap();
        let mut r = Rig::new(&m, blk);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)]),
            (1, IOERR)
        );
        r.irq.ack(u32::MAX);
        let _ = r.irq.irqfd().read();

        r.blk.replace_backing(f2.as_path()).unwrap();
        assert_eq!(r.blk.capacity(), 16);
        assert_eq!(r.blk.config_generation(), 3);
        assert_eq!(r.blk.path(), Some(f2.as_path()));
        let mut c = [0u8; 8];
        r.blk.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 16);
        assert_eq!(r.irq.status(), INT_CONFIG_CHANGE);
        assert_eq!(r.irq.irqfd().read().unwrap(), 1);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)]),
            (513, OK)
        );
        assert_eq!(r.guest(DATA, 512), &big[1536..2048]);

        // A failed replacement keeps the old disk.
        assert!(r.blk.replace_backing(Path::new("/nonexistent")).is_err());
        assert_eq!((r.blk.capacity(), r.blk.config_generation()), (16, 3));
    }

    #[test]
    fn restored_state_keeps_the_queue_and_announces_a_new_size() {
        let small = pattern(1024);
        let big = pattern(8192);
        let (f1, f2) = (disk(&small), disk(&big));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f1.as_path()).unwrap());
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]),
            (513, OK)
        );
        let saved = r.blk.save().unwrap();
        let queues = r.blk.queue_states();
        assert_eq!(queues.len(), 1);
        assert_eq!(queues[0].next_used, 1);
        let _ = r.irq.irqfd().read();
        r.irq.ack(u32::MAX);

        // Same image: nothing to announce.
        let mut same = Block::new(f1.as_path()).unwrap();
        same.restore(&saved).unwrap();
        assert_eq!(same.config_generation(), 0);
        // Another size (another appfs at restore): new capacity, new
        // generation, and a config-change interrupt once running.
        let mut other = Block::new(f2.as_path()).unwrap();
        let q = Queue::try_from(queues[0]).unwrap();
        other
            .activate(ActivateContext {
                mem: m.clone(),
                queues: vec![q],
                interrupt: r.irq.clone(),
                acked_features: other.device_features(),
            })
            .unwrap();
        other.restore(&saved).unwrap();
        assert_eq!((other.capacity(), other.config_generation()), (16, 1));
        assert_eq!(r.irq.status(), INT_CONFIG_CHANGE);
        assert_eq!(other.queue_states(), queues);
    }

    #[test]
    fn reads_mark_guest_pages_dirty() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryRegion;
        let f = disk(&pattern(4096));
        let m = mem();
        let mut r = Rig::new(&m, Block::new(f.as_path()).unwrap());
        let region = m.iter().next().unwrap();
        let page = DATA as usize + 0x3000;
        assert!(!region.bitmap().dirty_at(page));
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(page as u64, 512, true)]),
            (513, OK)
        );
        assert!(region.bitmap().dirty_at(page));
    }

    /// A driver whose reads land on its own available ring — here each
    /// sector re-publishes the request and points its header at the next
    /// sector — keeps the device busy with no guest CPU at all. A run
    /// stops after MAX_CHAINS_PER_RUN chains and resumes through the event
    /// loop, so other devices get their turn.
    #[test]
    fn a_self_refilling_ring_yields_the_event_loop() {
        const DESC: u64 = 0x1000;
        const AVAIL: u64 = 0x2000;
        const USED: u64 = 0x3000;
        const N: u64 = 3 * MAX_CHAINS_PER_RUN as u64;
        // Sector s, read over the available ring: idx = s + 2, every ring
        // entry head 0, and at +64 the next header: IN of sector s + 1.
        let mut img = vec![0u8; (N * 512) as usize];
        for s in 0..N {
            let b = &mut img[(s * 512) as usize..][..512];
            b[2..4].copy_from_slice(&((s + 2) as u16).to_le_bytes());
            b[72..80].copy_from_slice(&(s + 1).to_le_bytes());
        }
        let f = disk(&img);
        let m = mem();
        let mut blk = Block::new(f.as_path()).unwrap();
        blk.resume = Some(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_size(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        let desc = |i: u64, addr: u64, len: u32, flags: u32, next: u16| {
            let d = Descriptor::new(addr, len, flags as u16, next);
            m.write_obj(RawDescriptor::from(d), GuestAddress(DESC + 16 * i))
                .unwrap();
        };
        desc(0, AVAIL + 64, 16, VRING_DESC_F_NEXT, 1);
        desc(1, AVAIL, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
        desc(2, STATUS, 1, VRING_DESC_F_WRITE, 0);
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        blk.activate(ActivateContext {
            mem: m.clone(),
            queues: vec![q],
            interrupt: irq,
            acked_features: blk.device_features(),
        })
        .unwrap();
        let used = || m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();

        blk.queue_notify(0);
        assert_eq!(used(), MAX_CHAINS_PER_RUN as u16);
        let mut runs = 1;
        while blk.resume.as_ref().unwrap().read().is_ok() {
            blk.process_queue();
            runs += 1;
            assert!(runs < 10, "the run never ends");
        }
        // Every sector, then one read past the end (IOERR, nothing re-published).
        assert_eq!(used(), (N + 1) as u16);
        assert_eq!(runs, 4);
        assert!(!blk.active.as_ref().unwrap().broken);
    }
}
