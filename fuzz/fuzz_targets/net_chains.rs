//! Descriptor-chain handling in the virtio-net device, on a real TAP: a
//! guest-memory image holding both rings and their descriptors, then
//! rounds of guest stores, tx/rx notifications and frames arriving from
//! the host.
//!
//! The process enters a network namespace of its own once (it needs
//! root), where a persistent TAP `fuzz0` holds 10.200.0.1/24 and a
//! permanent neighbour 10.200.0.2 at the guest's MAC: a UDP datagram sent
//! there is a frame the device reads from the TAP.
//!
//! Control stream after the memory image: for rx then tx, queue
//! `size: u16`, `desc`, `avail`, `used: u64`; then rounds of `op: u8`:
//! `op % 4` = 0: a guest store (`addr: u32, len: u8, bytes[len]`), 1: tx
//! notification, 2: rx notification, 3: a datagram of `len: u16` bytes to
//! the guest. The device sits in an event loop, as in firerunner, so
//! resumed runs and TAP readiness go through it.

#![no_main]

use std::net::UdpSocket;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use snapvm::vmm::devices::virtio::net::{
    Net, TapSource, DEFAULT_MAC, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use snapvm::vmm::devices::virtio::{
    ActivateContext, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_RING,
};
use snapvm::vmm::event_loop::EventManager;
use snapvm_fuzz::{guest_memory, interrupt, poke, queue, Input};

const TAP: &str = "fuzz0";
const GUEST_IP: &str = "10.200.0.2:9";
const MAX_ROUNDS: usize = 32;
const MAX_LOOP_RUNS: usize = 8;

fuzz_target!(|data: &[u8]| run(data));

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("cannot run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// The namespace, the TAP and a socket that sends to the guest's address.
fn host() -> &'static UdpSocket {
    static SOCK: OnceLock<UdpSocket> = OnceLock::new();
    SOCK.get_or_init(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): the net target runs as root");
        ip(&["tuntap", "add", TAP, "mode", "tap", "vnet_hdr"]);
        ip(&["addr", "add", "10.200.0.1/24", "dev", TAP]);
        ip(&["link", "set", TAP, "up"]);
        let mac = DEFAULT_MAC.to_string();
        ip(&[
            "neigh",
            "add",
            "10.200.0.2",
            "lladdr",
            &mac,
            "dev",
            TAP,
            "nud",
            "permanent",
        ]);
        let s = UdpSocket::bind("10.200.0.1:0").expect("cannot bind the UDP socket");
        s.set_nonblocking(true).expect("non-blocking UDP socket");
        s
    })
}

struct Backend(Arc<Mutex<Net>>);

impl MutEventSubscriber for Backend {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.0.lock().unwrap().backend_event(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.lock().unwrap().init_backend(ops);
    }
}

fn drain(em: &mut EventManager) {
    for _ in 0..MAX_LOOP_RUNS {
        if em.run_with_timeout(0).unwrap_or(0) == 0 {
            break;
        }
    }
}

fn run(data: &[u8]) {
    let sock = host();
    let mut input = Input::new(data);
    let mem = guest_memory(&mut input);
    let mut queues = Vec::new();
    for _ in 0..2 {
        let (size, desc, avail, used) = (input.u16(), input.u64(), input.u64(), input.u64());
        match queue(&mem, QUEUE_SIZE, size, desc, avail, used, false) {
            Some(q) => queues.push(q),
            None => return,
        }
    }
    let net = Arc::new(Mutex::new(
        Net::new(&TapSource::Name(TAP.into()), Some(DEFAULT_MAC))
            .expect("cannot attach to the fuzz TAP"),
    ));
    let mut em = EventManager::new().expect("cannot create an event manager");
    em.add_subscriber(Arc::new(Mutex::new(Backend(net.clone()))));
    let irq = interrupt();
    let features = net.lock().unwrap().device_features();
    net.lock()
        .unwrap()
        .activate(ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: irq.clone(),
            acked_features: features,
        })
        .expect("virtio-net refused queues the transport accepts");
    for q in [RX_QUEUE, TX_QUEUE] {
        net.lock().unwrap().queue_notify(q);
    }
    drain(&mut em);
    let payload = [0x5au8; 65507];
    for _ in 0..MAX_ROUNDS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 4 {
            0 => {
                let addr = u64::from(input.u32());
                let len = usize::from(input.u8());
                poke(&mem, addr, input.bytes(len));
            }
            1 => net.lock().unwrap().queue_notify(TX_QUEUE),
            2 => net.lock().unwrap().queue_notify(RX_QUEUE),
            _ => {
                let len = usize::from(input.u16()).min(payload.len());
                // A full socket buffer only loses the datagram.
                let _ = sock.send_to(&payload[..len], GUEST_IP);
            }
        }
        drain(&mut em);
    }
    assert_eq!(
        irq.status() & !(INT_USED_RING | INT_CONFIG_CHANGE),
        0,
        "unknown interrupt status bits"
    );
    net.lock().unwrap().reset();
    drain(&mut em);
}
