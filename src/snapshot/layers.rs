//! The memory of a stack of snapshot layers, page by page: where a
//! working set's pages and the pages a restored VM has not touched yet
//! come from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where guest pages come from at restore: the stack of snapshot layers.
pub trait PageSource: Send + Sync {
    /// Fills `buf` (one page) with the content of RAM offset `ram_offset` (page aligned).
    /// Returns Ok(false), leaving `buf` alone, for a page no layer holds (a zero page).
    fn read_page(&self, ram_offset: u64, buf: &mut [u8]) -> std::io::Result<bool>;
}

/// The memory of a stack of snapshot layers as a [`PageSource`]: each
/// layer is a memory file (pages at their RAM offsets) and the ranges it
/// holds; the top-most layer holding a page supplies it, a page no layer
/// holds is zero.
pub struct LayerStack {
    /// Bottom first; each layer's ranges `(RAM offset, length)` sorted and
    /// disjoint.
    layers: Vec<(File, Vec<(u64, u64)>)>,
}

impl LayerStack {
    /// `layers`, bottom first: each a memory file and the ranges it holds
    /// (a diff layer's from its memory table; a base's may also be the
    /// file's data ranges, as `vmm::memory::data_ranges` finds them).
    pub fn new(mut layers: Vec<(File, Vec<(u64, u64)>)>) -> Self {
        for (_, ranges) in &mut layers {
            ranges.sort_unstable();
        }
        Self { layers }
    }
}

impl PageSource for LayerStack {
    fn read_page(&self, ram_offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        for (file, ranges) in self.layers.iter().rev() {
            let i = ranges.partition_point(|&(o, l)| o + l <= ram_offset);
            if ranges.get(i).is_some_and(|&(o, _)| o <= ram_offset) {
                file.read_exact_at(buf, ram_offset)?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Layers for tests: sparse memory files whose pages name themselves.
#[cfg(test)]
pub(crate) mod test_util {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;

    const PAGE_SIZE: usize = 4096;

    /// The first word of the source page at `ram_offset`: names the page.
    pub(crate) fn pattern(ram_offset: u64) -> u64 {
        (ram_offset | 1) ^ 0x5a5a_0000_0000_0000
    }

    /// A sparse memory file of `mem_mib` MiB whose `data` ranges hold
    /// pages marked with [`pattern`].
    pub(crate) fn sparse_source(dir: &Path, mem_mib: u64, data: &[(u64, u64)]) -> Arc<LayerStack> {
        let path = dir.join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(mem_mib << 20).unwrap();
        let mut page = vec![0xa5u8; PAGE_SIZE];
        for &(off, len) in data {
            for p in (off..off + len).step_by(PAGE_SIZE) {
                page[..8].copy_from_slice(&pattern(p).to_ne_bytes());
                file.write_all_at(&page, p).unwrap();
            }
        }
        Arc::new(LayerStack::new(vec![(
            File::open(&path).unwrap(),
            data.to_vec(),
        )]))
    }
}
