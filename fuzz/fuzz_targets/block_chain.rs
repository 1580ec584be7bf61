//! Descriptor-chain walking in the virtio-blk device: a guest-memory image
//! holding the rings, descriptors (direct and indirect) and request
//! headers, then rounds of guest stores each followed by a queue
//! notification.
//!
//! Control stream after the memory image: `flags` (bit 0: EVENT_IDX,
//! bits 1-2: disk image, see `snapvm_fuzz::disk`), queue `size: u16`,
//! `desc`, `avail`, `used: u64`; then rounds of `addr: u32, len: u8,
//! bytes[len]` (a guest store) followed by a notification. The device sits
//! in an event loop, as in firerunner, so runs it cuts short (see
//! `MAX_CHAINS_PER_RUN` in block.rs) resume through it.

#![no_main]

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use snapvm::vmm::devices::virtio::block::Block;
use snapvm::vmm::devices::virtio::block::QUEUE_SIZE;
use snapvm::vmm::devices::virtio::{
    ActivateContext, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_RING, VIRTIO_RING_F_EVENT_IDX,
};
use snapvm::vmm::event_loop::EventManager;
use snapvm_fuzz::{block_device, guest_memory, interrupt, poke, queue, Input};

/// Rounds per input: enough for multi-step ring states, few enough to keep
/// every run fast.
const MAX_ROUNDS: usize = 32;

/// Event-loop runs after each notification, at most (resumes of a long
/// queue run).
const MAX_LOOP_RUNS: usize = 8;

fuzz_target!(|data: &[u8]| run(data));

/// The device's backend events, as the transport's event handler routes
/// them.
struct Backend(Arc<Mutex<Block>>);

impl MutEventSubscriber for Backend {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.0.lock().unwrap().backend_event(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.0.lock().unwrap().init_backend(ops);
    }
}

/// Lets the event loop run what is pending (resumed queue runs).
fn drain(em: &mut EventManager) {
    for _ in 0..MAX_LOOP_RUNS {
        if em.run_with_timeout(0).unwrap_or(0) == 0 {
            break;
        }
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory(&mut input);
    let flags = input.u8();
    let event_idx = flags & 1 != 0;
    let (size, desc, avail, used) = (input.u16(), input.u64(), input.u64(), input.u64());
    let Some(q) = queue(&mem, QUEUE_SIZE, size, desc, avail, used, event_idx) else {
        return;
    };
    let blk = Arc::new(Mutex::new(block_device(flags >> 1)));
    let mut em = EventManager::new().expect("cannot create an event manager");
    em.add_subscriber(Arc::new(Mutex::new(Backend(blk.clone()))));
    let irq = interrupt();
    let mut features = blk.lock().unwrap().device_features();
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    blk.lock()
        .unwrap()
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![q],
            interrupt: irq.clone(),
            acked_features: features,
        })
        .expect("virtio-blk refused a queue the transport accepts");
    // The transport kicks every queue right after activation.
    blk.lock().unwrap().queue_notify(0);
    drain(&mut em);
    for _ in 0..MAX_ROUNDS {
        if input.is_empty() {
            break;
        }
        let addr = u64::from(input.u32());
        let len = usize::from(input.u8());
        poke(&mem, addr, input.bytes(len));
        blk.lock().unwrap().queue_notify(0);
        drain(&mut em);
    }
    assert_eq!(
        irq.status() & !(INT_USED_RING | INT_CONFIG_CHANGE),
        0,
        "unknown interrupt status bits"
    );
    blk.lock().unwrap().reset();
    drain(&mut em);
}
