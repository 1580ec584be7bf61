//! The snapvm control port (0x3f0): the guest writes one byte to report
//! progress — boot done, snapshot point, app failure, timestamp.

use std::time::Instant;

use crate::vmm::bus::BusDevice;

pub const BOOT_DONE: u8 = 123;
pub const SNAPSHOT_POINT: u8 = 124;
pub const APP_FAILED: u8 = 125;
pub const TIMESTAMP: u8 = 126;

/// What a control-port write means to the VM's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestSignal {
    BootDone,
    SnapshotPoint,
    AppFailed,
    Timestamp,
}

/// Receives guest signals (the VM's run loop), on the vCPU thread that
/// made the write.
pub trait SignalSink: Send {
    fn signal(&self, signal: GuestSignal, since_start: std::time::Duration);
}

pub struct ControlPort<S: SignalSink> {
    start: Instant,
    sink: S,
}

impl<S: SignalSink> ControlPort<S> {
    /// `start` is when the VMM process started, for the logged timings.
    pub fn new(start: Instant, sink: S) -> Self {
        Self { start, sink }
    }
}

impl<S: SignalSink> BusDevice for ControlPort<S> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let signal = match data {
            [BOOT_DONE] => GuestSignal::BootDone,
            [SNAPSHOT_POINT] => GuestSignal::SnapshotPoint,
            [APP_FAILED] => GuestSignal::AppFailed,
            [TIMESTAMP] => GuestSignal::Timestamp,
            other => {
                log::warn!("control port: ignoring unknown write {other:?}");
                return;
            }
        };
        self.sink.signal(signal, self.start.elapsed());
    }
}
