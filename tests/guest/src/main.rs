//! testguest: a tiny freestanding x86_64 guest kernel for snapvm's tests.
//! See README.md for the CPL0/CPL3 split and CONTRACT.md for what the VMM
//! and the tests rely on.

#![no_std]
#![no_main]

mod agent;
mod apic;
mod blk;
mod bootinfo;
mod cmdline;
mod cpl0;
mod disks;
mod functions;
mod hostile;
mod io;
mod ioport;
mod json;
mod manifest;
mod mem;
mod mptable;
mod net;
mod serial;
mod smp;
mod util;
mod virtio;
mod vsock;

use core::fmt::Write;

use bootinfo::BootInfo;
use cmdline::Exit;

/// CPL3 entry of the BSP (from `_start` in core.S), RDI = boot_params.
#[no_mangle]
pub extern "C" fn tg_rust_bsp_main(zero_page: u64) -> ! {
    let boot = BootInfo::read(zero_page as usize);
    serial::init();
    bsp_main(&boot)
}

/// CPL3 entry of an AP (from `tg_ap64` in core.S), RDI = its cpu index.
#[no_mangle]
pub extern "C" fn tg_rust_ap_main(index: u64) -> ! {
    smp::ap_main(index as u32)
}

fn bsp_main(boot: &BootInfo) -> ! {
    println!("testguest: hello");
    {
        let mut c = serial::lock();
        c.write_bytes(b"testguest: cmdline: ");
        c.write_bytes(boot.cmdline());
        c.write_bytes(b"\n");
    }
    let opts = cmdline::parse(boot.cmdline());
    if let Some(v) = opts.bad_exit {
        let mut c = serial::lock();
        c.write_bytes(b"testguest: unknown testguest.exit=");
        c.write_bytes(v);
        c.write_bytes(b", ignored\n");
    }

    // CPUs: the MP table lists them; this CPU (the BSP) goes first.
    apic::pic_disable();
    apic::lapic_enable();
    let my_id = apic::lapic_id();
    let mut cpus = [mptable::Cpu::default(); cpl0::MAX_CPUS];
    let mut ncpus = 1;
    cpus[0].apic_id = my_id;
    let total = match mptable::read() {
        Some(mp) => {
            for c in &mp.cpus[..mp.ncpus] {
                if c.apic_id != my_id && ncpus < cpl0::MAX_CPUS {
                    cpus[ncpus] = *c;
                    ncpus += 1;
                }
            }
            mp.total
        }
        None => {
            println!("testguest: no MP table, assuming one CPU");
            1
        }
    };
    println!("testguest: cpus: {}", total);
    println!("testguest: cpu 0 apic {} online", my_id);
    smp::start_aps(&cpus[..ncpus]);

    // RAM.
    let mut ram_bytes = 0u64;
    let mut ranges = 0;
    let mut top: Option<bootinfo::E820Entry> = None;
    for r in boot.ram() {
        ram_bytes += r.size;
        ranges += 1;
        if top.is_none_or(|t| r.end() > t.end()) {
            top = Some(r);
        }
    }
    println!("testguest: ram: {} MiB in {} ranges", (ram_bytes + (1 << 19)) >> 20, ranges);
    highmem_check(top);

    let heap_range = boot.ram_range_holding(cpl0::image_end() as u64, 1);
    mem::init(heap_range.map_or(0, |r| r.end()));

    io::control(io::CONTROL_BOOT_DONE);
    println!("testguest: boot done");
    if let Some(how) = opts.crash {
        crash(how);
    }

    // Stage 2: the virtio devices (not needed when the test only boots).
    let wants_devices = opts.exit.is_none() || opts.diskcheck || opts.readbench.is_some() || opts.net.is_some();
    let mut devs = if wants_devices { Some(disks::probe(&opts)) } else { None };
    if let Some(devs) = devs.as_mut() {
        if opts.diskcheck {
            for (i, d) in devs.disks.iter_mut().enumerate() {
                if let Some(blk) = d.as_mut() {
                    disks::check(i, blk);
                }
            }
        }
        if let Some(mode) = opts.net {
            match devs.net.take() {
                Some(dev) => net::exchange(dev, mode == b"hostile"),
                None => println!("testguest: net: no network card"),
            }
        }
        if let Some(which) = opts.readbench {
            disks::readbench(devs, which);
        }
    }

    match opts.exit {
        Some(Exit::Reboot) => io::reset(),
        Some(Exit::TripleFault) => cpl0::triple_fault(),
        Some(Exit::Halt) => cpl0::halt(),
        None => {}
    }
    match devs {
        Some(devs) => run_agent(boot, devs),
        None => idle(),
    }
}

/// Stage 3: the agent sequence of DESIGN.md.
fn run_agent(boot: &BootInfo, mut devs: disks::Devices) -> ! {
    // The vsock driver comes up with the others, as Linux's would at boot:
    // snapshots hold it live, and restores announce themselves with a
    // transport reset event.
    let vs = match devs.vsock.take().map(vsock::Vsock::new) {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            println!("testguest: vsock: {}", e);
            None
        }
        None => {
            println!("testguest: no vsock device");
            None
        }
    };
    io::control(io::CONTROL_SNAPSHOT); // language snapshot point
    // A restore usually brings another appfs than the snapshot saw: the
    // device then raised a configuration change with the new capacity.
    if let Some(appfs) = devs.disks[1].as_mut() {
        if appfs.check_config_change() {
            println!("testguest: vdb: config changed: sectors {}", appfs.capacity);
        }
    }
    let (manifest, have_appfs) = match devs.disks[1].as_mut() {
        Some(appfs) if appfs.capacity > 0 => {
            let sector: &mut [u8; blk::SECTOR] = mem::alloc(blk::SECTOR, 512).try_into().expect("sector buffer");
            match appfs.read_sector(0, sector) {
                0 => (manifest::Manifest::from_sector(sector), true),
                st => {
                    println!("testguest: vdb: read error status {}", st);
                    (manifest::Manifest::empty(), false)
                }
            }
        }
        _ => (manifest::Manifest::empty(), false),
    };
    if let (Some(kib), Some(appfs)) = (manifest.get(b"preload").and_then(cmdline::parse_u64), devs.disks[1].as_mut()) {
        disks::preload(appfs, kib);
    }
    let app = agent::load(&manifest, have_appfs);
    agent::report_load(&app, &manifest);
    if let agent::App::Failed(_) = app {
        io::control(io::CONTROL_APP_FAILED);
    }
    if let agent::App::Loaded(f) = app {
        functions::prepare(f, boot, &manifest);
    }
    // `diffpoint=after_init` (tests): the diff snapshot point comes after
    // each init frame instead, so the diff also holds vsock traffic; with
    // `snapshot_after=N` it comes after the Nth answer.
    let late_diffpoint = manifest.get(b"diffpoint") == Some(&b"after_init"[..]);
    if !late_diffpoint && manifest.get(b"snapshot_after").is_none() {
        io::control(io::CONTROL_SNAPSHOT); // diff snapshot point
    }
    let mut vs = vs;
    if let Some(case) = manifest.get(b"ioport") {
        ioport::run(case);
    }
    if let Some(case) = manifest.get(b"hostile") {
        hostile::run(case, boot, &mut devs, vs.as_mut());
    }
    match vs {
        Some(vs) => agent::Agent::new(vs, boot, app, manifest, late_diffpoint).run(),
        None => idle(),
    }
}

/// Nothing left to do: sleep with interrupts on, forever.
fn idle() -> ! {
    loop {
        let seen = cpl0::irq_count();
        cpl0::wait_irq(seen);
    }
}

/// `testguest.crash=pagefault|panic`: the crash paths, on purpose.
fn crash(how: &[u8]) {
    match how {
        b"pagefault" => {
            // 64 GiB: canonical, but beyond the identity map.
            // SAFETY: not safe at all, on purpose: the #PF goes to the CPL0
            // crash path, which reports it and resets the machine.
            unsafe { core::ptr::read_volatile(0x10_0000_0000 as *const u64) };
        }
        b"panic" => panic!("requested by testguest.crash=panic"),
        _ => {}
    }
}

/// Writes and reads back the last page of the highest RAM range, when RAM
/// goes above 4 GiB.
fn highmem_check(top: Option<bootinfo::E820Entry>) {
    const FOUR_GIB: u64 = 1 << 32;
    const MAPPED: u64 = 16 << 30; // identity map in core.S
    let Some(t) = top.filter(|t| t.end() > FOUR_GIB) else {
        println!("testguest: highmem: none");
        return;
    };
    let addr = (t.end() - 4096) & !0xfff;
    if addr + 4096 > MAPPED {
        println!("testguest: highmem: unmapped at {:#x}", addr);
        return;
    }
    let pattern = 0x5eed_0000_0000_0000u64 ^ addr;
    let p = addr as *mut u64;
    // SAFETY: `addr` is the last page of a RAM range from e820, inside the
    // identity map, and nothing else uses memory above 4 GiB.
    let back = unsafe {
        core::ptr::write_volatile(p, pattern);
        core::ptr::write_volatile(p.add(511), !pattern);
        (core::ptr::read_volatile(p), core::ptr::read_volatile(p.add(511)))
    };
    if back == (pattern, !pattern) {
        println!("testguest: highmem: ok at {:#x}", addr);
    } else {
        println!("testguest: highmem: mismatch at {:#x}", addr);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut c = serial::lock_or_steal();
    let _ = write!(c, "testguest: panic: {}", info.message());
    if let Some(at) = info.location() {
        let _ = write!(c, " at {}:{}", at.file(), at.line());
    }
    c.write_bytes(b"\n");
    drop(c);
    io::reset()
}

// compiler_builtins for this target expects libc's mem* functions; we are
// freestanding, so provide them (CPL3 only: rep movsb/stosb run natively).

/// # Safety
/// Standard memcpy contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard memmove contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: forward copy is safe when dst does not start inside src.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backward copy with DF set, restored right after.
        unsafe {
            core::arch::asm!(
                "std", "rep movsb", "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
        dst
    }
}

/// # Safety
/// Standard memset contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard memcmp contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// Standard bcmp contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
