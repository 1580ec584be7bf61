//! The device event loop: one thread, one epoll set (event-manager), every
//! device fd (queue notifications, sockets, timers) registered with it.
//!
//! A snapshot pauses it so device state and guest memory stay still: a
//! subscriber on the loop owns an eventfd; [`LoopPause::pause`] wakes it
//! and the subscriber then blocks the loop thread — between two events,
//! never inside a device — until [`LoopPause::resume`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A device or service that handles events on the event-loop thread.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The event loop's manager.
pub type EventManager = event_manager::EventManager<Subscriber>;

#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("cannot create the event-loop pause eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("the device event loop did not pause within {0:?}")]
    Timeout(Duration),
    #[error("the device event loop has stopped")]
    Gone,
}

/// The owner's handle.
pub struct LoopPause {
    evt: EventFd,
    requests: Sender<()>,
    acks: Receiver<()>,
    resumes: Sender<()>,
}

struct PauseSubscriber {
    evt: EventFd,
    requests: Receiver<()>,
    acks: Sender<()>,
    resumes: Receiver<()>,
}

impl MutEventSubscriber for PauseSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        while self.requests.try_recv().is_ok() {
            if self.acks.send(()).is_err() || self.resumes.recv().is_err() {
                return;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch the event-loop pause eventfd: {e}");
        }
    }
}

impl LoopPause {
    /// Adds the pause subscriber to `em` (before the loop runs).
    pub fn new(em: &mut EventManager) -> Result<Self, QuiesceError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(QuiesceError::EventFd)?;
        let (req_tx, req_rx) = bounded(1);
        let (ack_tx, ack_rx) = bounded(1);
        let (res_tx, res_rx) = bounded(1);
        let sub = PauseSubscriber {
            evt: evt.try_clone().map_err(QuiesceError::EventFd)?,
            requests: req_rx,
            acks: ack_tx,
            resumes: res_rx,
        };
        let sub: Subscriber = Arc::new(Mutex::new(sub));
        em.add_subscriber(sub);
        Ok(Self {
            evt,
            requests: req_tx,
            acks: ack_rx,
            resumes: res_tx,
        })
    }

    /// Returns once the loop thread is parked between events.
    pub fn pause(&self, timeout: Duration) -> Result<(), QuiesceError> {
        self.requests.send(()).map_err(|_| QuiesceError::Gone)?;
        self.evt.write(1).map_err(|_| QuiesceError::Gone)?;
        match self.acks.recv_timeout(timeout) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                Err(QuiesceError::Timeout(timeout))
            }
            Err(_) => Err(QuiesceError::Gone),
        }
    }

    /// Lets a paused loop run again.
    pub fn resume(&self) {
        let _ = self.resumes.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn pause_parks_the_loop_between_events() {
        let mut em = EventManager::new().unwrap();
        let p = LoopPause::new(&mut em).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                em.run_with_timeout(10).unwrap();
            }
        });
        p.pause(Duration::from_secs(5)).unwrap();
        p.resume();
        p.pause(Duration::from_secs(5)).unwrap();
        stop.store(true, Ordering::SeqCst);
        p.resume();
        t.join().unwrap();
    }
}
