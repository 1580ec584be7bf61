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
/// Runs of one wake-up that found the available index moved but no
/// request in the ring, before the device yields the event loop.
const MAX_EMPTY_RUNS: usize = 8;
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
        let mut empty_runs = 0usize;
        let mut yielded = false;
        'runs: loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                return fatal(&format!("cannot update the used ring flags: {e}"), broken);
            }
            let before = served;
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
            // `true`: the driver made more available since the last look
            // (on another vCPU, or right after DRIVER_OK while the
            // activation kick runs). Another run serves it; `iter` refuses
            // an index that is more than a queue ahead. A driver that moves
            // the index back and forth could keep runs empty: after a few
            // the device yields, as after MAX_CHAINS_PER_RUN.
            if served == before {
                empty_runs += 1;
            }
            match queue.enable_notification(&*mem) {
                Ok(true) if empty_runs >= MAX_EMPTY_RUNS && resume.is_some() => {
                    yielded = true;
                    break;
                }
                Ok(true) => continue,
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
mod tests;
