//! virtio-net driver for the host's network tests (`testguest.net=1`):
//! one receive and one transmit queue, `VERSION_1` and `MAC`, one buffer
//! per frame. It sends one test frame, then echoes the first test frame it
//! receives (ethertype 0x88b5, IEEE 802 local experimental), prefixed with
//! `echo: `. Other frames (the host kernel's own) are given back unread.
//! With `testguest.net=hostile` it first sends malformed tx chains (each
//! holding a test frame saying `must not be sent`), reports the used
//! length the device gave each, breaks the tx ring's index, reports
//! DEVICE_NEEDS_RESET, and re-initialises the card before the exchange.

use crate::virtio::{wait_until, Buf, Device, VirtQueue, REG_CONFIG, REG_STATUS};
use crate::{mem, println, serial};

const F_MAC: u64 = 1 << 5;
/// virtio 1.x `virtio_net_hdr` with `num_buffers`.
const HDR: usize = 12;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const RX_BUFS: usize = 8;
/// A 1500-byte MTU frame and the header fit.
const BUF_LEN: usize = 2048;
/// How long to wait for the host's frame, in 4 s steps.
const WAIT_STEPS: usize = 8;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const STATUS_NEEDS_RESET: u32 = 64;
/// Far above any test VM's RAM.
const OUTSIDE_RAM: u64 = 1 << 40;

struct Net {
    dev: Device,
    rx: VirtQueue,
    tx: VirtQueue,
    mac: [u8; 6],
    rx_bufs: &'static mut [u8],
    /// rx head id -> buffer index.
    head_buf: [usize; 256],
    tx_buf: &'static mut [u8],
}

impl Net {
    fn new(mut dev: Device) -> Result<Net, &'static str> {
        dev.init(F_MAC)?;
        if dev.features & F_MAC == 0 {
            return Err("device offers no MAC");
        }
        let rx = dev.setup_queue(0, RX_BUFS as u16)?;
        let tx = dev.setup_queue(1, 4)?;
        let lo = dev.read(REG_CONFIG).to_le_bytes();
        let hi = dev.read(REG_CONFIG + 4).to_le_bytes();
        let mac = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]];
        dev.driver_ok();
        let mut net = Net {
            dev,
            rx,
            tx,
            mac,
            rx_bufs: mem::alloc_zeroed(RX_BUFS * BUF_LEN, 64),
            head_buf: [0; 256],
            tx_buf: mem::alloc_zeroed(BUF_LEN, 64),
        };
        for i in 0..RX_BUFS {
            net.post(i);
        }
        net.rx.notify();
        Ok(net)
    }

    fn post(&mut self, i: usize) {
        let b = &mut self.rx_bufs[i * BUF_LEN..(i + 1) * BUF_LEN];
        if let Some(head) = self.rx.add(&[Buf::inp(b.as_mut_ptr(), BUF_LEN)]) {
            self.head_buf[usize::from(head)] = i;
        }
    }

    /// Writes a broadcast test frame carrying `parts` into the tx buffer;
    /// returns its length, header included.
    fn frame(&mut self, parts: &[&[u8]]) -> usize {
        let b = &mut *self.tx_buf;
        b[..HDR].fill(0);
        b[HDR..HDR + 6].fill(0xff);
        b[HDR + 6..HDR + 12].copy_from_slice(&self.mac);
        b[HDR + 12..HDR + 14].copy_from_slice(&ETHERTYPE);
        let mut len = HDR + 14;
        for p in parts {
            let n = p.len().min(BUF_LEN - len);
            b[len..len + n].copy_from_slice(&p[..n]);
            len += n;
        }
        len
    }

    /// Sends a broadcast test frame carrying `parts` and waits until the
    /// device returns it.
    fn send(&mut self, parts: &[&[u8]]) -> bool {
        let len = self.frame(parts);
        let b = &*self.tx_buf;
        if self.tx.add(&[Buf::out(b.as_ptr(), len)]).is_none() {
            return false;
        }
        self.tx.notify();
        let (dev, tx) = (&mut self.dev, &mut self.tx);
        wait_until(4000, || {
            dev.ack_interrupt();
            tx.pop_used().is_some()
        })
    }

    /// The payload length of the first test frame received, in its buffer.
    fn receive(&mut self) -> Option<(usize, usize)> {
        self.dev.ack_interrupt();
        while let Some((head, len)) = self.rx.pop_used() {
            let i = self.head_buf[usize::from(head)];
            let len = (len as usize).min(BUF_LEN);
            let f = &self.rx_bufs[i * BUF_LEN..i * BUF_LEN + len];
            if len >= HDR + 14 && f[HDR + 12..HDR + 14] == ETHERTYPE {
                return Some((i, len - HDR - 14));
            }
            self.post(i);
            self.rx.notify();
        }
        None
    }
}

/// Publishes one raw tx chain (descriptors 0.. as given) and reports the
/// used length the device returns.
fn hostile_chain(net: &mut Net, name: &str, descs: &[(u64, u32, u16, u16)]) {
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        net.tx.raw_desc(i as u16, addr, len, flags, next);
    }
    net.tx.raw_publish(0);
    net.tx.notify();
    let (dev, tx) = (&mut net.dev, &mut net.tx);
    let mut used = None;
    wait_until(2000, || {
        dev.ack_interrupt();
        used = tx.raw_pop_used();
        used.is_some()
    });
    match used {
        Some((id, len)) => println!("testguest: net: hostile {}: used id {} len {}", name, id, len),
        None => println!("testguest: net: hostile {}: no answer", name),
    }
}

/// Malformed tx chains, then a corrupt available index; gives the device
/// back for a fresh start.
fn hostile(mut net: Net) -> Device {
    let len = net.frame(&[b"must not be sent"]) as u32;
    let buf = net.tx_buf.as_ptr() as u64;
    hostile_chain(&mut net, "short", &[(buf, 8, 0, 0)]);
    hostile_chain(&mut net, "writable", &[(buf, len, DESC_F_WRITE, 0)]);
    hostile_chain(&mut net, "outside", &[(OUTSIDE_RAM, len, 0, 0)]);
    hostile_chain(&mut net, "oversize", &[(buf, 65536, DESC_F_NEXT, 1), (buf, 64, 0, 0)]);
    hostile_chain(&mut net, "loop", &[(buf, len, DESC_F_NEXT, 1), (buf, len, DESC_F_NEXT, 0)]);
    hostile_chain(&mut net, "bad-next", &[(buf, len, DESC_F_NEXT, 200)]);
    let idx = net.tx.size().wrapping_mul(3);
    net.tx.raw_set_avail_idx(idx);
    net.tx.notify();
    let dev = &mut net.dev;
    let broken = wait_until(2000, || dev.read(REG_STATUS) & STATUS_NEEDS_RESET != 0);
    println!("testguest: net: needs reset {}", broken as u8);
    net.dev
}

/// The `testguest.net=1` exchange, reported on the serial console.
pub fn exchange(dev: Device, hostile_first: bool) {
    let mut net = match Net::new(dev) {
        Ok(n) => n,
        Err(e) => return println!("testguest: net: {}", e),
    };
    if hostile_first {
        net = match Net::new(hostile(net)) {
            Ok(n) => n,
            Err(e) => return println!("testguest: net: after the hostile cases: {}", e),
        };
    }
    let m = net.mac;
    println!("testguest: net: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
    if !net.send(&[b"hello from testguest"]) {
        return println!("testguest: net: the frame was not sent");
    }
    println!("testguest: net: sent");
    let mut got = None;
    for _ in 0..WAIT_STEPS {
        if wait_until(4000, || {
            got = net.receive();
            got.is_some()
        }) {
            break;
        }
    }
    let Some((i, n)) = got else {
        return println!("testguest: net: nothing received");
    };
    // The echo, built before the buffer goes back to the device.
    let start = i * BUF_LEN + HDR + 14;
    let echo = mem::alloc(n + 6, 1);
    echo[..6].copy_from_slice(b"echo: ");
    echo[6..].copy_from_slice(&net.rx_bufs[start..start + n]);
    {
        let mut c = serial::lock();
        let _ = core::fmt::Write::write_fmt(&mut c, format_args!("testguest: net: received {} bytes: ", n));
        c.write_bytes(&echo[6..]);
        c.write_bytes(b"\n");
    }
    net.post(i);
    net.rx.notify();
    if net.send(&[echo]) {
        println!("testguest: net: echoed");
    }
}
