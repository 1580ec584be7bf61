//! The host side of the guest protocol: length-framed JSON over a vsock
//! stream, and the init frame every VM start or restore begins with.

use std::io::{Read, Write};

use serde_json::Value;

/// Largest frame either side sends: 4 MiB of JSON.
pub const MAX_FRAME: usize = 4 << 20;
/// Port the guest agent connects to on the host (CID 2).
pub const AGENT_PORT: u32 = 1234;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection to the guest failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("the guest sent a frame that is not JSON: {0}")]
    BadJson(serde_json::Error),
    #[error("the guest closed the connection")]
    Closed,
    #[error("unexpected answer to the init frame: {0}")]
    NotReady(String),
}

/// Writes one frame: 4-byte big-endian length, then the bytes.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> Result<(), ProtocolError> {
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's bytes.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        other => other?,
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    match r.read_exact(&mut body) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProtocolError::Closed),
        other => other.map(|_| body).map_err(ProtocolError::from),
    }
}

/// Reads one frame and parses it as JSON.
pub fn read_json(r: &mut impl Read) -> Result<Value, ProtocolError> {
    serde_json::from_slice(&read_frame(r)?).map_err(ProtocolError::BadJson)
}

/// The init frame: a fresh 256-bit seed and the host's wall clock.
pub fn init_frame(seed: &[u8; 32], realtime_ns: u64) -> Value {
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({"init": {"seed": hex, "realtime_ns": realtime_ns}})
}

/// A fresh seed from the kernel's CSPRNG.
pub fn fresh_seed() -> std::io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(seed)
}

/// Sends the init frame and waits for `{"ready": true}`.
pub fn handshake(stream: &mut (impl Read + Write)) -> Result<(), ProtocolError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let frame = init_frame(&fresh_seed()?, now);
    write_frame(stream, frame.to_string().as_bytes())?;
    let answer = read_json(stream)?;
    if answer.get("ready") == Some(&Value::Bool(true)) {
        Ok(())
    } else {
        Err(ProtocolError::NotReady(answer.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        write_frame(&mut buf, br#"{"a":1}"#).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 7]);
        let v = read_json(&mut buf.as_slice()).unwrap();
        assert_eq!(v["a"], 1);
        assert!(matches!(
            write_frame(&mut Vec::new(), &vec![b' '; MAX_FRAME + 1]),
            Err(ProtocolError::TooLarge(_))
        ));
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0][..]),
            Err(ProtocolError::Closed)
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 5, b'{'][..]),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn init_frame_carries_a_64_hex_seed() {
        let f = init_frame(&[0xab; 32], 42);
        let seed = f["init"]["seed"].as_str().unwrap();
        assert_eq!(seed.len(), 64);
        assert!(seed.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(f["init"]["realtime_ns"], 42);
        assert_ne!(fresh_seed().unwrap(), fresh_seed().unwrap());
    }
}
