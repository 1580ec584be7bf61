//! Micro-benchmark of the working-set loaders (issue 8), without a VM.
//!
//! Builds a sparse snapshot memory file of `--mem` MiB (about half of it
//! data, in runs of 1–64 pages), picks a working set of each `--ws` size
//! spread over it (runs of 1–16 pages, four fifths data, one fifth zero
//! pages, first touched in random order), records it with the userfaultfd
//! recorder and writes `ws` + `ws.json`. Then, for every mechanism, with a
//! cold page cache (`posix_fadvise(DONTNEED)` on the files first) and warm,
//! `--runs` times interleaved, it times "memory ready" and "ready + one
//! thread has read and written one word of every working-set page in
//! first-touch order", and counts the page faults that thread took, those
//! of the whole process, and the faults the userfaultfd handler served.
//!
//! Mechanisms:
//! - `lazy`: the memory file mapped `MAP_PRIVATE`, nothing prefetched.
//! - `eager`: every data range of the file copied into anonymous memory
//!   (`memory::copy_snapshot`, what `--copy_base` does).
//! - `prefetch`: `vmm::memory::ws_loader::load`, what `--load_ws` does:
//!   anonymous memory, the set placed by a prefetch thread racing the
//!   toucher, every other page served by the fault handler.
//!
//! (The alternatives measured against it when it was chosen — copying the
//! set in before registering userfaultfd, UFFDIO_COPY before the VM runs,
//! and `MADV_POPULATE_READ/WRITE` on the lazy mapping — were slower to the
//! first response and have gone.)
//!
//! Usage: ws_load [--mem MiB] [--ws MiB,MiB,..] [--runs N] [--dir DIR]
//! (defaults 256, 4,16,64, 10, a temporary directory).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::sys::resource::{getrusage, UsageWho};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use snapvm::snapshot::layers::{LayerStack, PageSource};
use snapvm::snapshot::ws;
use snapvm::vmm::memory::fault_handler::FaultHandler;
use snapvm::vmm::memory::{self, ws_loader, GuestMemoryMmap, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
const IDENTITY: &str = "ws_load";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mech {
    Lazy,
    Eager,
    Prefetch,
}

const MECHS: [Mech; 3] = [Mech::Lazy, Mech::Eager, Mech::Prefetch];

impl Mech {
    fn name(self) -> &'static str {
        match self {
            Mech::Lazy => "lazy",
            Mech::Eager => "eager",
            Mech::Prefetch => "prefetch",
        }
    }
}

/// xorshift64*: reproducible layouts without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The first word of the data page at `ram_offset`.
fn pattern(ram_offset: u64) -> u64 {
    ram_offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// One working-set size, set up on disk.
struct Setup {
    dir: PathBuf,
    mem_mib: u64,
    memory: File,
    data: Vec<(u64, u64)>,
    source: Arc<LayerStack>,
    /// The working set's pages in first-touch order.
    order: Vec<u64>,
    /// What the touch loop reads, summed: the pages' first words.
    expect_sum: u64,
}

fn setup(base: &Path, mem_mib: u64, ws_mib: u64, rng: &mut Rng) -> Setup {
    let dir = base.join(format!("ws{ws_mib}"));
    std::fs::create_dir_all(&dir).expect("create the benchmark directory");
    let pages = (mem_mib << 20) / PAGE;
    // Alternate data and hole runs of 1..64 pages: about half is data.
    let (mut data, mut holes) = (Vec::new(), Vec::new());
    let mut p = 0;
    while p < pages {
        let n = rng.range(1, 64).min(pages - p);
        if data.len() <= holes.len() {
            data.push((p * PAGE, n * PAGE));
        } else {
            holes.push((p * PAGE, n * PAGE));
        }
        p += n;
    }
    let path = dir.join("memory");
    let memory = File::create(&path).expect("create the memory file");
    memory.set_len(mem_mib << 20).expect("size the memory file");
    let mut buf = Vec::new();
    for &(off, len) in &data {
        buf.clear();
        for page in (off..off + len).step_by(PAGE_SIZE) {
            let mut w = pattern(page);
            for _ in 0..PAGE_SIZE / 8 {
                buf.extend_from_slice(&w.to_ne_bytes());
                w = w.rotate_left(7) ^ 0x5555;
            }
        }
        memory
            .write_all_at(&buf, off)
            .expect("write the memory file");
    }
    memory.sync_all().expect("fsync the memory file");
    let memory = File::open(&path).expect("open the memory file");

    // The working set: runs of 1..16 pages, four fifths from data, one
    // fifth from holes, disjoint; then touched run by run in random order.
    let mut taken = vec![false; pages as usize];
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let (mut left, mut expect_sum) = ((ws_mib << 20) / PAGE, 0u64);
    while left > 0 {
        let (from, is_data) = if rng.range(0, 4) > 0 {
            (&data, true)
        } else {
            (&holes, false)
        };
        let (off, len) = from[rng.range(0, from.len() as u64 - 1) as usize];
        let n = rng.range(1, 16).min(len / PAGE).min(left);
        let first = off / PAGE + rng.range(0, len / PAGE - n);
        if (first..first + n).any(|q| taken[q as usize]) {
            continue;
        }
        for q in first..first + n {
            taken[q as usize] = true;
            if is_data {
                expect_sum = expect_sum.wrapping_add(pattern(q * PAGE));
            }
        }
        runs.push((first, n));
        left -= n;
    }
    for i in (1..runs.len()).rev() {
        runs.swap(i, rng.range(0, i as u64) as usize);
    }
    let order: Vec<u64> = runs
        .iter()
        .flat_map(|&(first, n)| (first..first + n).map(|q| q * PAGE))
        .collect();

    let source = Arc::new(LayerStack::new(vec![(
        memory.try_clone().expect("dup the memory file"),
        data.clone(),
    )]));
    let s = Setup {
        dir,
        mem_mib,
        memory,
        data,
        source,
        order,
        expect_sum,
    };
    record(&s);
    s
}

/// Records the working set with the userfaultfd recorder, as a `--dump_ws`
/// run would, and writes it.
fn record(s: &Setup) {
    let mem = memory::create(s.mem_mib).expect("allocate guest memory");
    let source: Arc<dyn PageSource> = s.source.clone();
    let handler = FaultHandler::record(&mem, source).expect("userfaultfd recorder");
    let start = Instant::now();
    let (sum, _) = touch(&mem, &s.order);
    let took = start.elapsed();
    let pages = handler.stop_recording();
    assert_eq!(sum, s.expect_sum, "recorded contents");
    assert_eq!(pages, s.order, "recorded first-touch order");
    let stats = handler.shutdown().expect("recorder");
    let set = ws::write(&s.dir, &pages, s.source.as_ref(), s.mem_mib << 20, IDENTITY)
        .expect("write the working set");
    println!(
        "  recorded {} pages ({} faults) in {:.1} ms; ws {} MiB in {} runs",
        pages.len(),
        stats.faults,
        ms(took),
        set.data_bytes() >> 20,
        set.ranges().len()
    );
}

/// From a new thread: reads and increments the first word of every page
/// of `order`, in order. Returns the sum of the words read and the page
/// faults the thread took.
fn touch(mem: &GuestMemoryMmap, order: &[u64]) -> (u64, i64) {
    let hosts: Vec<usize> = order
        .iter()
        .map(|&p| mem.get_host_address(GuestAddress(p)).expect("in RAM") as usize)
        .collect();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let before = thread_faults();
            let mut sum = 0u64;
            for &h in &hosts {
                let word = h as *mut u64;
                // SAFETY: `h` is the page-aligned host address of a guest
                // page (`get_host_address`), inside `mem`, which outlives
                // this scope; nothing else accesses guest memory meanwhile.
                unsafe {
                    let v = word.read_volatile();
                    sum = sum.wrapping_add(v);
                    word.write_volatile(v.wrapping_add(1));
                }
            }
            (sum, thread_faults() - before)
        })
        .join()
        .expect("toucher thread")
    })
}

fn faults(who: UsageWho) -> i64 {
    let u = getrusage(who).expect("getrusage");
    u.minor_page_faults() + u.major_page_faults()
}

fn thread_faults() -> i64 {
    faults(UsageWho::RUSAGE_THREAD)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn drop_cache(s: &Setup) {
    for name in ["memory", ws::WS_FILE, ws::WS_INDEX_FILE] {
        let f = File::open(s.dir.join(name)).expect("open for fadvise");
        posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).expect("fadvise");
    }
}

/// One measurement.
struct Sample {
    ready: f64,
    total: f64,
    touch_faults: i64,
    process_faults: i64,
    uffd_faults: u64,
    /// Faults that found their page placed by the prefetcher meanwhile.
    raced: u64,
}

fn run(s: &Setup, mech: Mech, cold: bool) -> Sample {
    if cold {
        drop_cache(s);
    }
    let ram = s.mem_mib << 20;
    let faults_before = faults(UsageWho::RUSAGE_SELF);
    let start = Instant::now();
    let (mem, handler) = match mech {
        Mech::Lazy => (
            memory::map_snapshot(&s.memory, s.mem_mib).expect("map"),
            None,
        ),
        Mech::Eager => (
            memory::copy_snapshot(&s.memory, s.mem_mib, &s.data).expect("copy"),
            None,
        ),
        Mech::Prefetch => {
            let set = ws::read(&s.dir, ram, IDENTITY).expect("read ws");
            let mem = memory::create(s.mem_mib).expect("allocate");
            let h = ws_loader::load(&mem, set, s.source.clone()).expect("load ws");
            (mem, Some(h))
        }
    };
    let ready = start.elapsed();
    let (sum, touch_faults) = touch(&mem, &s.order);
    let total = start.elapsed();
    let process_faults = faults(UsageWho::RUSAGE_SELF) - faults_before;
    assert_eq!(
        sum,
        s.expect_sum,
        "{}: wrong guest memory contents",
        mech.name()
    );
    let stats = handler
        .map(|h| h.shutdown().expect("fault handler"))
        .unwrap_or_default();
    drop(mem);
    Sample {
        ready: ms(ready),
        total: ms(total),
        touch_faults,
        process_faults,
        uffd_faults: stats.faults,
        raced: stats.already_present,
    }
}

fn min_median(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn report(ws_mib: u64, results: &[(Mech, bool, Vec<Sample>)]) {
    println!(
        "  {:<15} {:<5} {:>17} {:>17} {:>9} {:>9} {:>9} {:>6}",
        "mechanism",
        "cache",
        "ready min/med ms",
        "total min/med ms",
        "touch-flt",
        "proc-flt",
        "uffd-flt",
        "raced"
    );
    for (mech, cold, samples) in results {
        let (r_min, r_med) = min_median(&mut samples.iter().map(|s| s.ready).collect::<Vec<_>>());
        let (t_min, t_med) = min_median(&mut samples.iter().map(|s| s.total).collect::<Vec<_>>());
        let med = |f: &dyn Fn(&Sample) -> f64| {
            min_median(&mut samples.iter().map(f).collect::<Vec<_>>()).1
        };
        println!(
            "  {:<15} {:<5} {:>8.2}/{:<8.2} {:>8.2}/{:<8.2} {:>9} {:>9} {:>9} {:>6}",
            mech.name(),
            if *cold { "cold" } else { "warm" },
            r_min,
            r_med,
            t_min,
            t_med,
            med(&|s| s.touch_faults as f64),
            med(&|s| s.process_faults as f64),
            med(&|s| s.uffd_faults as f64),
            med(&|s| s.raced as f64),
        );
    }
    let total = |m: Mech, cold: bool| {
        results
            .iter()
            .find(|r| r.0 == m && r.1 == cold)
            .map(|r| min_median(&mut r.2.iter().map(|s| s.total).collect::<Vec<_>>()).1)
            .unwrap_or(f64::NAN)
    };
    for cold in [true, false] {
        let best = MECHS[2..]
            .iter()
            .map(|&m| (m, total(m, cold)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("mechanisms");
        println!(
            "  {ws_mib} MiB {}: fastest working-set loader {} ({:.2} ms median), {:.1}x faster than lazy, {:.1}x than eager",
            if cold { "cold" } else { "warm" },
            best.0.name(),
            best.1,
            total(Mech::Lazy, cold) / best.1,
            total(Mech::Eager, cold) / best.1,
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut mem_mib, mut sizes, mut runs, mut dir) = (256u64, vec![4u64, 16, 64], 10usize, None);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--mem" => mem_mib = value().parse().expect("--mem MiB"),
            "--ws" => {
                sizes = value()
                    .split(',')
                    .map(|v| v.parse().expect("--ws MiB,MiB"))
                    .collect()
            }
            "--runs" => runs = value().parse().expect("--runs N"),
            "--dir" => dir = Some(PathBuf::from(value())),
            other => panic!("unknown argument {other}; usage: ws_load [--mem MiB] [--ws MiB,..] [--runs N] [--dir DIR]"),
        }
    }
    let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/var/tmp/ws_load").expect("tempdir");
    let base = dir.unwrap_or_else(|| tmp.as_path().to_owned());
    let mut rng = Rng(0x243f_6a88_85a3_08d3);
    println!("guest RAM {mem_mib} MiB, {runs} runs, cold and warm page cache");
    for ws_mib in sizes {
        println!("working set {ws_mib} MiB:");
        let s = setup(&base, mem_mib, ws_mib, &mut rng);
        let mut results: Vec<(Mech, bool, Vec<Sample>)> = MECHS
            .iter()
            .flat_map(|&m| [(m, true, Vec::new()), (m, false, Vec::new())])
            .collect();
        for _ in 0..runs {
            for (mech, cold, samples) in results.iter_mut() {
                samples.push(run(&s, *mech, *cold));
            }
        }
        report(ws_mib, &results);
    }
}
