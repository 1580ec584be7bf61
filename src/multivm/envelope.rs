//! Invocation as OpenFaaS does it, inside snapvm's JSON frames (DESIGN.md,
//! guest protocol): an HTTP request that is not a plain JSON call — another
//! method than POST, a sub-path (`/function/NAME/more`), a query string, or
//! a body that is not JSON — reaches the guest as a request envelope
//!
//! ```json
//! {"snapvm.http": {"method": "PUT", "path": "/more", "query": "a=1",
//!                  "headers": {"content-type": "text/plain", ...},
//!                  "body": "<base64>"}}
//! ```
//!
//! and a function may answer with a response envelope
//!
//! ```json
//! {"snapvm.http": {"status": 201, "headers": {"content-type": "text/csv"},
//!                  "body": "<base64>"}}
//! ```
//!
//! which multivm turns into that status, those headers and that body. A
//! plain call (POST to `/function/NAME`, no query, a JSON or empty body) is
//! sent as the JSON value it is, as before, and any answer that is not a
//! response envelope is the JSON answer it always was. Header names are
//! lower-case; repeated headers are joined with ", ". base64 makes 4
//! bytes of every 3, so a 4 MiB frame carries at most [`MAX_BODY`] bytes
//! of body (413 above).

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::protocol::MAX_FRAME;

/// The key of both envelopes.
pub const KEY: &str = "snapvm.http";
/// Largest body an envelope carries: 3 MiB less 64 KiB, leaving room in the
/// frame for the rest of the envelope (a bigger envelope is refused all
/// the same).
pub const MAX_BODY: usize = MAX_FRAME / 4 * 3 - (64 << 10);
/// Headers that describe the connection, not the request or response.
const HOP_BY_HOP: [&str; 4] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
];

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the function's response envelope is malformed: {0}")]
    Malformed(String),
}

/// An HTTP request to a function, as received.
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path after `/function/NAME` ("" or starting with '/').
    pub path: &'a str,
    pub query: &'a str,
    pub headers: Vec<(String, String)>,
    pub body: &'a [u8],
}

/// A function's HTTP answer from a response envelope.
#[derive(Debug, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names, hop-by-hop headers left out.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest<'_> {
    /// The frame for the guest: the JSON value of a plain call, or the
    /// request envelope.
    pub fn frame(&self) -> Value {
        let blank = self.body.iter().all(u8::is_ascii_whitespace);
        if self.method == "POST" && self.path.is_empty() && self.query.is_empty() {
            if blank {
                return Value::Null;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(self.body) {
                return v;
            }
        }
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &self.headers {
            let k = k.to_ascii_lowercase();
            if HOP_BY_HOP.contains(&k.as_str()) {
                continue;
            }
            headers
                .entry(k)
                .and_modify(|old| {
                    old.push_str(", ");
                    old.push_str(v);
                })
                .or_insert_with(|| v.clone());
        }
        json!({KEY: {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": BASE64.encode(self.body),
        }})
    }
}

/// The response envelope in a function's answer, if it is one.
pub fn response(answer: &Value) -> Option<Result<HttpResponse, EnvelopeError>> {
    let obj = answer.as_object().filter(|o| o.len() == 1)?;
    let env = obj.get(KEY)?;
    Some(parse_response(env))
}

fn parse_response(env: &Value) -> Result<HttpResponse, EnvelopeError> {
    let bad = |m: &str| EnvelopeError::Malformed(m.to_string());
    let env: &Map<String, Value> = env.as_object().ok_or_else(|| bad("not an object"))?;
    let status = match env.get("status") {
        None => 200,
        Some(s) => s
            .as_u64()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| u16::try_from(s).ok())
            .ok_or_else(|| bad("status must be a number from 200 to 599"))?,
    };
    let mut headers = Vec::new();
    if let Some(h) = env.get("headers") {
        let h = h
            .as_object()
            .ok_or_else(|| bad("headers must be an object"))?;
        for (k, v) in h {
            let v = v
                .as_str()
                .ok_or_else(|| bad(&format!("header {k:?} must be a string")))?;
            let k = k.to_ascii_lowercase();
            let token = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
            if !token || v.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(bad(&format!("header {k:?} is not a valid HTTP header")));
            }
            if !HOP_BY_HOP.contains(&k.as_str()) {
                headers.push((k, v.to_string()));
            }
        }
    }
    let body = match env.get("body") {
        None => Vec::new(),
        Some(b) => b
            .as_str()
            .and_then(|b| BASE64.decode(b).ok())
            .ok_or_else(|| bad("body must be a base64 string"))?,
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(method: &'a str, path: &'a str, query: &'a str, body: &'a [u8]) -> HttpRequest<'a> {
        HttpRequest {
            method,
            path,
            query,
            headers: vec![
                ("Content-Type".into(), "text/plain".into()),
                ("X-A".into(), "1".into()),
                ("x-a".into(), "2".into()),
                ("Content-Length".into(), "3".into()),
            ],
            body,
        }
    }

    #[test]
    fn plain_json_posts_stay_plain() {
        assert_eq!(req("POST", "", "", br#"{"a": 1}"#).frame(), json!({"a": 1}));
        assert_eq!(req("POST", "", "", b" \n").frame(), Value::Null);
        assert_eq!(req("POST", "", "", b"[1]").frame(), json!([1]));
    }

    #[test]
    fn everything_else_is_an_envelope() {
        for (m, p, q, b) in [
            ("GET", "", "", &b""[..]),
            ("POST", "/sub/path", "", b"{}"),
            ("POST", "", "a=1", b"{}"),
            ("POST", "", "", b"not json \xff"),
            ("DELETE", "/x", "y=2&z", b"\x00\x01"),
        ] {
            let f = req(m, p, q, b).frame();
            let e = &f[KEY];
            assert_eq!(e["method"], m);
            assert_eq!(e["path"], p);
            assert_eq!(e["query"], q);
            assert_eq!(BASE64.decode(e["body"].as_str().unwrap()).unwrap(), b);
            assert_eq!(e["headers"]["content-type"], "text/plain");
            assert_eq!(e["headers"]["x-a"], "1, 2", "repeated headers are joined");
            assert!(e["headers"].get("content-length").is_none());
        }
    }

    #[test]
    fn response_envelopes_parse_or_are_refused() {
        assert!(response(&json!({"message": "hi"})).is_none());
        assert!(response(&json!({KEY: {}, "other": 1})).is_none());
        let r = response(
            &json!({KEY: {"status": 201, "headers": {"Content-Type": "text/csv", "Connection": "x"},
            "body": BASE64.encode(b"a,b\n")}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(
            r.headers,
            vec![("content-type".to_string(), "text/csv".to_string())]
        );
        assert_eq!(r.body, b"a,b\n");
        assert_eq!(response(&json!({KEY: {}})).unwrap().unwrap().status, 200);
        for bad in [
            json!({KEY: 1}),
            json!({KEY: {"status": 99}}),
            json!({KEY: {"status": 600}}),
            json!({KEY: {"status": "200"}}),
            json!({KEY: {"headers": []}}),
            json!({KEY: {"headers": {"a": 1}}}),
            json!({KEY: {"headers": {"a b": "1"}}}),
            json!({KEY: {"headers": {"a": "1\r\nx: y"}}}),
            json!({KEY: {"body": "%%%"}}),
        ] {
            assert!(response(&bad).unwrap().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_largest_body_fits_a_frame() {
        let body = vec![0xffu8; MAX_BODY];
        let mut r = req("PUT", "/p", "q", &body);
        r.headers.push(("x-long".into(), "v".repeat(32 << 10)));
        assert!(r.frame().to_string().len() <= MAX_FRAME);
    }
}
