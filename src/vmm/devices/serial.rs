//! The 8250 UART on COM1 (vm-superio), raising IRQ 4 through an irqfd.
//! Guest output goes to the console sink (stdout or a file); there is no
//! console input, so reads of the receive buffer find it empty.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::bus::BusDevice;
use crate::vmm::persist::Persist;

/// A [`Trigger`] that raises an interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

pub type ConsoleSink = Box<dyn Write + Send>;

/// The UART's registers and receive FIFO, saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPersist {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot restore the serial port: {0}")]
    Restore(String),
}

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

impl Persist for SerialDevice {
    type State = SerialPersist;
    type Error = SerialError;

    /// The registers and FIFO, for a snapshot.
    fn save(&self) -> Result<SerialPersist, SerialError> {
        let s = self.serial.state();
        Ok(SerialPersist {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    /// Puts the UART of a freshly built device in the saved state, keeping
    /// its interrupt line and console (a pending interrupt is raised
    /// again).
    fn restore(&mut self, s: &SerialPersist) -> Result<(), SerialError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = || {
            self.serial
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| SerialError::Restore(e.to_string()))
        };
        let (irq, placeholder_irq) = (irq()?, irq()?);
        // `Serial` is rebuilt from the state around the same writer.
        let placeholder = Serial::new(IrqTrigger(placeholder_irq), Box::new(std::io::sink()) as _);
        let out = std::mem::replace(&mut self.serial, placeholder).into_writer();
        self.serial = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn state_round_trips() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut a = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        a.write(3, &[0x80]); // DLAB
        a.write(0, &[3]);
        a.write(3, &[0x03]);
        a.write(7, &[0x5a]); // scratch
        let saved = a.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialPersist = serde_json::from_str(&json).unwrap();
        let mut b = SerialDevice::new(irq, Box::new(std::io::sink()));
        b.restore(&back).unwrap();
        assert_eq!(b.save().unwrap(), saved);
        let mut v = [0u8];
        b.read(7, &mut v);
        assert_eq!(v, [0x5a]);
    }
}
