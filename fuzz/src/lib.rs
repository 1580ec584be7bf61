//! Shared plumbing of snapvm's fuzz targets (see `fuzz/README.md`).
//!
//! Every target reads its input the same way: first a guest-memory image
//! (a little-endian `u16` length, then that many bytes, copied into guest
//! RAM from address 0), then a target-specific control stream read with
//! [`Input`]. Reading past the end yields zeros, so every byte string is a
//! valid input and the fuzzer never wastes runs on rejected ones.
//!
//! The devices are driven through their public APIs, the way the
//! virtio-mmio transport and the event loop drive them in firerunner:
//! queues are built and checked as the transport builds them at DRIVER_OK
//! ([`queue`]), and queue notifications are delivered only while the
//! device is activated ([`deliver_notifications`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use snapvm::vmm::bus::{lock, BusDevice};
use snapvm::vmm::devices::virtio::block::Block;
use snapvm::vmm::devices::virtio::mmio::{regs, MmioTransport, SharedDevice};
use snapvm::vmm::devices::virtio::vsock::Vsock;
use snapvm::vmm::devices::virtio::Interrupt;
pub use snapvm::vmm::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod seeds;

/// Guest RAM of every target: 64 KiB at 0, then 4 KiB after a 4 KiB hole,
/// so buffers that run off the end of RAM or straddle a hole are easy for
/// the fuzzer to find.
pub const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x1_1000, 0x1000)];

/// The guest CID of the vsock device in every target.
pub const GUEST_CID: u64 = 3;

/// Host port with a listener in the vsock targets (`<uds>_1234`).
pub const HOST_PORT: u32 = 1234;

/// A cursor over fuzz input; reads past the end yield zeros / empty slices.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Fresh guest RAM ([`RAM`]) holding the memory image at the front of
/// `input`.
pub fn guest_memory(input: &mut Input<'_>) -> GuestMemoryMmap {
    let len = usize::from(input.u16());
    let image = input.bytes(len);
    let mem = empty_memory();
    poke(&mem, 0, image);
    mem
}

/// Fresh, zeroed guest RAM ([`RAM`]).
pub fn empty_memory() -> GuestMemoryMmap {
    let ranges = RAM.map(|(addr, size)| (GuestAddress(addr), size));
    GuestMemoryMmap::from_ranges(&ranges).expect("cannot allocate guest memory")
}

/// A guest store of `bytes` at `addr`: the part inside RAM lands, the rest
/// is dropped.
pub fn poke(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    let end = addr.saturating_add(bytes.len() as u64);
    for (start, size) in RAM {
        let (lo, hi) = (addr.max(start), end.min(start + size as u64));
        if lo < hi {
            let from = (lo - addr) as usize;
            let to = (hi - addr) as usize;
            mem.write_slice(&bytes[from..to], GuestAddress(lo))
                .expect("a range inside RAM is writable");
        }
    }
}

/// An interrupt line whose eventfd nobody reads (writes to an eventfd
/// only fail once its counter is near `u64::MAX`).
pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("cannot create an eventfd"),
    ))
}

/// A queue as the virtio-mmio transport builds it at DRIVER_OK: `None`
/// where the transport would refuse the driver's settings (bad size,
/// misaligned or out-of-RAM rings), since the device never sees those.
pub fn queue(
    mem: &GuestMemoryMmap,
    max_size: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
) -> Option<Queue> {
    let mut q = Queue::new(max_size).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(used)).ok()?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// This process's scratch directory (disk images, sockets), under
/// `$TMPDIR`; `scripts/fuzz.sh` points that at a directory it removes.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("snapvm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create the scratch directory");
        dir
    })
}

/// Disk images the block targets serve, by selector (`sel % 4`): no image
/// (an empty disk), 1000 bytes (a partial last sector), 64 KiB of a
/// pattern, 1 MiB sparse with data at both ends.
pub fn disk(sel: u8) -> Option<&'static Path> {
    static DISKS: OnceLock<[PathBuf; 3]> = OnceLock::new();
    let disks = DISKS.get_or_init(|| {
        let dir = scratch();
        let pattern = |n: usize| (0..n).map(|i| (i * 7 + i / 512) as u8).collect::<Vec<u8>>();
        let odd = dir.join("odd.img");
        std::fs::write(&odd, pattern(1000)).expect("write odd.img");
        let small = dir.join("small.img");
        std::fs::write(&small, pattern(64 << 10)).expect("write small.img");
        let sparse = dir.join("sparse.img");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&sparse).expect("create sparse.img");
            f.set_len(1 << 20).expect("size sparse.img");
            f.write_all_at(&pattern(4096), 0).expect("write sparse.img");
            f.write_all_at(&pattern(4096), (1 << 20) - 4096)
                .expect("write sparse.img");
        }
        [odd, small, sparse]
    });
    match sel % 4 {
        0 => None,
        n => Some(disks[usize::from(n) - 1].as_path()),
    }
}

/// A block device serving [`disk`] `sel`.
pub fn block_device(sel: u8) -> Block {
    match disk(sel) {
        Some(path) => Block::new(path).expect("cannot open the fuzz disk image"),
        None => Block::empty(),
    }
}

/// A fresh vsock device listening at `<scratch>/<name>`.
pub fn vsock_device(name: &str) -> (Vsock, PathBuf) {
    let uds = scratch().join(name);
    let dev = Vsock::new(GUEST_CID, &uds).expect("cannot create the vsock device");
    (dev, uds)
}

/// Which device a transport target drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Block,
    Vsock,
}

/// A virtio-mmio transport over a fresh device of `kind`. `slot` names
/// the vsock socket, so two vsock transports can coexist.
pub fn transport(mem: &GuestMemoryMmap, kind: Kind, slot: u8) -> MmioTransport {
    let device: SharedDevice = match kind {
        Kind::Block => Arc::new(Mutex::new(block_device(2))),
        Kind::Vsock => Arc::new(Mutex::new(vsock_device(&format!("t{slot}.sock")).0)),
    };
    MmioTransport::new(mem.clone(), device, interrupt()).expect("cannot build the transport")
}

/// What the event loop does with queue notifications (mmio.rs
/// `EventHandler`): drain each queue's eventfd and hand a notification to
/// the device only while it is activated.
pub fn deliver_notifications(t: &MmioTransport) {
    for (i, evt) in t.queue_evts().iter().enumerate() {
        if evt.read().is_ok() {
            let mut dev = lock(t.device());
            if t.is_activated() {
                dev.queue_notify(i);
            }
        }
    }
}

/// 32-bit register write.
pub fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// 32-bit register read.
pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// One queue as a driver sets it up: size, descriptor table, available
/// ring, used ring.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueSetup {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A well-behaved driver's bring-up (Linux's order): reset, ACKNOWLEDGE,
/// DRIVER, accept every offered feature, FEATURES_OK, the queues,
/// DRIVER_OK.
pub fn bring_up(t: &mut MmioTransport, queues: &[QueueSetup]) {
    write_reg(t, regs::STATUS, 0);
    write_reg(t, regs::STATUS, 1);
    write_reg(t, regs::STATUS, 3);
    for sel in 0..2 {
        write_reg(t, regs::DEVICE_FEATURES_SEL, sel);
        let f = read_reg(t, regs::DEVICE_FEATURES);
        write_reg(t, regs::DRIVER_FEATURES_SEL, sel);
        write_reg(t, regs::DRIVER_FEATURES, f);
    }
    write_reg(t, regs::STATUS, 11);
    for (i, q) in queues.iter().enumerate() {
        write_reg(t, regs::QUEUE_SEL, i as u32);
        write_reg(t, regs::QUEUE_NUM, u32::from(q.size));
        for (lo, v) in [
            (regs::QUEUE_DESC_LOW, q.desc),
            (regs::QUEUE_DRIVER_LOW, q.avail),
            (regs::QUEUE_DEVICE_LOW, q.used),
        ] {
            write_reg(t, lo, v as u32);
            write_reg(t, lo + 4, (v >> 32) as u32);
        }
        write_reg(t, regs::QUEUE_READY, 1);
    }
    write_reg(t, regs::STATUS, 15);
}
