//! The i8042 keyboard controller, present so that a guest can reset the
//! machine (`reboot=k`, or command 0xfe on port 0x64): that ends the VM.

use vm_superio::{I8042Device, Trigger};

use crate::vmm::bus::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;

pub struct I8042<T: Trigger> {
    inner: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    /// `reset` fires when the guest asks the controller to reset the CPU.
    pub fn new(reset: T) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0 | COMMAND_OFFSET, 1) => data[0] = self.inner.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0 | COMMAND_OFFSET, [value]) = (offset, data) {
            if let Err(e) = self.inner.write(offset as u8, *value) {
                log::warn!("i8042: {e:?}");
            }
        }
    }
}
