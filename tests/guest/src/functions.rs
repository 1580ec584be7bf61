//! The built-in functions an appfs manifest can name (`fn=<name>`).

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::bootinfo::BootInfo;
use crate::json::{self, Writer};
use crate::manifest::Manifest;
use crate::mem::TOUCH_BASE;
use crate::util::{mix64, Fnv, Rng};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Echo,
    Hello,
    Touch,
    Fail,
    Spin,
    Random,
    Discard,
    Count,
    Http,
    Sleep,
}

impl Func {
    pub fn by_name(name: &[u8]) -> Option<Func> {
        Some(match name {
            b"echo" => Func::Echo,
            b"hello" => Func::Hello,
            b"touch" => Func::Touch,
            b"fail" => Func::Fail,
            b"spin" => Func::Spin,
            b"random" => Func::Random,
            b"discard" => Func::Discard,
            b"count" => Func::Count,
            b"http" => Func::Http,
            b"sleep" => Func::Sleep,
            _ => return None,
        })
    }
}

/// What a function may look at besides the request.
pub struct Env<'a> {
    pub boot: &'a BootInfo,
    pub manifest: &'a Manifest,
    pub rng: &'a mut Rng,
    pub init_realtime_ns: u64,
}

/// Runs `f` on a validated request `req` (the JSON value, trimmed) whose
/// frame was `frame_len` bytes; writes the response object into `out`.
pub fn run(f: Func, req: &[u8], frame_len: usize, env: &mut Env, out: &mut Writer) {
    match f {
        Func::Echo => {
            if json::is_object(req) {
                out.raw(req);
            } else {
                out.raw(b"{\"echo\": ");
                out.raw(req);
                out.raw(b"}");
            }
        }
        Func::Hello => {
            let name = json::field(req, "name").and_then(json::str_inner).unwrap_or(b"world");
            // The raw (still escaped) string content is valid inside quotes.
            out.raw(b"{\"message\": \"hello, ");
            out.raw(name);
            out.raw(b"\"}");
        }
        Func::Touch => touch(req, env, out),
        Func::Fail => out.raw(b"{\"error\": \"fail: requested failure\"}"),
        Func::Spin => loop {
            core::hint::spin_loop();
        },
        Func::Random => {
            let r = env.rng.next_u64();
            let _ = write!(out, "{{\"random\": \"{:016x}\", \"init_realtime_ns\": {}}}", r, env.init_realtime_ns);
        }
        Func::Discard => {
            let _ = write!(out, "{{\"bytes\": {}}}", frame_len);
        }
        Func::Count => count(out),
        Func::Http => http(req, out),
        Func::Sleep => {
            // One APIC one-shot, so at most 4 s: long enough for a test to
            // act while a request is in flight.
            let ms = json::field(req, "ms").and_then(json::as_u64).unwrap_or(0).min(4000);
            crate::virtio::wait_until(ms, || false);
            let _ = write!(out, "{{\"slept_ms\": {}}}", ms);
        }
    }
}

/// A JSON string value, or `""`.
fn string_or_empty(v: Option<&[u8]>) -> &[u8] {
    v.filter(|v| json::str_inner(v).is_some()).unwrap_or(b"\"\"")
}

/// `http`: answers a request envelope (multivm's envelope.rs) with a
/// response envelope that echoes it: the same body (still base64), the
/// request's content type, its method, path and query as `x-method`,
/// `x-path`, `x-query`, and the status its `x-status` header asks for
/// (default 200). A plain JSON request is answered `{"plain": request}`.
fn http(req: &[u8], out: &mut Writer) {
    let Some(env) = json::field(req, "snapvm.http").filter(|v| json::is_object(v)) else {
        out.raw(b"{\"plain\": ");
        out.raw(req);
        out.raw(b"}");
        return;
    };
    let headers = json::field(env, "headers").filter(|v| json::is_object(v));
    let header = |k: &str| headers.and_then(|h| json::field(h, k));
    let status = header("x-status")
        .and_then(json::str_inner)
        .and_then(crate::cmdline::parse_u64)
        .filter(|s| (200..600).contains(s))
        .unwrap_or(200);
    let _ = write!(out, "{{\"snapvm.http\": {{\"status\": {}, \"headers\": {{\"content-type\": ", status);
    out.raw(header("content-type").filter(|v| json::str_inner(v).is_some()).unwrap_or(&b"\"application/octet-stream\""[..]));
    out.raw(b", \"x-method\": ");
    out.raw(string_or_empty(json::field(env, "method")));
    out.raw(b", \"x-path\": ");
    out.raw(string_or_empty(json::field(env, "path")));
    out.raw(b", \"x-query\": ");
    out.raw(string_or_empty(json::field(env, "query")));
    out.raw(b"}, \"body\": ");
    out.raw(string_or_empty(json::field(env, "body")));
    out.raw(b"}}");
}

/// `count`'s state, in guest memory like any app's: the requests served
/// and a 64 KiB area rewritten by each.
static COUNT: AtomicU64 = AtomicU64::new(0);
static COUNT_AREA: AtomicUsize = AtomicUsize::new(0);
const COUNT_AREA_BYTES: usize = 64 << 10;

/// Answers `{"count": n, "memory": "<FNV-1a of the area as the previous
/// request left it>"}`, then fills the area with values derived from n:
/// the answers depend only on how many requests came before.
fn count(out: &mut Writer) {
    let mut area = COUNT_AREA.load(Ordering::Relaxed) as *mut u8;
    if area.is_null() {
        area = crate::mem::alloc_zeroed(COUNT_AREA_BYTES, 4096).as_mut_ptr();
        COUNT_AREA.store(area as usize, Ordering::Relaxed);
    }
    // SAFETY: the area is COUNT_AREA_BYTES of heap that only this function
    // uses, and requests are served one at a time.
    let bytes = unsafe { core::slice::from_raw_parts_mut(area, COUNT_AREA_BYTES) };
    let mut before = Fnv::new();
    before.update(bytes);
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    for (i, word) in bytes.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix64(n ^ ((i as u64) << 32)).to_le_bytes());
    }
    let _ = write!(out, "{{\"count\": {}, \"memory\": \"{:016x}\"}}", n, before.0);
}

/// Work an app does when it loads, before the diff snapshot point.
/// `touch` with a manifest `mib=N` fills its N MiB (one word per page, with
/// other values than a request writes), as an app that builds its state at
/// load: the diff snapshot then holds those pages and a request touches
/// them again (its working set).
pub fn prepare(f: Func, boot: &BootInfo, manifest: &Manifest) {
    let Some(mib) = manifest.get(b"mib").and_then(crate::cmdline::parse_u64) else {
        return;
    };
    let bytes = mib.saturating_mul(1 << 20);
    if f != Func::Touch || bytes > (1 << 40) || boot.ram_range_holding(TOUCH_BASE, bytes.max(1)).is_none() {
        return;
    }
    for p in 0..bytes / 4096 {
        // SAFETY: as in `touch`: [TOUCH_BASE, TOUCH_BASE + bytes) is RAM
        // (checked against e820 above) that nothing else uses.
        unsafe { core::ptr::write_volatile((TOUCH_BASE + p * 4096) as *mut u64, !mix64(p)) };
    }
}

/// Writes then reads back one 8-byte word per 4 KiB page of `mib` MiB at
/// TOUCH_BASE. The values and so the checksum depend only on `mib`.
fn touch(req: &[u8], env: &mut Env, out: &mut Writer) {
    let from_manifest = || env.manifest.get(b"mib").and_then(crate::cmdline::parse_u64);
    let mib = match json::field(req, "mib") {
        Some(v) => match json::as_u64(v) {
            Some(n) => n,
            None => {
                out.raw(b"{\"error\": \"touch: mib must be a non-negative integer\"}");
                return;
            }
        },
        None => from_manifest().unwrap_or(16),
    };
    let bytes = mib.saturating_mul(1 << 20);
    if env.boot.ram_range_holding(TOUCH_BASE, bytes.max(1)).is_none() || bytes > (1 << 40) {
        let room = env.boot.ram_range_holding(TOUCH_BASE, 1).map_or(0, |r| (r.end() - TOUCH_BASE) >> 20);
        let _ = write!(out, "{{\"error\": \"touch: {} MiB does not fit in guest RAM ({} MiB available)\"}}", mib, room);
        return;
    }
    let pages = bytes / 4096;
    let mut sum = Fnv::new();
    for p in 0..pages {
        let addr = TOUCH_BASE + p * 4096;
        let v = mix64(p ^ (mib << 40));
        // SAFETY: [TOUCH_BASE, TOUCH_BASE + bytes) is RAM (checked against
        // e820 above) that nothing else uses: the heap ends below it.
        let back = unsafe {
            core::ptr::write_volatile(addr as *mut u64, v);
            core::ptr::read_volatile(addr as *const u64)
        };
        if back != v {
            let _ = write!(out, "{{\"error\": \"touch: read back mismatch at {:#x}\"}}", addr);
            return;
        }
        sum.update(&back.to_le_bytes());
    }
    let _ = write!(out, "{{\"touched_mib\": {}, \"checksum\": \"{:016x}\"}}", mib, sum.0);
}
