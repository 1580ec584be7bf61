//! virtio-blk driver: one request queue, requests as 3-descriptor chains
//! (header, data, status byte), completions by interrupt.

use crate::util::Fnv;
use crate::virtio::{wait_for, wait_until, Buf, Device, VirtQueue, REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS};
use crate::mem;

const F_RO: u64 = 1 << 5;
/// InterruptStatus bit: the device configuration changed.
const INT_CONFIG: u32 = 2;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_GET_ID: u32 = 8;
pub const SECTOR: usize = 512;

/// Requests in flight at most (readbench depth).
const SLOTS: usize = 8;
const SLOT_BYTES: usize = 32; // 16-byte header, then the status byte
const BENCH_CHUNK: usize = 64 << 10;

pub struct Blk {
    dev: Device,
    q: VirtQueue,
    pub capacity: u64,
    pub ro: bool,
    /// Per slot: request header and status byte.
    slots: *mut u8,
    /// Queue head id -> slot, and whether that slot completed.
    head_slot: [u8; 256],
    done: [bool; SLOTS],
}

impl Blk {
    /// Initialises the device; on failure gives it back with the reason.
    pub fn new(mut dev: Device) -> Result<Blk, (Device, &'static str)> {
        if let Err(e) = dev.init(F_RO) {
            return Err((dev, e));
        }
        let q = match dev.setup_queue(0, 128) {
            Ok(q) => q,
            Err(e) => return Err((dev, e)),
        };
        let capacity = dev.config_u64(0);
        let ro = dev.features & F_RO != 0;
        dev.driver_ok();
        let slots = mem::alloc_zeroed(SLOTS * SLOT_BYTES, 64).as_mut_ptr();
        Ok(Blk { dev, q, capacity, ro, slots, head_slot: [0; 256], done: [false; SLOTS] })
    }

    /// Gives the device back (e.g. to re-initialise it from scratch).
    pub fn into_device(self) -> Device {
        self.dev
    }

    /// The device (raw register access for `hostile=` cases).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Queues request `kind` at `sector` with `len` bytes at `data` in slot
    /// `slot`. `device_writes`: the data buffer is written by the device.
    fn submit(&mut self, slot: usize, kind: u32, sector: u64, data: *mut u8, len: usize, device_writes: bool) {
        // SAFETY: slot < SLOTS; the slot area is ours and SLOT_BYTES long.
        let hdr = unsafe { self.slots.add(slot * SLOT_BYTES) };
        // SAFETY: as above: 16 header bytes then the status byte.
        unsafe {
            core::ptr::write_unaligned(hdr as *mut u32, kind);
            core::ptr::write_unaligned(hdr.add(4) as *mut u32, 0);
            core::ptr::write_unaligned(hdr.add(8) as *mut u64, sector);
            core::ptr::write_volatile(hdr.add(16), 0xff);
        }
        // SAFETY: the status byte is inside the slot.
        let status = unsafe { hdr.add(16) };
        let data_buf = Buf { addr: data as u64, len: len as u32, write: device_writes };
        let head = if len > 0 {
            self.q.add(&[Buf::out(hdr, 16), data_buf, Buf::inp(status, 1)])
        } else {
            self.q.add(&[Buf::out(hdr, 16), Buf::inp(status, 1)])
        };
        let head = head.expect("virtio-blk queue full");
        self.head_slot[usize::from(head)] = slot as u8;
        self.done[slot] = false;
    }

    /// Re-reads the capacity if the device raised a configuration change
    /// (a restore behind another disk file than the snapshot saw); as a
    /// Linux driver does on the config interrupt. Returns whether it did.
    pub fn check_config_change(&mut self) -> bool {
        let isr = self.dev.read(REG_INTERRUPT_STATUS);
        if isr & INT_CONFIG == 0 {
            return false;
        }
        self.dev.write(REG_INTERRUPT_ACK, INT_CONFIG);
        self.capacity = self.dev.config_u64(0);
        true
    }

    fn reap(&mut self) {
        if self.dev.ack_interrupt() & INT_CONFIG != 0 {
            self.capacity = self.dev.config_u64(0);
        }
        while let Some((head, _)) = self.q.pop_used() {
            let slot = usize::from(self.head_slot[usize::from(head)]);
            self.done[slot] = true;
        }
    }

    fn status(&self, slot: usize) -> u8 {
        // SAFETY: the status byte of a slot we own; the device wrote it
        // before putting the chain in the used ring.
        unsafe { core::ptr::read_volatile(self.slots.add(slot * SLOT_BYTES + 16)) }
    }

    fn wait_slot(&mut self, slot: usize) -> u8 {
        wait_for(|| {
            self.reap();
            self.done[slot].then_some(())
        });
        self.status(slot)
    }

    /// One synchronous request; returns the virtio-blk status (0 = OK).
    pub fn request(&mut self, kind: u32, sector: u64, data: *mut u8, len: usize, device_writes: bool) -> u8 {
        self.submit(0, kind, sector, data, len, device_writes);
        self.q.notify();
        self.wait_slot(0)
    }

    pub fn read_sector(&mut self, sector: u64, buf: &mut [u8; SECTOR]) -> u8 {
        self.request(T_IN, sector, buf.as_mut_ptr(), SECTOR, true)
    }

    /// `read_sector` that gives up after about `ms` milliseconds (`None`),
    /// for a device that may have stopped serving.
    pub fn read_sector_within(&mut self, sector: u64, buf: &mut [u8; SECTOR], ms: u64) -> Option<u8> {
        self.submit(0, T_IN, sector, buf.as_mut_ptr(), SECTOR, true);
        self.q.notify();
        wait_until(ms, || {
            self.reap();
            self.done[0]
        })
        .then(|| self.status(0))
    }

    /// VIRTIO_BLK_T_GET_ID: the device id string (up to 20 bytes).
    pub fn get_id(&mut self, out: &mut [u8; 20]) -> u8 {
        out.fill(0);
        self.request(T_GET_ID, 0, out.as_mut_ptr(), out.len(), true)
    }

    /// Reads the whole disk in 64 KiB requests, SLOTS in flight, and
    /// hashes it in order. Returns (bytes, FNV-1a), or the first error
    /// as (sector, status).
    pub fn readbench(&mut self) -> Result<(u64, u64), (u64, u8)> {
        let chunk_sectors = (BENCH_CHUNK / SECTOR) as u64;
        let bufs = mem::alloc(SLOTS * BENCH_CHUNK, 4096).as_mut_ptr();
        let total = self.capacity;
        let nchunks = total.div_ceil(chunk_sectors);
        let mut fnv = Fnv::new();
        let mut submitted = 0u64;
        let submit = |this: &mut Blk, k: u64| {
            let slot = (k % SLOTS as u64) as usize;
            let sector = k * chunk_sectors;
            let n = (total - sector).min(chunk_sectors) as usize * SECTOR;
            // SAFETY: slot < SLOTS, each slot owns BENCH_CHUNK bytes.
            let buf = unsafe { bufs.add(slot * BENCH_CHUNK) };
            this.submit(slot, T_IN, sector, buf, n, true);
        };
        while submitted < nchunks.min(SLOTS as u64) {
            submit(self, submitted);
            submitted += 1;
        }
        self.q.notify();
        for k in 0..nchunks {
            let slot = (k % SLOTS as u64) as usize;
            let status = self.wait_slot(slot);
            let sector = k * chunk_sectors;
            if status != 0 {
                return Err((sector, status));
            }
            let n = (total - sector).min(chunk_sectors) as usize * SECTOR;
            // SAFETY: the device filled these n bytes of the slot's buffer
            // and no longer owns it (the chain is in the used ring).
            fnv.update(unsafe { core::slice::from_raw_parts(bufs.add(slot * BENCH_CHUNK), n) });
            if submitted < nchunks {
                submit(self, submitted);
                submitted += 1;
                self.q.notify();
            }
        }
        Ok((total * SECTOR as u64, fnv.0))
    }
}
