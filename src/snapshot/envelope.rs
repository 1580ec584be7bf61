//! The checksummed JSON envelope of snapvm's snapshot files (`snapshot.json`,
//! `ws.json`): one object whose members come in this order,
//!
//! ```text
//! {"format":"<name>","version":N,"checksum":"<16 hex>","<member>":<body>}
//! ```
//!
//! where `checksum` is the XXH64 of the exact bytes of `<body>` as they
//! appear in the file, so a flipped bit or a truncation is caught before
//! the body is believed. `version` is checked before anything else: a file
//! from a newer snapvm is refused as such even if its body has a shape this
//! version cannot parse.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::hash::xxh64;

/// One kind of enveloped file.
pub struct Kind {
    pub format: &'static str,
    /// The version this snapvm writes and reads.
    pub version: u32,
    /// The member holding the body.
    pub member: &'static str,
}

/// Why an envelope was not opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a complete JSON envelope (truncated, empty, not JSON).
    Malformed(String),
    /// Another `format`.
    OtherFormat(String),
    Newer(u32),
    Older(u32),
    /// The checksum does not match the body.
    Checksum,
}

#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// The file around `body` (a JSON value), written as version `version`.
pub fn seal(kind: &Kind, version: u32, body: &str) -> Vec<u8> {
    let checksum = xxh64(body.as_bytes());
    format!(
        "{{\"format\":\"{}\",\"version\":{version},\"checksum\":\"{checksum:016x}\",\"{}\":{body}}}\n",
        kind.format, kind.member
    )
    .into_bytes()
}

/// Checks an envelope's format, version and checksum; returns the checksum
/// and the body's JSON text, exactly as in the file.
pub fn open<'a>(kind: &Kind, bytes: &'a [u8]) -> Result<(String, &'a str), Refusal> {
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if header.format != kind.format {
        return Err(Refusal::OtherFormat(header.format));
    }
    if header.version > kind.version {
        return Err(Refusal::Newer(header.version));
    }
    if header.version < kind.version {
        return Err(Refusal::Older(header.version));
    }
    let members: HashMap<String, &RawValue> =
        serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let (Some(checksum), Some(body)) = (members.get("checksum"), members.get(kind.member)) else {
        return Err(Refusal::Malformed(format!(
            "no checksum or no {:?} member",
            kind.member
        )));
    };
    let body = body.get();
    let computed = format!("{:016x}", xxh64(body.as_bytes()));
    if checksum.get() != format!("\"{computed}\"") {
        return Err(Refusal::Checksum);
    }
    Ok((computed, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Kind = Kind {
        format: "test",
        version: 3,
        member: "body",
    };

    #[test]
    fn the_checksum_covers_the_body_and_the_version_comes_first() {
        let good = seal(&K, 3, "[1,2,3]");
        let (sum, body) = open(&K, &good).unwrap();
        assert_eq!((sum.len(), body), (16, "[1,2,3]"));
        let mut bad = good.clone();
        let at = bad.windows(7).position(|w| w == b"[1,2,3]").unwrap() + 3;
        bad[at] = b'7';
        assert_eq!(open(&K, &bad), Err(Refusal::Checksum));
        assert!(matches!(
            open(&K, &good[..good.len() - 5]),
            Err(Refusal::Malformed(_))
        ));
        assert_eq!(
            open(&K, &seal(&K, 4, "{\"new\":1}")),
            Err(Refusal::Newer(4))
        );
        assert_eq!(open(&K, &seal(&K, 2, "[]")), Err(Refusal::Older(2)));
        let other = Kind {
            format: "other",
            ..K
        };
        assert_eq!(
            open(&K, &seal(&other, 3, "[]")),
            Err(Refusal::OtherFormat("other".into()))
        );
    }
}
