//! Tests of the virtio-blk device.

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
