//! Guest RAM use: a bump allocator between the image and TOUCH_BASE, and
//! the fixed region the `touch` function writes.
//!
//! Nothing is zeroed unless asked: fresh guest RAM is zero already, and
//! zeroing dirties pages (snapshot diffs grow).

use core::sync::atomic::{AtomicUsize, Ordering};

/// Where `touch` writes: above the image, the stacks and the heap.
pub const TOUCH_BASE: u64 = 32 << 20;

static NEXT: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);

/// Heap = [image end, min(TOUCH_BASE, end of the RAM range holding it)).
pub fn init(ram_end: u64) {
    let start = (crate::cpl0::image_end() + 0xfff) & !0xfff;
    NEXT.store(start, Ordering::SeqCst);
    END.store(ram_end.min(TOUCH_BASE) as usize, Ordering::SeqCst);
}

/// `size` bytes aligned to `align` (a power of two), for the lifetime of
/// the guest. Contents are whatever RAM holds (zero on a fresh boot).
pub fn alloc(size: usize, align: usize) -> &'static mut [u8] {
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        let start = (cur + align - 1) & !(align - 1);
        let end = start + size;
        if end > END.load(Ordering::Relaxed) {
            panic!("out of guest memory allocating {} bytes", size);
        }
        match NEXT.compare_exchange(cur, end, Ordering::SeqCst, Ordering::Relaxed) {
            // SAFETY: [start, end) is RAM (checked against the e820 range in
            // init) that no one else was handed: the bump pointer moved past it.
            Ok(_) => return unsafe { core::slice::from_raw_parts_mut(start as *mut u8, size) },
            Err(now) => cur = now,
        }
    }
}

/// As `alloc`, zero-filled (for small structures such as virtqueues).
pub fn alloc_zeroed(size: usize, align: usize) -> &'static mut [u8] {
    let buf = alloc(size, align);
    buf.fill(0);
    buf
}

/// The allocator's position, for [`release`].
pub fn mark() -> usize {
    NEXT.load(Ordering::SeqCst)
}

/// Gives back everything allocated since `mark` (for loops that would
/// otherwise use up the heap).
///
/// # Safety
/// Nothing allocated since `mark` is used again, by the guest or by a
/// device (reset the device before its rings' memory is handed out anew).
pub unsafe fn release(mark: usize) {
    NEXT.store(mark, Ordering::SeqCst);
}
