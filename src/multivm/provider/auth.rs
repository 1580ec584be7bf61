//! HTTP basic authentication for `/system/*`, with credentials read from
//! files as OpenFaaS reads them: `DIR/basic-auth-user` and
//! `DIR/basic-auth-password` (`--basic_auth_dir DIR`; a trailing newline
//! is ignored). The comparison takes the same time wherever the supplied
//! credentials first differ.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

/// The realm in `WWW-Authenticate`.
pub const REALM: &str = "snapvm";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the credential file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the credential file {0} is empty")]
    Empty(String),
}

pub struct Credentials {
    user: Vec<u8>,
    password: Vec<u8>,
}

impl Credentials {
    /// Reads `basic-auth-user` and `basic-auth-password` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, AuthError> {
        let read = |name: &str| {
            let path = dir.join(name);
            let text = std::fs::read(&path).map_err(|source| AuthError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let end = text
                .iter()
                .rposition(|b| !b"\r\n".contains(b))
                .map_or(0, |i| i + 1);
            if end == 0 {
                return Err(AuthError::Empty(path.display().to_string()));
            }
            Ok(text[..end].to_vec())
        };
        Ok(Self {
            user: read("basic-auth-user")?,
            password: read("basic-auth-password")?,
        })
    }

    /// Whether an `Authorization` header value carries these credentials.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(encoded) = authorization.and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        }) else {
            return false;
        };
        let Ok(decoded) = BASE64.decode(encoded) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        // Both halves are always compared: no early exit on the user.
        let user = same(&decoded[..colon], &self.user);
        let password = same(&decoded[colon + 1..], &self.password);
        user & password
    }
}

/// Equality in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            user: b"admin".to_vec(),
            password: b"s3cret".to_vec(),
        }
    }

    #[test]
    fn only_the_right_basic_credentials_pass() {
        let c = creds();
        // admin:s3cret
        assert!(c.accepts(Some("Basic YWRtaW46czNjcmV0")));
        assert!(c.accepts(Some("basic  YWRtaW46czNjcmV0 ")));
        // admin:wrong, admi:s3cret, admin:s3cret2, no colon, other scheme.
        for bad in [
            "Basic YWRtaW46d3Jvbmc=",
            "Basic YWRtaTpzM2NyZXQ=",
            "Basic YWRtaW46czNjcmV0Mg==",
            "Basic YWRtaW4=",
            "Bearer YWRtaW46czNjcmV0",
            "Basic",
            "Basic %%%%",
        ] {
            assert!(!c.accepts(Some(bad)), "{bad}");
        }
        assert!(!c.accepts(None));
        assert!(same(b"", b"") && !same(b"a", b"") && !same(b"ab", b"ac"));
    }

    #[test]
    fn credentials_load_from_files_without_the_newline() {
        let dir = std::env::temp_dir().join(format!("snapvm-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("basic-auth-user"), "admin\n").unwrap();
        assert!(matches!(
            Credentials::load(&dir),
            Err(AuthError::Read { .. })
        ));
        std::fs::write(dir.join("basic-auth-password"), "\n").unwrap();
        assert!(matches!(Credentials::load(&dir), Err(AuthError::Empty(_))));
        std::fs::write(dir.join("basic-auth-password"), "s3cret\r\n").unwrap();
        let c = Credentials::load(&dir).unwrap();
        assert!(c.accepts(Some("Basic YWRtaW46czNjcmV0")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
