//! A tiny JSON reader and writer: enough to validate a document, walk the
//! fields of a top-level object, read strings and unsigned integers, and
//! write responses with proper string escaping.

const MAX_DEPTH: u32 = 256;

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn value(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string(),
            b't' => self.lit(b"true"),
            b'f' => self.lit(b"false"),
            b'n' => self.lit(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn lit(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..].starts_with(word).then(|| self.i += word.len())
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.').is_some() && self.digits() == 0 {
            return None;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    self.i += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            self.i += 1;
                            for _ in 0..4 {
                                if !self.peek()?.is_ascii_hexdigit() {
                                    return None;
                                }
                                self.i += 1;
                            }
                        }
                        _ => return None,
                    }
                }
                0..=0x1f => return None,
                _ => self.i += 1,
            }
        }
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            self.value(depth + 1)?;
            self.ws();
            if self.eat(b']').is_some() {
                return Some(());
            }
            self.eat(b',')?;
        }
    }

    fn object(&mut self, depth: u32) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            self.ws();
            self.string()?;
            self.ws();
            self.eat(b':')?;
            self.value(depth + 1)?;
            self.ws();
            if self.eat(b'}').is_some() {
                return Some(());
            }
            self.eat(b',')?;
        }
    }
}

/// Validates `doc` as exactly one JSON value (UTF-8, surrounding
/// whitespace allowed); returns the value without the whitespace.
pub fn validate(doc: &[u8]) -> Option<&[u8]> {
    core::str::from_utf8(doc).ok()?;
    let mut p = Parser { b: doc, i: 0 };
    p.ws();
    let start = p.i;
    p.value(0)?;
    let end = p.i;
    p.ws();
    (p.i == doc.len()).then(|| &doc[start..end])
}

/// The fields of a *validated* object: (raw key with quotes, raw value).
pub fn fields(obj: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut p = Parser { b: obj, i: 0 };
    let mut open = p.eat(b'{').is_some();
    core::iter::from_fn(move || {
        if !open {
            return None;
        }
        p.ws();
        if p.eat(b'}').is_some() {
            open = false;
            return None;
        }
        let _ = p.eat(b',');
        p.ws();
        let ks = p.i;
        p.string()?;
        let key = &obj[ks..p.i];
        p.ws();
        p.eat(b':')?;
        p.ws();
        let vs = p.i;
        p.value(0)?;
        Some((key, &obj[vs..p.i]))
    })
}

pub fn is_object(v: &[u8]) -> bool {
    v.first() == Some(&b'{')
}

/// The raw value of field `key` of a validated object (keys compared
/// after unescaping; the first match wins).
pub fn field<'a>(obj: &'a [u8], key: &str) -> Option<&'a [u8]> {
    if !is_object(obj) {
        return None;
    }
    let mut buf = [0u8; 64];
    fields(obj).find_map(|(k, v)| (decode_str(k, &mut buf) == Some(key.as_bytes())).then_some(v))
}

/// The inside of a raw string token (still escaped), if `v` is a string.
pub fn str_inner(v: &[u8]) -> Option<&[u8]> {
    (v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"').then(|| &v[1..v.len() - 1])
}

/// Unescapes a raw string token into `out`; None if it is not a string or
/// does not fit.
pub fn decode_str<'o>(v: &[u8], out: &'o mut [u8]) -> Option<&'o [u8]> {
    let s = str_inner(v)?;
    let mut n = 0;
    let mut i = 0;
    let mut put = |bytes: &[u8], n: &mut usize| -> Option<()> {
        out.get_mut(*n..*n + bytes.len())?.copy_from_slice(bytes);
        *n += bytes.len();
        Some(())
    };
    let hex4 = |at: usize| -> Option<u32> {
        let h = s.get(at..at + 4)?;
        let t = core::str::from_utf8(h).ok()?;
        u32::from_str_radix(t, 16).ok()
    };
    while i < s.len() {
        let c = s[i];
        if c != b'\\' {
            put(&[c], &mut n)?;
            i += 1;
            continue;
        }
        let e = *s.get(i + 1)?;
        i += 2;
        let simple = match e {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(8),
            b'f' => Some(12),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(b) = simple {
            put(&[b], &mut n)?;
            continue;
        }
        // \uXXXX, with surrogate pairs.
        let mut cp = hex4(i)?;
        i += 4;
        if (0xd800..0xdc00).contains(&cp) && s.get(i) == Some(&b'\\') && s.get(i + 1) == Some(&b'u') {
            if let Some(lo) = hex4(i + 2).filter(|lo| (0xdc00..0xe000).contains(lo)) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                i += 6;
            }
        }
        let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
        let mut tmp = [0u8; 4];
        put(ch.encode_utf8(&mut tmp).as_bytes(), &mut n)?;
    }
    Some(&out[..n])
}

/// A non-negative integer token (no fraction, no exponent).
pub fn as_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(v).ok()?.parse().ok()
}

/// Writes into a fixed buffer; remembers if anything did not fit.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pub len: usize,
    pub overflow: bool,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, len: 0, overflow: false }
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflow = true,
        }
    }

    /// Bytes as the inside of a JSON string (escaping what must be).
    pub fn escaped(&mut self, bytes: &[u8]) {
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: Option<&[u8]> = match b {
                b'"' => Some(b"\\\""),
                b'\\' => Some(b"\\\\"),
                b'\n' => Some(b"\\n"),
                b'\r' => Some(b"\\r"),
                b'\t' => Some(b"\\t"),
                0..=0x1f => None,
                _ => continue,
            };
            self.raw(&bytes[start..i]);
            match esc {
                Some(e) => self.raw(e),
                None => {
                    let hex = b"0123456789abcdef";
                    self.raw(&[b'\\', b'u', b'0', b'0', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
                }
            }
            start = i + 1;
        }
        self.raw(&bytes[start..]);
    }

}

impl core::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.raw(s.as_bytes());
        Ok(())
    }
}
