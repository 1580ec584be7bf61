//! The VM's event loop: one thread — firerunner's main thread — and one
//! epoll set (event-manager) with every device fd (queue notifications,
//! sockets, timers), the controller's channel, the termination signals
//! and the wake-up of [`Wake`], which the other threads (vCPUs, the
//! working-set fault handler) use to hand it work.
//!
//! Whatever the loop thread does between two events — a snapshot, writing
//! a working set — happens with every device quiet: no device code runs
//! on any other thread.

use std::sync::{Arc, Mutex};

use crossbeam_channel::{SendError, Sender};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A device or service that handles events on the event-loop thread.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The event loop's manager.
pub type EventManager = event_manager::EventManager<Subscriber>;

/// A channel to the event-loop thread: each message also wakes the loop.
pub struct Wake<T> {
    tx: Sender<T>,
    evt: Arc<EventFd>,
}

impl<T> Clone for Wake<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            evt: self.evt.clone(),
        }
    }
}

impl<T> Wake<T> {
    /// A channel through `tx` whose messages write `evt` (see [`Waker`]).
    pub fn new(tx: Sender<T>, waker: &Waker) -> Self {
        Self {
            tx,
            evt: waker.evt.clone(),
        }
    }

    /// Queues `msg` and wakes the loop.
    pub fn send(&self, msg: T) -> Result<(), SendError<T>> {
        self.tx.send(msg)?;
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
        Ok(())
    }
}

/// The eventfd every [`Wake`] writes; its subscriber only drains it, so
/// that the loop returns to its owner, who reads the channels.
pub struct Waker {
    evt: Arc<EventFd>,
}

impl Waker {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// The subscriber to add to the loop.
    pub fn subscriber(&self) -> Subscriber {
        Arc::new(Mutex::new(Drain(self.evt.clone())))
    }
}

struct Drain(Arc<EventFd>);

impl MutEventSubscriber for Drain {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            log::error!("cannot watch the event-loop wake-up eventfd: {e}");
        }
    }
}
