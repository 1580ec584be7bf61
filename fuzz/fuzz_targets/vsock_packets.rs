//! vsock packet handling: the device's tx/rx/event queues over a
//! guest-memory image, a host listener on port 1234 whose accepted streams
//! the input can write to and close, host clients of the device's own
//! listener (`CONNECT <port>` lines), backend processing, transport resets
//! and device resets, in any order.
//!
//! Control stream after the memory image: `flags` (bit 0: at most two
//! connections), then for the rx, tx and event queue `size: u16`, `desc`,
//! `avail`, `used: u64`; then operations (one byte each, `op % 10`, some
//! with arguments), see `Op`.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use snapvm::vmm::devices::virtio::vsock::{Vsock, EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use snapvm::vmm::devices::virtio::{
    ActivateContext, Interrupt, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_RING,
};
use snapvm::vmm::memory::GuestMemoryMmap;
use snapvm_fuzz::{
    guest_memory, interrupt, poke, queue, vsock_device, Input, QueueSetup, HOST_PORT,
};

const MAX_OPS: usize = 64;

fuzz_target!(|data: &[u8]| run(data));

/// The host side: a listener at `<uds>_1234` and the streams it accepted,
/// plus clients of the device's own listener.
struct Host {
    listener: UnixListener,
    accepted: Vec<UnixStream>,
    clients: Vec<UnixStream>,
}

impl Host {
    fn new(uds: &Path) -> Self {
        let path = format!("{}_{HOST_PORT}", uds.display());
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("cannot bind the host listener");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        Self {
            listener,
            accepted: Vec::new(),
            clients: Vec::new(),
        }
    }

    fn accept(&mut self) {
        while let Ok((s, _)) = self.listener.accept() {
            s.set_nonblocking(true).expect("nonblocking stream");
            self.accepted.push(s);
        }
    }
}

fn activate(
    dev: &mut Vsock,
    mem: &GuestMemoryMmap,
    irq: &std::sync::Arc<Interrupt>,
    qs: &[QueueSetup; 3],
) -> bool {
    let queues: Option<Vec<_>> = qs
        .iter()
        .map(|q| queue(mem, QUEUE_SIZE, q.size, q.desc, q.avail, q.used, false))
        .collect();
    let Some(queues) = queues else {
        return false;
    };
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt: irq.clone(),
        acked_features: dev.device_features(),
    })
    .expect("vsock refused queues the transport accepts");
    // The transport kicks every queue right after activation.
    for i in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
        dev.queue_notify(i);
    }
    true
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory(&mut input);
    let flags = input.u8();
    let mut qs = [QueueSetup::default(); 3];
    for q in &mut qs {
        *q = QueueSetup {
            size: input.u16(),
            desc: input.u64(),
            avail: input.u64(),
            used: input.u64(),
        };
    }
    let (mut dev, uds) = vsock_device("v.sock");
    if flags & 1 != 0 {
        dev.set_max_connections(2);
    }
    let mut host = Host::new(&uds);
    let irq = interrupt();
    let mut active = activate(&mut dev, &mem, &irq, &qs);
    if !active {
        return;
    }
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 10 {
            // Guest notifications (only while activated, as the transport).
            0 if active => dev.queue_notify(RX_QUEUE),
            1 if active => dev.queue_notify(TX_QUEUE),
            2 if active => dev.queue_notify(EVENT_QUEUE),
            // A guest store: addr, len, bytes.
            3 => {
                let addr = u64::from(input.u32());
                let len = usize::from(input.u8());
                poke(&mem, addr, input.bytes(len));
            }
            // The host writes len bytes into the newest accepted stream.
            4 => {
                host.accept();
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                if let Some(s) = host.accepted.last_mut() {
                    let _ = s.write(bytes);
                }
            }
            // The host closes (or half-closes) the newest accepted stream.
            5 => {
                host.accept();
                let how = input.u8();
                if how & 1 == 0 {
                    host.accepted.pop();
                } else if let Some(s) = host.accepted.last() {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            }
            // A host client connects to the device and sends len bytes
            // (normally `CONNECT <port>\n`).
            6 => {
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                if let Ok(mut s) = UnixStream::connect(&uds) {
                    s.set_nonblocking(true).expect("nonblocking client");
                    let _ = s.write(bytes);
                    host.clients.push(s);
                }
            }
            7 => dev.process_backend(),
            8 => dev.send_transport_reset(),
            // Driver reset, then the same driver brings the device up again.
            9 => {
                dev.reset();
                active = activate(&mut dev, &mem, &irq, &qs);
            }
            _ => {}
        }
    }
    assert_eq!(
        irq.status() & !(INT_USED_RING | INT_CONFIG_CHANGE),
        0,
        "unknown interrupt status bits"
    );
    dev.reset();
    drop(dev);
    host.accept();
}
