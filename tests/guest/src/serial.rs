//! Console on the 8250 UART at 0x3f8. Lines from several CPUs never
//! interleave: a whole line is written under one spinlock (shared with the
//! CPL0 crash path).
//!
//! Each port access is a VM exit, so when the UART is a 16550A with its
//! FIFO on, one "transmitter empty" (LSR bit 5) check is followed by up to
//! 16 bytes, as Linux's 8250 driver does; otherwise one byte per check.

use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::cpl0;
use crate::io::{inb, outb};

const THR: u16 = 0x3f8;
const FCR: u16 = 0x3fa; // write: FIFO control; read: IIR
const LSR: u16 = 0x3fd;
const LSR_THR_EMPTY: u8 = 0x20;
const FIFO_SIZE: usize = 16;

/// Bytes we may write after seeing LSR.THRE: 1, or 16 with a FIFO.
static BURST: AtomicUsize = AtomicUsize::new(1);

/// Turns the FIFO on and checks that it is there (IIR bits 7:6 = 11).
pub fn init() {
    outb(FCR, 0x07); // enable, clear both FIFOs
    if inb(FCR) & 0xc0 == 0xc0 {
        BURST.store(FIFO_SIZE, Ordering::Relaxed);
    }
}

/// Holds the console lock until dropped.
pub struct Console {
    /// Bytes the transmitter can still take without another LSR check.
    room: usize,
}

pub fn lock() -> Console {
    let lock = cpl0::console_lock();
    while lock.swap(1, Ordering::Acquire) != 0 {
        core::hint::spin_loop();
    }
    Console { room: 0 }
}

/// Takes the lock if it can within a bounded wait (for the panic path,
/// where the holder may be the code that panicked).
pub fn lock_or_steal() -> Console {
    let lock = cpl0::console_lock();
    for _ in 0..1_000_000 {
        if lock.swap(1, Ordering::Acquire) == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    Console { room: 0 }
}

impl Console {
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.room == 0 {
                while inb(LSR) & LSR_THR_EMPTY == 0 {
                    core::hint::spin_loop();
                }
                self.room = BURST.load(Ordering::Relaxed);
            }
            outb(THR, b);
            self.room -= 1;
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        cpl0::console_lock().store(0, Ordering::Release);
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// `println!("testguest: ...")`: one whole line under the console lock.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut console = $crate::serial::lock();
        let _ = core::fmt::Write::write_fmt(&mut console, format_args!($($arg)*));
        console.write_bytes(b"\n");
    }};
}
