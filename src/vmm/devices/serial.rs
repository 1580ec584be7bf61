//! The 8250 UART on COM1 (vm-superio), raising IRQ 4 through an irqfd.
//! Guest output goes to the console sink (stdout or a file); there is no
//! console input, so reads of the receive buffer find it empty.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::bus::BusDevice;

/// A [`Trigger`] that raises an interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

pub type ConsoleSink = Box<dyn Write + Send>;

pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Flushes buffered console output (before the process exits).
    pub fn flush(&mut self) {
        if let Err(e) = self.serial.writer_mut().flush() {
            log::warn!("cannot flush the console: {e}");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            log::warn!("serial: {e:?}");
        }
    }
}
