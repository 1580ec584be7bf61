//! The appfs manifest: the first 512 bytes of vdb, text lines up to the
//! first NUL: `fn=<name>` then optional `key=value` lines.

pub struct Manifest {
    text: [u8; 512],
    len: usize,
}

impl Manifest {
    pub fn from_sector(sector: &[u8; 512]) -> Manifest {
        let len = sector.iter().position(|&b| b == 0).unwrap_or(sector.len());
        let mut text = [0u8; 512];
        text[..len].copy_from_slice(&sector[..len]);
        Manifest { text, len }
    }

    pub fn empty() -> Manifest {
        Manifest { text: [0; 512], len: 0 }
    }

    /// Non-empty lines, without the line end (`\n` or `\r\n`).
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.text[..self.len]
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.lines().next().is_none()
    }

    /// Every value of `key=` lines, in order.
    pub fn values<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.lines().filter_map(move |l| {
            let eq = l.iter().position(|&b| b == b'=')?;
            let (k, v) = (&l[..eq], &l[eq + 1..]);
            (k.trim_ascii() == key).then(|| v.trim_ascii())
        })
    }

    pub fn get<'a>(&'a self, key: &'a [u8]) -> Option<&'a [u8]> {
        self.values(key).next()
    }
}
