//! Block devices at boot: probing, the `testguest.diskcheck=1` report and
//! the `testguest.readbench=` benchmark.

use crate::blk::{Blk, SECTOR, T_OUT};
use crate::cmdline::Options;
use crate::manifest::Manifest;
use crate::util::fnv1a;
use crate::virtio::{Device, DEVICE_BLOCK, DEVICE_NET, DEVICE_VSOCK};
use crate::{io, mem, println, serial};

pub const MAX_DISKS: usize = 4;

/// The devices from the command line, in order: block devices become vda,
/// vdb, ...; the first vsock device is kept for the agent, the first
/// network card for `testguest.net=1`.
pub struct Devices {
    pub disks: [Option<Blk>; MAX_DISKS],
    pub vsock: Option<Device>,
    /// The first network card, for `testguest.net=1`.
    pub net: Option<Device>,
}

pub fn disk_name(i: usize) -> [u8; 3] {
    [b'v', b'd', b'a' + i as u8]
}

fn name_str(n: &[u8; 3]) -> &str {
    core::str::from_utf8(n).unwrap_or("vd?")
}

pub fn probe(opts: &Options) -> Devices {
    let mut devs = Devices { disks: [None, None, None, None], vsock: None, net: None };
    let mut ndisks = 0;
    for spec in opts.devices.iter().flatten() {
        let dev = match Device::probe(spec) {
            Ok(d) => d,
            Err(e) => {
                println!("testguest: virtio-mmio at {:#x}: {}", spec.base, e);
                continue;
            }
        };
        match dev.device_id {
            DEVICE_BLOCK if ndisks < MAX_DISKS => {
                let name = disk_name(ndisks);
                ndisks += 1;
                match Blk::new(dev) {
                    Ok(b) => devs.disks[ndisks - 1] = Some(b),
                    Err((_, e)) => println!("testguest: {}: {}", name_str(&name), e),
                }
            }
            DEVICE_VSOCK if devs.vsock.is_none() => devs.vsock = Some(dev),
            DEVICE_NET if devs.net.is_none() => devs.net = Some(dev),
            id => println!("testguest: virtio-mmio at {:#x}: device id {} ignored", spec.base, id),
        }
    }
    devs
}

fn fnv_of_sector(blk: &mut Blk, sector: u64, buf: &mut [u8; SECTOR]) -> Result<u64, u8> {
    match blk.read_sector(sector, buf) {
        0 => Ok(fnv1a(buf)),
        s => Err(s),
    }
}

/// The `testguest.diskcheck=1` report for one disk (index 1 = vdb = appfs
/// also prints its manifest).
pub fn check(index: usize, blk: &mut Blk) {
    let name = disk_name(index);
    let name = name_str(&name);
    let mut id = [0u8; 20];
    let id_status = blk.get_id(&mut id);
    {
        let mut c = serial::lock();
        let _ = core::fmt::Write::write_fmt(
            &mut c,
            format_args!("testguest: {}: sectors {} ro {} id ", name, blk.capacity, blk.ro as u8),
        );
        if id_status == 0 {
            let n = id.iter().position(|&b| b == 0).unwrap_or(id.len());
            c.write_bytes(&id[..n]);
        } else {
            let _ = core::fmt::Write::write_fmt(&mut c, format_args!("(error {})", id_status));
        }
        c.write_bytes(b"\n");
    }
    let buf: &mut [u8; SECTOR] = mem::alloc(SECTOR, 512).try_into().expect("sector buffer");
    let mut first = [0u8; SECTOR];
    if blk.capacity > 0 {
        let cap = blk.capacity;
        let r = (|| -> Result<(u64, u64, u64), u8> {
            let a = fnv_of_sector(blk, 0, buf)?;
            first.copy_from_slice(buf);
            let b = fnv_of_sector(blk, cap / 2, buf)?;
            let c = fnv_of_sector(blk, cap - 1, buf)?;
            Ok((a, b, c))
        })();
        match r {
            Ok((a, b, c)) => println!("testguest: {}: fnv first {:016x} middle {:016x} last {:016x}", name, a, b, c),
            Err(s) => println!("testguest: {}: read error status {}", name, s),
        }
    }
    buf.fill(0xaa);
    let st = blk.request(T_OUT, 0, buf.as_mut_ptr(), SECTOR, false);
    println!("testguest: {}: write status {}", name, st);
    if index == 1 {
        let m = Manifest::from_sector(&first);
        if blk.capacity == 0 || m.is_empty() {
            println!("testguest: appfs: empty");
        } else {
            for line in m.lines() {
                let mut c = serial::lock();
                c.write_bytes(b"testguest: manifest: ");
                c.write_bytes(line);
                c.write_bytes(b"\n");
            }
        }
    }
}

/// `testguest.readbench=<name>`.
pub fn readbench(devs: &mut Devices, which: &[u8]) {
    let idx = (0..MAX_DISKS).find(|&i| disk_name(i) == which);
    let Some(blk) = idx.and_then(|i| devs.disks[i].as_mut()) else {
        let mut c = serial::lock();
        c.write_bytes(b"testguest: readbench: no disk ");
        c.write_bytes(which);
        c.write_bytes(b"\n");
        return;
    };
    let name = disk_name(idx.unwrap_or(0));
    io::control(io::CONTROL_TIMESTAMP);
    let r = blk.readbench();
    io::control(io::CONTROL_TIMESTAMP);
    match r {
        Ok((bytes, fnv)) => println!("testguest: readbench {} bytes {} fnv {:016x}", name_str(&name), bytes, fnv),
        Err((sector, st)) => println!("testguest: readbench {} error status {} at sector {}", name_str(&name), st, sector),
    }
}

/// Manifest `preload=<KiB>`: reads the first KiB of the appfs (at most the
/// whole disk) into a fresh buffer, as an app loading its files, and
/// prints `testguest: preload <bytes> bytes`. The guest never touches the
/// buffer itself: only the device writes those pages, so a diff snapshot
/// holds them only if the VMM tracks its own writes.
pub fn preload(appfs: &mut Blk, kib: u64) {
    const CHUNK: usize = 64 << 10;
    let bytes = (kib.saturating_mul(1024)).min(appfs.capacity * SECTOR as u64) as usize;
    let buf = mem::alloc(bytes.max(1), 4096).as_mut_ptr();
    for at in (0..bytes).step_by(CHUNK) {
        let n = (bytes - at).min(CHUNK);
        // SAFETY: at + n <= bytes, the length of the buffer.
        let st = appfs.request(crate::blk::T_IN, (at / SECTOR) as u64, unsafe { buf.add(at) }, n, true);
        if st != 0 {
            println!("testguest: preload error status {} at byte {}", st, at);
            return;
        }
    }
    println!("testguest: preload {} bytes", bytes);
}
