//! The device event loop: one thread, one epoll set (event-manager), every
//! device fd (queue notifications, sockets, timers) registered with it.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;

/// A device or service that handles events on the event-loop thread.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The event loop's manager.
pub type EventManager = event_manager::EventManager<Subscriber>;
