//! Address-space dispatch for trapped guest accesses (port I/O and MMIO).
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. It is built
//! before the vCPUs start and shared read-only between vCPU threads; each
//! device sits behind its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reached through a bus. `offset` is relative to the start of the
/// range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("no device at address {0:#x}")]
    NoDevice(u64),
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let before = self.ranges.range(..end).next_back();
        if let Some((b, r)) = before {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((*base, range))
    }

    /// Dispatches a read; the access must lie wholly inside one device.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (base, range) = self.find(addr).ok_or(BusError::NoDevice(addr))?;
        let offset = addr - base;
        if offset + data.len() as u64 > range.len {
            return Err(BusError::NoDevice(addr));
        }
        lock(&range.device).read(offset, data);
        Ok(())
    }

    /// Dispatches a write; the access must lie wholly inside one device.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (base, range) = self.find(addr).ok_or(BusError::NoDevice(addr))?;
        let offset = addr - base;
        if offset + data.len() as u64 > range.len {
            return Err(BusError::NoDevice(addr));
        }
        lock(&range.device).write(offset, data);
        Ok(())
    }
}

/// Locks a device mutex. A device that panicked while holding its lock has
/// no invariant left to protect against the next access, so poisoning is
/// ignored rather than spread to every vCPU thread.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_gaps() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(vec![0; 8]))), 0x100, 8)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(vec![0; 4]))), 0x108, 4)
            .unwrap();
        bus.write(0x109, &[7]).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x109, &mut b).unwrap();
        assert_eq!(b, [7]);
        assert_eq!(bus.read(0x10c, &mut b), Err(BusError::NoDevice(0x10c)));
        assert_eq!(bus.read(0xff, &mut b), Err(BusError::NoDevice(0xff)));
        // An access straddling the end of a device is refused.
        let mut w = [0u8; 2];
        assert!(bus.read(0x10b, &mut w).is_err());
    }

    #[test]
    fn refuses_overlaps() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Reg(vec![0; 16]))) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(dev(), 0x100, 16).unwrap();
        assert!(bus.insert(dev(), 0x10f, 4).is_err());
        assert!(bus.insert(dev(), 0xf8, 9).is_err());
        assert!(bus.insert(dev(), 0x90, 0).is_err());
        bus.insert(dev(), 0xf0, 16).unwrap();
    }
}
