//! Kernel command line options testguest understands.

/// Largest number of virtio-mmio devices we drive.
pub const MAX_DEVICES: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Reboot,
    TripleFault,
    Halt,
}

/// One `virtio_mmio.device=<size>@<base>:<irq>` announcement.
#[derive(Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

pub struct Options<'a> {
    pub exit: Option<Exit>,
    /// The value of an unknown `testguest.exit=`, reported once.
    pub bad_exit: Option<&'a [u8]>,
    pub diskcheck: bool,
    pub readbench: Option<&'a [u8]>,
    /// `testguest.crash=`: fail on purpose (tests of the crash path).
    pub crash: Option<&'a [u8]>,
    /// `testguest.net=1`: the virtio-net exchange (`net.rs`) after boot;
    /// `testguest.net=hostile`: bad tx chains first.
    pub net: Option<&'a [u8]>,
    pub devices: [Option<MmioDevice>; MAX_DEVICES],
}

pub fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n').filter(|w| !w.is_empty())
}

/// Parses a decimal or 0x-prefixed hexadecimal number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// `4K`, `0x1000`, `1M`...
fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1 << shift)
}

/// `<size>@<base>:<irq>[:<id>]`
fn parse_device(s: &[u8]) -> Option<MmioDevice> {
    let at = s.iter().position(|&b| b == b'@')?;
    let size = parse_size(&s[..at])?;
    let rest = &s[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let base = parse_u64(&rest[..colon])?;
    let irq_part = &rest[colon + 1..];
    let irq_end = irq_part.iter().position(|&b| b == b':').unwrap_or(irq_part.len());
    let gsi = u32::try_from(parse_u64(&irq_part[..irq_end])?).ok()?;
    Some(MmioDevice { base, size, gsi })
}

pub fn parse(cmdline: &[u8]) -> Options<'_> {
    let mut o = Options { exit: None, bad_exit: None, diskcheck: false, readbench: None, crash: None, net: None, devices: [None; MAX_DEVICES] };
    let mut ndev = 0;
    for w in words(cmdline) {
        if let Some(v) = w.strip_prefix(b"testguest.exit=") {
            match v {
                b"reboot" => o.exit = Some(Exit::Reboot),
                b"triplefault" => o.exit = Some(Exit::TripleFault),
                b"halt" => o.exit = Some(Exit::Halt),
                _ => o.bad_exit = Some(v),
            }
        } else if let Some(v) = w.strip_prefix(b"testguest.diskcheck=") {
            o.diskcheck = v != b"0";
        } else if let Some(v) = w.strip_prefix(b"testguest.readbench=") {
            o.readbench = Some(v);
        } else if let Some(v) = w.strip_prefix(b"testguest.net=") {
            o.net = Some(v).filter(|v| *v != b"0");
        } else if let Some(v) = w.strip_prefix(b"testguest.crash=") {
            o.crash = Some(v);
        } else if let Some(v) = w.strip_prefix(b"virtio_mmio.device=") {
            if let Some(d) = parse_device(v) {
                if ndev < MAX_DEVICES {
                    o.devices[ndev] = Some(d);
                    ndev += 1;
                }
            }
        }
    }
    o
}
