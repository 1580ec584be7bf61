//! `hostile=<case>` (appfs manifest line): after the diff snapshot point
//! and before the agent connects, the guest attacks its own devices the
//! way a hostile function would — bad descriptor chains on vda, bad
//! register writes, bad vsock packets — reports what came back, brings
//! the device back to a working state (re-initialising it after
//! DEVICE_NEEDS_RESET) and checks that a good request works again. Then the
//! agent serves as usual, so a test can also check that the VM answers.
//!
//! Every result is one serial line `testguest: hostile <case>: <what>
//! <result>`; the run ends with `testguest: hostile <case>: done`. See
//! CONTRACT.md for the cases and tests/hostile.rs for what the VMM must do.

use crate::blk::{Blk, SECTOR, T_IN};
use crate::bootinfo::BootInfo;
use crate::disks::Devices;
use crate::util::fnv1a;
use crate::virtio::{self, wait_until, Buf, Device, VirtQueue};
use crate::vsock::{self, Hdr, Vsock, RAW_PORTS};
use crate::{apic, io, mem, println};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const STATUS_NEEDS_RESET: u32 = 64;

/// Host port the vsock cases connect to; the test listens there.
pub const HOSTILE_PORT: u32 = 1235;

/// Runs one case. `vs` is the vsock driver the agent uses afterwards.
pub fn run(case: &[u8], boot: &BootInfo, devs: &mut Devices, vs: Option<&mut Vsock>) {
    let name = core::str::from_utf8(case).unwrap_or("?");
    let ram_end = boot.ram().map(|r| r.end()).max().unwrap_or(0);
    let ctx = Ctx { name, ram_end };
    ctx.say(format_args!("start"));
    let known = match case {
        b"mmio-unknown" => with_blk(&ctx, devs, mmio_unknown),
        b"blk-self-refill" => with_dev(&ctx, devs, |ctx, dev| self_refill(ctx, dev, vs)),
        b"mmio-state" => with_dev(&ctx, devs, mmio_state),
        b"blk-race" => with_dev(&ctx, devs, blk_race),
        b"vsock-bad-len" | b"vsock-bad-op" | b"vsock-bad-port" | b"vsock-bad-credit" | b"vsock-flood" => {
            match vs {
                Some(vs) => {
                    let mut r = RawVsock { ctx: &ctx, vs, next_port: RAW_PORTS.start };
                    match case {
                        b"vsock-bad-len" => r.bad_len(),
                        b"vsock-bad-op" => r.bad_op(),
                        b"vsock-bad-port" => r.bad_port(),
                        b"vsock-bad-credit" => r.bad_credit(),
                        _ => r.flood(),
                    }
                }
                None => ctx.say(format_args!("no vsock device")),
            }
            true
        }
        _ => match blk_case(case) {
            Some(f) => with_raw_blk(&ctx, devs, f),
            None => false,
        },
    };
    if !known {
        ctx.say(format_args!("unknown case"));
    }
    apic::timer_stop();
    ctx.say(format_args!("done"));
}

struct Ctx<'a> {
    name: &'a str,
    ram_end: u64,
}

impl Ctx<'_> {
    fn say(&self, what: core::fmt::Arguments<'_>) {
        println!("testguest: hostile {}: {}", self.name, what);
    }
}

// ---- Block device ----------------------------------------------------------

/// Queue size of the raw block driver.
const RAW_QSIZE: u16 = 16;
/// Scratch area of the raw block driver: headers, status bytes, indirect
/// tables, data.
const SCRATCH: usize = 128 << 10;
const OFF_HDR: usize = 0;
const OFF_STATUS: usize = 0x800;
const OFF_TABLE: usize = 0x1000;
const OFF_DATA: usize = 0x10000;

/// vda driven descriptor by descriptor.
struct RawBlk {
    dev: Device,
    q: VirtQueue,
    buf: *mut u8,
    /// Used elements seen so far.
    used: u32,
}

/// What came back for one chain.
enum Outcome {
    Used { len: u32 },
    Nothing,
}

impl RawBlk {
    fn new(mut dev: Device) -> Result<RawBlk, (Device, &'static str)> {
        if let Err(e) = dev.init(0) {
            return Err((dev, e));
        }
        let q = match dev.setup_queue(0, RAW_QSIZE) {
            Ok(q) => q,
            Err(e) => return Err((dev, e)),
        };
        dev.driver_ok();
        let buf = mem::alloc_zeroed(SCRATCH, 4096).as_mut_ptr();
        Ok(RawBlk { dev, q, buf, used: 0 })
    }

    fn addr(&self, off: usize) -> u64 {
        self.buf as u64 + off as u64
    }

    /// A request header in slot `slot`; returns its address.
    fn header(&self, slot: usize, kind: u32, sector: u64) -> u64 {
        let off = OFF_HDR + 16 * slot;
        // SAFETY: slot < 128, inside the scratch area's header part.
        unsafe {
            core::ptr::write_unaligned(self.buf.add(off) as *mut u32, kind);
            core::ptr::write_unaligned(self.buf.add(off + 4) as *mut u32, 0);
            core::ptr::write_unaligned(self.buf.add(off + 8) as *mut u64, sector);
        }
        self.addr(off)
    }

    /// Status byte `slot` set to 0xff; returns its address.
    fn status_byte(&self, slot: usize) -> u64 {
        // SAFETY: inside the scratch area's status part.
        unsafe { core::ptr::write_volatile(self.buf.add(OFF_STATUS + slot), 0xff) };
        self.addr(OFF_STATUS + slot)
    }

    fn read_status(&self, addr: u64) -> u8 {
        // SAFETY: `addr` is a status byte this driver handed out (or any
        // RAM byte: reads of identity-mapped RAM are harmless).
        unsafe { core::ptr::read_volatile(addr as *const u8) }
    }

    /// Descriptor `i` of an indirect table at scratch offset `table`.
    fn table_desc(&self, table: usize, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let p = self.addr(table + 16 * i) as *mut u8;
        // SAFETY: callers keep tables inside the scratch area.
        unsafe {
            core::ptr::write_unaligned(p as *mut u64, addr);
            core::ptr::write_unaligned(p.add(8) as *mut u32, len);
            core::ptr::write_unaligned(p.add(12) as *mut u16, flags);
            core::ptr::write_unaligned(p.add(14) as *mut u16, next);
        }
    }

    /// The usual three descriptors at `first..first+3`: header, data,
    /// status.
    fn chain3(&mut self, first: u16, hdr: (u64, u32), data: (u64, u32, u16), status: (u64, u32)) {
        self.q.raw_desc(first, hdr.0, hdr.1, F_NEXT, first + 1);
        self.q.raw_desc(first + 1, data.0, data.1, data.2 | F_NEXT, first + 2);
        self.q.raw_desc(first + 2, status.0, status.1, F_WRITE, 0);
    }

    /// Publishes `head`, notifies, and waits for one used element.
    fn kick(&mut self, head: u16) -> Outcome {
        self.q.raw_publish(head);
        self.q.notify();
        self.wait_used()
    }

    fn wait_used(&mut self) -> Outcome {
        let mut got = None;
        wait_until(1000, || {
            self.dev.ack_interrupt();
            got = self.q.raw_pop_used();
            got.is_some()
        });
        match got {
            Some((_, len)) => {
                self.used += 1;
                Outcome::Used { len }
            }
            None => Outcome::Nothing,
        }
    }

    /// Runs the chain at `head` whose status byte is at `status`, and
    /// reports `what`.
    fn run(&mut self, ctx: &Ctx, what: &str, head: u16, status: u64) {
        match self.kick(head) {
            Outcome::Used { len } => {
                let st = self.read_status(status);
                ctx.say(format_args!("{}: used len {} status {}", what, len, st));
            }
            Outcome::Nothing => ctx.say(format_args!("{}: no completion", what)),
        }
    }

    fn needs_reset(&self) -> bool {
        self.dev.read(virtio::REG_STATUS) & STATUS_NEEDS_RESET != 0
    }

    /// Waits for DEVICE_NEEDS_RESET (a configuration-change interrupt).
    fn wait_needs_reset(&mut self) -> bool {
        wait_until(1000, || {
            self.dev.ack_interrupt();
            self.needs_reset()
        })
    }
}

type BlkCase = fn(&Ctx, &mut RawBlk);

fn blk_case(case: &[u8]) -> Option<BlkCase> {
    Some(match case {
        b"blk-outside-ram" => blk_outside_ram,
        b"blk-mmio-gap" => blk_mmio_gap,
        b"blk-loop" => blk_loop,
        b"blk-long-chain" => blk_long_chain,
        b"blk-zero-len" => blk_zero_len,
        b"blk-overlap" => blk_overlap,
        b"blk-nested-indirect" => blk_nested_indirect,
        b"blk-lying-len" => blk_lying_len,
        b"blk-avail-jump" => blk_avail_jump,
        _ => return None,
    })
}

/// Takes vda, runs `f` on a raw driver, then re-initialises the device
/// with the normal driver and reads sector 0.
fn with_raw_blk(ctx: &Ctx, devs: &mut Devices, f: BlkCase) -> bool {
    with_dev(ctx, devs, |ctx, dev| match RawBlk::new(dev) {
        Ok(mut raw) => {
            f(ctx, &mut raw);
            ctx.say(format_args!("needs reset {}", raw.needs_reset() as u8));
            raw.dev
        }
        Err((dev, e)) => {
            ctx.say(format_args!("raw driver: {}", e));
            dev
        }
    })
}

/// Takes vda's device, runs `f`, then brings the normal driver up again
/// (which resets the device) and reads sector 0.
fn with_dev(ctx: &Ctx, devs: &mut Devices, f: impl FnOnce(&Ctx, Device) -> Device) -> bool {
    let Some(blk) = devs.disks[0].take() else {
        ctx.say(format_args!("no vda"));
        return true;
    };
    let dev = f(ctx, blk.into_device());
    match Blk::new(dev) {
        Ok(blk) => {
            devs.disks[0] = Some(blk);
            good_read(ctx, devs);
        }
        Err((_, e)) => ctx.say(format_args!("re-init failed: {}", e)),
    }
    true
}

/// Runs `f` with the normal vda driver in place, then reads sector 0.
fn with_blk(ctx: &Ctx, devs: &mut Devices, f: fn(&Ctx, &Device)) -> bool {
    match devs.disks[0].as_ref() {
        Some(blk) => f(ctx, blk.device()),
        None => {
            ctx.say(format_args!("no vda"));
            return true;
        }
    }
    good_read(ctx, devs);
    true
}

fn good_read(ctx: &Ctx, devs: &mut Devices) {
    let Some(blk) = devs.disks[0].as_mut() else { return };
    let buf: &mut [u8; SECTOR] = mem::alloc(SECTOR, 512).try_into().expect("sector buffer");
    let st = blk.read_sector(0, buf);
    ctx.say(format_args!("good read status {} fnv {:016x}", st, fnv1a(buf)));
}

fn blk_outside_ram(ctx: &Ctx, r: &mut RawBlk) {
    let end = ctx.ram_end;
    let data = r.addr(OFF_DATA);
    let steps: [(&str, u64, u64, u64); 4] = [
        ("data outside RAM", 0, end, 0),
        ("data across the end of RAM", 0, end - 256, 0),
        ("header outside RAM", end, data, 0),
        ("status outside RAM", 0, data, end),
    ];
    for (i, (what, hdr, d, st)) in steps.into_iter().enumerate() {
        let hdr = if hdr == 0 { r.header(i, T_IN, 0) } else { hdr };
        let st = if st == 0 { r.status_byte(i) } else { st };
        r.chain3(0, (hdr, 16), (d, 512, F_WRITE), (st, 1));
        r.run(ctx, what, 0, st);
    }
}

fn blk_mmio_gap(ctx: &Ctx, r: &mut RawBlk) {
    let base = r.dev.base() as u64;
    let data = r.addr(OFF_DATA);
    let steps: [(&str, u64, u64, u64); 4] = [
        ("data in the device window", 0, base, 0),
        ("data on the IOAPIC", 0, 0xfec0_0000, 0),
        ("header in the MMIO gap", 0xc000_0000, data, 0),
        ("status on the device status register", 0, data, base + virtio::REG_STATUS as u64),
    ];
    for (i, (what, hdr, d, st)) in steps.into_iter().enumerate() {
        let hdr = if hdr == 0 { r.header(i, T_IN, 0) } else { hdr };
        let st = if st == 0 { r.status_byte(i) } else { st };
        r.chain3(0, (hdr, 16), (d, 512, F_WRITE), (st, 1));
        if st >= 0xc000_0000 {
            // Reading back the status register would not show a status byte.
            match r.kick(0) {
                Outcome::Used { len } => ctx.say(format_args!("{}: used len {}", what, len)),
                Outcome::Nothing => ctx.say(format_args!("{}: no completion", what)),
            }
        } else {
            r.run(ctx, what, 0, st);
        }
    }
    // A descriptor table in the MMIO gap: refused at DRIVER_OK.
    let dev = &r.dev;
    dev.write(virtio::REG_STATUS, 0);
    dev.write(virtio::REG_STATUS, 1);
    dev.write(virtio::REG_STATUS, 3);
    accept_version_1(dev);
    dev.write(virtio::REG_STATUS, 11);
    queue_at(dev, 0, 16, 0xd000_0000, r.addr(OFF_TABLE), r.addr(OFF_TABLE + 0x1000));
    dev.write(virtio::REG_STATUS, 15);
    let nr = r.wait_needs_reset();
    ctx.say(format_args!("descriptor table in the MMIO gap: needs reset {}", nr as u8));
}

/// Accepts VIRTIO_F_VERSION_1 and nothing else.
fn accept_version_1(dev: &Device) {
    dev.write(virtio::REG_DRIVER_FEATURES_SEL, 0);
    dev.write(virtio::REG_DRIVER_FEATURES, 0);
    dev.write(virtio::REG_DRIVER_FEATURES_SEL, 1);
    dev.write(virtio::REG_DRIVER_FEATURES, 1);
}

/// Writes queue `index`'s registers (size and ring addresses) and READY.
fn queue_at(dev: &Device, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
    dev.write(virtio::REG_QUEUE_SEL, index);
    dev.write(virtio::REG_QUEUE_NUM, size);
    for (lo, v) in [
        (virtio::REG_QUEUE_DESC_LOW, desc),
        (virtio::REG_QUEUE_DRIVER_LOW, avail),
        (virtio::REG_QUEUE_DEVICE_LOW, used),
    ] {
        dev.write(lo, v as u32);
        dev.write(lo + 4, (v >> 32) as u32);
    }
    dev.write(virtio::REG_QUEUE_READY, 1);
}

fn blk_loop(ctx: &Ctx, r: &mut RawBlk) {
    let hdr = r.header(0, T_IN, 0);
    let data = r.addr(OFF_DATA);
    r.q.raw_desc(0, hdr, 16, F_NEXT, 1);
    r.q.raw_desc(1, data, 512, F_WRITE | F_NEXT, 0);
    r.run(ctx, "two-descriptor loop", 0, r.addr(OFF_STATUS));
    r.q.raw_desc(2, hdr, 16, F_NEXT, 2);
    r.run(ctx, "self loop", 2, r.addr(OFF_STATUS));
    // A chain through every descriptor of the queue, back to its head.
    for i in 0..RAW_QSIZE {
        let next = (i + 1) % RAW_QSIZE;
        if i == 0 {
            r.q.raw_desc(i, hdr, 16, F_NEXT, next);
        } else {
            r.q.raw_desc(i, data, 512, F_WRITE | F_NEXT, next);
        }
    }
    r.run(ctx, "loop through the whole queue", 0, r.addr(OFF_STATUS));
}

fn blk_long_chain(ctx: &Ctx, r: &mut RawBlk) {
    let data = r.addr(OFF_DATA);
    // 40 descriptors for a 16-entry queue, through an indirect table.
    let st = r.status_byte(0);
    let hdr = r.header(0, T_IN, 0);
    let n = 40;
    r.table_desc(OFF_TABLE, 0, hdr, 16, F_NEXT, 1);
    for i in 1..n - 1 {
        r.table_desc(OFF_TABLE, i, data, 512, F_WRITE | F_NEXT, i as u16 + 1);
    }
    r.table_desc(OFF_TABLE, n - 1, st, 1, F_WRITE, 0);
    r.q.raw_desc(0, r.addr(OFF_TABLE), 16 * n as u32, F_INDIRECT, 0);
    r.run(ctx, "40 descriptors", 0, st);
    // 1100 descriptors: more than the device looks at.
    let st = r.status_byte(1);
    let hdr = r.header(1, T_IN, 0);
    let n = 1100;
    r.table_desc(OFF_TABLE, 0, hdr, 16, F_NEXT, 1);
    for i in 1..n - 1 {
        r.table_desc(OFF_TABLE, i, data, 512, F_WRITE | F_NEXT, i as u16 + 1);
    }
    r.table_desc(OFF_TABLE, n - 1, st, 1, F_WRITE, 0);
    r.q.raw_desc(1, r.addr(OFF_TABLE), 16 * n as u32, F_INDIRECT, 0);
    r.run(ctx, "1100 descriptors", 1, st);
}

fn blk_zero_len(ctx: &Ctx, r: &mut RawBlk) {
    let data = r.addr(OFF_DATA);
    let steps: [(&str, u32, u32, u32); 4] = [
        ("zero-length data", 16, 0, 1),
        ("zero-length header", 0, 512, 1),
        ("zero-length status", 16, 512, 0),
        ("all zero-length", 0, 0, 0),
    ];
    for (i, (what, h, d, s)) in steps.into_iter().enumerate() {
        let hdr = r.header(i, T_IN, 0);
        let st = r.status_byte(i);
        r.chain3(0, (hdr, h), (data, d, F_WRITE), (st, s));
        r.run(ctx, what, 0, st);
    }
}

fn blk_overlap(ctx: &Ctx, r: &mut RawBlk) {
    // Data over its own header and status byte.
    let hdr = r.header(0, T_IN, 0);
    let st = hdr + 100;
    r.chain3(0, (hdr, 16), (hdr, 512, F_WRITE), (st, 1));
    r.run(ctx, "data over its header and status", 0, st);
    // Data over the queue's own descriptor table.
    let (desc, _, _) = r.q.ring_addrs();
    let hdr = r.header(1, T_IN, 0);
    let st = r.status_byte(1);
    r.chain3(3, (hdr, 16), (desc, 512, F_WRITE), (st, 1));
    r.run(ctx, "data over the descriptor table", 3, st);
    // Two data buffers on the same bytes.
    let data = r.addr(OFF_DATA);
    let hdr = r.header(2, T_IN, 0);
    let st = r.status_byte(2);
    r.q.raw_desc(6, hdr, 16, F_NEXT, 7);
    r.q.raw_desc(7, data, 512, F_WRITE | F_NEXT, 8);
    r.q.raw_desc(8, data, 512, F_WRITE | F_NEXT, 9);
    r.q.raw_desc(9, st, 1, F_WRITE, 0);
    r.run(ctx, "two data buffers on the same bytes", 6, st);
}

fn blk_nested_indirect(ctx: &Ctx, r: &mut RawBlk) {
    let data = r.addr(OFF_DATA);
    let hdr = r.header(0, T_IN, 0);
    let st = r.status_byte(0);
    let (t1, t2) = (OFF_TABLE, OFF_TABLE + 0x100);
    r.table_desc(t1, 0, hdr, 16, F_NEXT, 1);
    r.table_desc(t1, 1, r.addr(t2), 32, F_INDIRECT, 0);
    r.table_desc(t2, 0, data, 512, F_WRITE | F_NEXT, 1);
    r.table_desc(t2, 1, st, 1, F_WRITE, 0);
    r.q.raw_desc(0, r.addr(t1), 32, F_INDIRECT, 0);
    r.run(ctx, "indirect inside indirect", 0, st);
    // A table whose length is not a whole number of descriptors.
    let t3 = OFF_TABLE + 0x200;
    r.table_desc(t3, 0, hdr, 16, F_NEXT, 1);
    r.table_desc(t3, 1, data, 512, F_WRITE | F_NEXT, 2);
    r.table_desc(t3, 2, st, 1, F_WRITE, 0);
    r.q.raw_desc(1, r.addr(t3), 40, F_INDIRECT, 0);
    r.run(ctx, "indirect table of 40 bytes", 1, st);
}

fn blk_lying_len(ctx: &Ctx, r: &mut RawBlk) {
    let data = r.addr(OFF_DATA);
    let steps: [(&str, u32, u32, u64); 4] = [
        ("data length 4 GiB - 512", 16, 0xffff_fe00, 0),
        ("data length 100", 16, 100, 0),
        ("header length 8", 8, 512, 0),
        ("sector past the end", 16, 512, u64::MAX / 512),
    ];
    for (i, (what, h, d, sector)) in steps.into_iter().enumerate() {
        let hdr = r.header(i, T_IN, sector);
        let st = r.status_byte(i);
        r.chain3(0, (hdr, h), (data, d, F_WRITE), (st, 1));
        r.run(ctx, what, 0, st);
    }
    // Lengths that add up past 4 GiB.
    let hdr = r.header(4, T_IN, 0);
    let st = r.status_byte(4);
    r.q.raw_desc(0, hdr, 16, F_NEXT, 1);
    r.q.raw_desc(1, data, 0xffff_0000, F_WRITE | F_NEXT, 2);
    r.q.raw_desc(2, data, 0x2_0000, F_WRITE | F_NEXT, 3);
    r.q.raw_desc(3, st, 1, F_WRITE, 0);
    r.run(ctx, "lengths adding up past 4 GiB", 0, st);
}

/// Reads that land on our own available ring: with the test's rootfs,
/// sector s re-publishes the request (idx = s + 2) and points its header
/// (at +64) at sector s + 1, round a 65536-sector cycle, so the device
/// keeps serving with no guest CPU. Meanwhile the event loop must still
/// serve vsock, and a device reset must get through.
fn self_refill(ctx: &Ctx, dev: Device, vs: Option<&mut Vsock>) -> Device {
    let mut r = match RawBlk::new(dev) {
        Ok(r) => r,
        Err((dev, e)) => {
            ctx.say(format_args!("raw driver: {}", e));
            return dev;
        }
    };
    let (_, avail, used) = r.q.ring_addrs();
    let hdr = avail + 64;
    // SAFETY: the avail ring's page is ours; 64..80 is past the ring.
    unsafe {
        core::ptr::write_unaligned(hdr as *mut u32, T_IN);
        core::ptr::write_unaligned((hdr + 8) as *mut u64, 0);
    }
    let st = r.status_byte(0);
    r.chain3(0, (hdr, 16), (avail, 512, F_WRITE), (st, 1));
    r.q.raw_publish(0);
    r.q.notify();
    let used_idx = || {
        // SAFETY: the used ring's idx field (second u16) of our own queue.
        unsafe { core::ptr::read_volatile((used as *const u16).add(1)) }
    };
    wait_until(200, || false);
    let a = used_idx();
    wait_until(100, || false);
    let b = used_idx();
    ctx.say(format_args!("still serving: {}", (a != b) as u8));
    if let Some(vs) = vs {
        let mut v = RawVsock { ctx, vs, next_port: RAW_PORTS.start };
        let h = v.hdr(0, 4444, vsock::OP_REQUEST, 0);
        v.probe("vsock meanwhile", false, h, vsock::HDR_LEN, None);
    }
    r.dev.write(virtio::REG_STATUS, 0);
    ctx.say(format_args!("reset: status {:#x}", r.dev.read(virtio::REG_STATUS)));
    r.dev
}

/// A request that arrives while the device is already looking at the
/// queue: at DRIVER_OK the device checks for requests made available
/// before it, and the driver's first read goes in meanwhile. One that shows
/// up between two of the device's reads of the available index is new
/// work, not a corrupt ring. 2000 re-initialisations, each followed at
/// once by a read: every read must come back.
fn blk_race(ctx: &Ctx, mut dev: Device) -> Device {
    const ROUNDS: u32 = 2000;
    let buf: &mut [u8; SECTOR] = mem::alloc(SECTOR, 512).try_into().expect("sector buffer");
    let mut answered = 0;
    for round in 0..ROUNDS {
        let heap = mem::mark();
        let mut blk = match Blk::new(dev) {
            Ok(blk) => blk,
            Err((d, e)) => {
                ctx.say(format_args!("round {round}: init failed: {e}"));
                return d;
            }
        };
        match blk.read_sector_within(0, buf, 1000) {
            Some(0) => answered += 1,
            Some(st) => ctx.say(format_args!("round {round}: status {st}")),
            None => ctx.say(format_args!("round {round}: no completion")),
        }
        dev = blk.into_device();
        // SAFETY: the driver and its rings are gone; `Blk::new` resets the
        // device before it allocates rings again.
        unsafe { mem::release(heap) };
    }
    ctx.say(format_args!("reads right after DRIVER_OK answered: {answered} of {ROUNDS}"));
    dev
}

fn blk_avail_jump(ctx: &Ctx, r: &mut RawBlk) {
    let hdr = r.header(0, T_IN, 0);
    let st = r.status_byte(0);
    r.chain3(0, (hdr, 16), (r.addr(OFF_DATA), 512, F_WRITE), (st, 1));
    // A head index past the queue: skipped, never returned.
    match r.kick(200) {
        Outcome::Used { len } => ctx.say(format_args!("head 200: used len {}", len)),
        Outcome::Nothing => ctx.say(format_args!("head 200: no completion")),
    }
    r.run(ctx, "good request after head 200", 0, st);
    // The available index jumps 1000 entries ahead.
    let (_, avail, _) = r.q.ring_addrs();
    // SAFETY: the avail ring's idx field (second u16) of our own queue.
    let idx = unsafe { core::ptr::read_volatile((avail as *const u16).add(1)) };
    r.q.raw_set_avail_idx(idx.wrapping_add(1000));
    r.q.notify();
    let nr = r.wait_needs_reset();
    ctx.say(format_args!("avail index +1000: needs reset {}", nr as u8));
}

// ---- Registers ----------------------------------------------------------------

fn mmio_unknown(ctx: &Ctx, dev: &Device) {
    let base = dev.base();
    let before = dev.read(virtio::REG_STATUS);
    // Unknown and read-only registers, config space past its end.
    for (off, v) in [(0x0e0, 1), (0x0f8, 1), (0x0c0, 1), (0x0b0, 1), (0x000, 0), (0x008, 99), (0x140, 7), (0xffc, 7)] {
        dev.write(off, v);
    }
    // Narrow, wide and unaligned accesses.
    // SAFETY: MMIO writes into the device's own register window; each is
    // one of the odd accesses the transport must ignore.
    unsafe {
        core::ptr::write_volatile((base + virtio::REG_STATUS) as *mut u8, 0);
        core::ptr::write_volatile((base + virtio::REG_QUEUE_NOTIFY) as *mut u16, 0);
        core::ptr::write_volatile((base + virtio::REG_QUEUE_DESC_LOW) as *mut u64, 0x1000);
        core::ptr::write_unaligned((base + 0x071) as *mut u32, 0);
    }
    // Absent queues, queue registers while running.
    dev.write(virtio::REG_QUEUE_NOTIFY, 5);
    dev.write(virtio::REG_QUEUE_SEL, 7);
    dev.write(virtio::REG_QUEUE_READY, 1);
    dev.write(virtio::REG_QUEUE_SEL, 0);
    dev.write(virtio::REG_QUEUE_NUM, 3);
    let wo = dev.read(virtio::REG_QUEUE_NOTIFY);
    let unknown = dev.read(0x0e0);
    // Nothing at all: an empty virtio-mmio slot and the MMIO gap.
    io::mmio_write32(0xd000_3000 + virtio::REG_STATUS, 1);
    io::mmio_write32(0xc000_0000, 1);
    let empty = io::mmio_read32(0xd000_3000);
    let gap = io::mmio_read32(0xc000_0000);
    ctx.say(format_args!(
        "reads: write-only {:#x} unknown {:#x} empty slot {:#x} gap {:#x}",
        wo, unknown, empty, gap
    ));
    ctx.say(format_args!(
        "after: status {:#x} (before {:#x}) magic {:#x} device {}",
        dev.read(virtio::REG_STATUS),
        before,
        dev.read(virtio::REG_MAGIC),
        dev.read(virtio::REG_DEVICE_ID)
    ));
}

fn mmio_state(ctx: &Ctx, dev: Device) -> Device {
    let st = |dev: &Device| dev.read(virtio::REG_STATUS);
    // DRIVER_OK straight after ACKNOWLEDGE.
    dev.write(virtio::REG_STATUS, 0);
    dev.write(virtio::REG_STATUS, 1);
    dev.write(virtio::REG_STATUS, 1 | 4);
    ctx.say(format_args!("DRIVER_OK before DRIVER: status {:#x}", st(&dev)));
    // Features the device did not offer (bit 28, INDIRECT_DESC).
    dev.write(virtio::REG_STATUS, 3);
    dev.write(virtio::REG_DRIVER_FEATURES_SEL, 0);
    dev.write(virtio::REG_DRIVER_FEATURES, 1 << 28);
    dev.write(virtio::REG_DRIVER_FEATURES_SEL, 1);
    dev.write(virtio::REG_DRIVER_FEATURES, 1);
    dev.write(virtio::REG_STATUS, 11);
    ctx.say(format_args!("unoffered feature: status {:#x}", st(&dev)));
    // No VIRTIO_F_VERSION_1.
    dev.write(virtio::REG_STATUS, 0);
    dev.write(virtio::REG_STATUS, 1);
    dev.write(virtio::REG_STATUS, 3);
    dev.write(virtio::REG_DRIVER_FEATURES_SEL, 0);
    dev.write(virtio::REG_DRIVER_FEATURES, 1 << 5);
    dev.write(virtio::REG_STATUS, 11);
    ctx.say(format_args!("no VERSION_1: status {:#x}", st(&dev)));
    // A queue size that is not a power of two, then DRIVER_OK.
    let ring = mem::alloc_zeroed(0x3000, 4096).as_mut_ptr() as u64;
    dev.write(virtio::REG_STATUS, 0);
    dev.write(virtio::REG_STATUS, 1);
    dev.write(virtio::REG_STATUS, 3);
    accept_version_1(&dev);
    dev.write(virtio::REG_STATUS, 11);
    queue_at(&dev, 0, 3, ring, ring + 0x1000, ring + 0x2000);
    dev.write(virtio::REG_STATUS, 15);
    ctx.say(format_args!("queue size 3: status {:#x}", st(&dev)));
    // Queue registers after DRIVER_OK, then FAILED and more writes.
    dev.write(virtio::REG_QUEUE_NUM, 16);
    dev.write(virtio::REG_STATUS, 15 | 128);
    dev.write(virtio::REG_STATUS, 1);
    ctx.say(format_args!("after FAILED: status {:#x}", st(&dev)));
    dev
}

// ---- vsock ----------------------------------------------------------------------

struct RawVsock<'a> {
    ctx: &'a Ctx<'a>,
    vs: &'a mut Vsock,
    next_port: u32,
}

impl RawVsock<'_> {
    fn pump(&mut self) {
        self.vs.poll();
        self.vs.flush();
    }

    fn port(&mut self) -> u32 {
        let p = self.next_port;
        self.next_port += 1;
        p
    }

    /// A stream header from our `local` port to the host's `peer` port.
    fn hdr(&self, local: u32, peer: u32, op: u16, len: u32) -> Hdr {
        Hdr {
            src_cid: self.vs.cid,
            dst_cid: vsock::HOST_CID,
            src_port: local,
            dst_port: peer,
            len,
            kind: vsock::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 << 10,
            fwd_cnt: 0,
        }
    }

    /// Sends one raw packet, waiting for a tx slot if need be.
    fn send(&mut self, h: &Hdr, hdr_len: usize, data: Option<Buf>) -> bool {
        let mut sent = false;
        let vs = &mut *self.vs;
        wait_until(2000, || {
            vs.poll();
            sent = vs.send_raw(h, hdr_len, data);
            sent
        });
        sent
    }

    /// Waits until a packet with op `op` for port `port` arrives (any
    /// port when `port` is 0); returns whether one did.
    fn expect(&mut self, op: u16, port: u32) -> bool {
        let before = self.vs.raw_seen[usize::from(op)];
        let vs = &mut *self.vs;
        wait_until(2000, || {
            vs.poll();
            vs.flush();
            vs.raw_seen[usize::from(op)] != before && (port == 0 || vs.raw_last.dst_port == port)
        })
    }

    /// What came back for `port`: "rst", "response", "credit update", or
    /// "nothing".
    fn answer(&mut self, port: u32) -> &'static str {
        let before = self.vs.raw_seen;
        let vs = &mut *self.vs;
        wait_until(1000, || {
            vs.poll();
            vs.flush();
            vs.raw_seen != before && vs.raw_last.dst_port == port
        });
        if self.vs.raw_seen == before || self.vs.raw_last.dst_port != port {
            return "nothing";
        }
        match self.vs.raw_last.op {
            vsock::OP_RST => "rst",
            vsock::OP_RESPONSE => "response",
            vsock::OP_CREDIT_UPDATE => "credit update",
            vsock::OP_CREDIT_REQUEST => "credit request",
            _ => "other",
        }
    }

    /// Connects a raw port to the hostile host port; returns the port if
    /// the host answered RESPONSE.
    fn connect(&mut self) -> Option<u32> {
        let p = self.port();
        let h = self.hdr(p, HOSTILE_PORT, vsock::OP_REQUEST, 0);
        self.send(&h, vsock::HDR_LEN, None);
        match self.answer(p) {
            "response" => Some(p),
            other => {
                self.ctx.say(format_args!("connect from {}: {}", p, other));
                None
            }
        }
    }

    /// Sends `h` (from a fresh connection when `connected`) and reports
    /// what came back.
    fn probe(&mut self, what: &str, connected: bool, mut h: Hdr, hdr_len: usize, data: Option<Buf>) {
        let port = if connected {
            match self.connect() {
                Some(p) => p,
                None => return,
            }
        } else {
            self.port()
        };
        h.src_port = port;
        self.send(&h, hdr_len, data);
        let a = self.answer(port);
        self.ctx.say(format_args!("{}: {}", what, a));
    }

    fn bad_len(&mut self) {
        let h = self.hdr(0, HOSTILE_PORT, vsock::OP_RW, 100);
        self.probe("rw with less data than its length", true, h, vsock::HDR_LEN, Some(Vsock::raw_data(10, b'a')));
        let h = self.hdr(0, HOSTILE_PORT, vsock::OP_RW, 1 << 20);
        self.probe("rw of 1 MiB", true, h, vsock::HDR_LEN, Some(Vsock::raw_data(16 << 10, b'b')));
        let end = self.ctx.ram_end;
        let h = self.hdr(0, HOSTILE_PORT, vsock::OP_RW, 100);
        self.probe("rw data outside RAM", true, h, vsock::HDR_LEN, Some(Buf { addr: end, len: 100, write: false }));
        let h = self.hdr(0, HOSTILE_PORT, vsock::OP_RW, 100);
        self.probe("rw data in the MMIO gap", true, h, vsock::HDR_LEN, Some(Buf { addr: 0xd000_2000, len: 100, write: false }));
        // A 20-byte header: dropped without an answer. A REQUEST to a port
        // without a listener after it shows the device went on.
        let h = self.hdr(0, HOSTILE_PORT, vsock::OP_REQUEST, 0);
        self.probe("20-byte header", false, h, 20, None);
        let h = self.hdr(0, 4444, vsock::OP_REQUEST, 0);
        self.probe("then a request to a closed port", false, h, vsock::HDR_LEN, None);
    }

    fn bad_op(&mut self) {
        for (what, op) in [("op 99", 99u16), ("op 0", 0), ("response on an open connection", vsock::OP_RESPONSE)] {
            let h = self.hdr(0, HOSTILE_PORT, op, 0);
            self.probe(what, true, h, vsock::HDR_LEN, None);
        }
        let mut h = self.hdr(0, HOSTILE_PORT, vsock::OP_REQUEST, 0);
        h.kind = 3;
        self.probe("seqpacket request", false, h, vsock::HDR_LEN, None);
        let h = self.hdr(0, HOSTILE_PORT, vsock::OP_RW, 0);
        self.probe("rw without a connection", false, h, vsock::HDR_LEN, None);
        let h = self.hdr(0, HOSTILE_PORT, vsock::OP_SHUTDOWN, 0);
        self.probe("shutdown without a connection", false, h, vsock::HDR_LEN, None);
    }

    fn bad_port(&mut self) {
        let h = self.hdr(0, 4444, vsock::OP_REQUEST, 0);
        self.probe("request to a port without a listener", false, h, vsock::HDR_LEN, None);
        let h = self.hdr(0, u32::MAX, vsock::OP_REQUEST, 0);
        self.probe("request to port 0xffffffff", false, h, vsock::HDR_LEN, None);
        let mut h = self.hdr(0, HOSTILE_PORT, vsock::OP_REQUEST, 0);
        h.src_cid = vsock::HOST_CID;
        self.probe("request claiming to come from the host", false, h, vsock::HDR_LEN, None);
        let mut h = self.hdr(0, HOSTILE_PORT, vsock::OP_REQUEST, 0);
        h.dst_cid = 101;
        self.probe("request to another VM", false, h, vsock::HDR_LEN, None);
        let mut h = self.hdr(0, HOSTILE_PORT, vsock::OP_REQUEST, 0);
        h.dst_cid = 1;
        self.probe("request to the local CID", false, h, vsock::HDR_LEN, None);
    }

    fn bad_credit(&mut self) {
        // Data past the host's credit to a host that does not read.
        if let Some(p) = self.connect() {
            let before = self.vs.raw_seen[usize::from(vsock::OP_RST)];
            let mut sent = 0usize;
            let mut got_rst = false;
            while sent < (4 << 20) {
                let h = self.hdr(p, HOSTILE_PORT, vsock::OP_RW, vsock::TX_BUF_SIZE as u32);
                if !self.send(&h, vsock::HDR_LEN, Some(Vsock::raw_data(vsock::TX_BUF_SIZE, b'c'))) {
                    break;
                }
                sent += vsock::TX_BUF_SIZE;
                self.pump();
                if self.vs.raw_seen[usize::from(vsock::OP_RST)] != before && self.vs.raw_last.dst_port == p {
                    got_rst = true;
                    break;
                }
            }
            if !got_rst {
                got_rst = self.expect(vsock::OP_RST, p);
            }
            self.ctx.say(format_args!(
                "data past the credit: {} after {} KiB",
                if got_rst { "rst" } else { "nothing" },
                sent >> 10
            ));
        }
        // Nonsense credit fields: the host must keep serving.
        if let Some(p) = self.connect() {
            let mut h = self.hdr(p, HOSTILE_PORT, vsock::OP_CREDIT_UPDATE, 0);
            h.buf_alloc = u32::MAX;
            h.fwd_cnt = 0x7fff_ffff;
            self.send(&h, vsock::HDR_LEN, None);
            let h = self.hdr(p, HOSTILE_PORT, vsock::OP_CREDIT_REQUEST, 0);
            self.send(&h, vsock::HDR_LEN, None);
            let a = self.answer(p);
            self.ctx.say(format_args!("credit request after a bogus credit update: {}", a));
            let h = self.hdr(p, HOSTILE_PORT, vsock::OP_RST, 0);
            self.send(&h, vsock::HDR_LEN, None);
        }
    }

    fn flood(&mut self) {
        const N: u32 = 2000;
        let first = self.next_port;
        let rst0 = self.vs.raw_seen[usize::from(vsock::OP_RST)];
        let resp0 = self.vs.raw_seen[usize::from(vsock::OP_RESPONSE)];
        let mut sent = 0;
        for _ in 0..N {
            let p = self.port();
            let h = self.hdr(p, HOSTILE_PORT, vsock::OP_REQUEST, 0);
            if !self.send(&h, vsock::HDR_LEN, None) {
                break;
            }
            sent += 1;
        }
        let answered = |vs: &Vsock| {
            vs.raw_seen[usize::from(vsock::OP_RST)] - rst0 + vs.raw_seen[usize::from(vsock::OP_RESPONSE)] - resp0
        };
        for _ in 0..5 {
            let vs = &mut *self.vs;
            if wait_until(2000, || {
                vs.poll();
                vs.flush();
                answered(vs) >= sent
            }) {
                break;
            }
        }
        let rsts = self.vs.raw_seen[usize::from(vsock::OP_RST)] - rst0;
        let resps = self.vs.raw_seen[usize::from(vsock::OP_RESPONSE)] - resp0;
        self.ctx.say(format_args!("{} requests: {} responses {} rsts", sent, resps, rsts));
        // Close everything we opened.
        for p in first..first + sent {
            let h = self.hdr(p, HOSTILE_PORT, vsock::OP_RST, 0);
            if !self.send(&h, vsock::HDR_LEN, None) {
                break;
            }
        }
        self.pump();
    }
}
