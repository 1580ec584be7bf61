//! Small helpers: FNV-1a, hex, a seeded RNG.

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(FNV_OFFSET)
    }
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.0 = h;
    }
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut f = Fnv::new();
    f.update(bytes);
    f.0
}

/// SplitMix64 step: a good 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256** with seed mixing.
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub const fn new() -> Rng {
        Rng { s: [0x7465_7374_6775_6573, 0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210, 0x5eed_5eed_5eed_5eed] }
    }

    /// Folds `words` into the state so that different inputs diverge.
    pub fn mix(&mut self, words: &[u64]) {
        for (i, &w) in words.iter().enumerate() {
            let j = i % 4;
            self.s[j] = mix64(self.s[j] ^ w ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        // Two rounds: every state word then depends on every input word.
        for _ in 0..2 {
            for j in 0..4 {
                self.s[j] = mix64(self.s[j] ^ self.s[(j + 1) % 4] ^ self.s[(j + 3) % 4]);
            }
        }
        if self.s == [0; 4] {
            self.s[0] = 1;
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
}

pub fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}
