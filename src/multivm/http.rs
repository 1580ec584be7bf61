//! The HTTP/1.1 API (tiny_http; one worker thread per request in flight,
//! from an elastic pool).
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /function/{name}`, body = JSON request | 200 + the function's JSON response |
//! | any method on `/function/{name}[/sub/path][?query]`, any body | the request in an envelope (envelope.rs); the function's status, headers and body when it answers with one |
//! | `GET /healthz` | 200 `{"status":"ok"}`; 503 `{"status":"shutting down"}` |
//! | `GET /metrics` | Prometheus text format (see metrics.rs) |
//! | `GET /openapi.yaml` | the OpenAPI 3 document of this API (`docs/openapi.yaml`, built in) |
//! | `GET /functions` | JSON array: config and live counts per function |
//! | `GET /vms` | JSON array: every VM (id, function, state, memory, ages) |
//! | `GET /vms/{id}/log` | the VM's guest console, text, last MiB (also for the last 32 stopped VMs) |
//! | `/system/...` | the OpenFaaS provider API (provider/mod.rs): `GET/POST/PUT/DELETE /system/functions`, `GET /system/function/{name}`, `POST /system/scale-function/{name}`, `GET /system/info`, `GET /system/namespaces` |
//!
//! `/system/*` needs HTTP basic auth when multivm has `--basic_auth_dir`
//! (401 with `WWW-Authenticate: Basic realm="snapvm"` otherwise); the
//! rest stays open. Its bodies are at most 1 MiB (413); its errors are
//! 400 bad input, 404 unknown function, 409 exists already (POST) or
//! declared in the config file, 501 no deploy section in the config.
//!
//! An empty body is the JSON `null`. Every answer carries `X-Request-Id`
//! (also in the logs); invocations also carry `X-Vm-Id` and `X-Start`
//! (`warm`, `cold-boot`, `cold-restore`, `cold-shell`: restored into a ready VM shell,
//! `cold-wake`: a hibernated VM woken, src/multivm/hibernate.rs).
//!
//! A function error — the guest answered an object with an `"error"`
//! field — is still the function's answer: 200 with that JSON, flagged by
//! the header `X-Function-Error: true`. multivm's own failures are JSON
//! `{"error": "...", "request_id": "..."}` with: 404 unknown function or
//! path, 405 wrong method, 410 the function was
//! removed while the request waited, 413 body over 4 MiB (over 3 MiB
//! less 64 KiB when it travels in an envelope),
//! 503 the function's queue is full, no VM became free within the
//! function's `request_timeout`, the function is still being prepared
//! (or its preparation failed), or multivm is shutting down (all with
//! `Retry-After`), 502 the VM failed to launch, died, or answered
//! something that is not JSON or a malformed response envelope, 504 the function ran past its
//! `request_timeout` (its VM was killed).
//!
//! Every 503 of multivm's own is sent before the function has seen the
//! request (the scheduler refuses it while it waits for a VM), so a load
//! balancer may send it to another node without running it twice; that
//! is what a snapvm cluster's HAProxy does (deploy/haproxy.cfg). With
//! `--cluster` a function's own 503 (from a response envelope) is
//! answered as 500 with `X-Function-Status: 503`, so that a 503 from this
//! multivm always means "not started here".

use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response};

use super::config::check_name;
use super::envelope::{self, HttpRequest};
use super::provider::auth::REALM;
use super::provider::types::check_namespace;
use super::provider::{Provider, ProviderError};
use super::scheduler::{Scheduler, SchedulerError, Start};
use crate::protocol::MAX_FRAME;

/// Stack of a request thread: they only parse, copy and wait.
const HANDLER_STACK: usize = 256 << 10;
/// GET /vms/{id}/log returns at most this much of the end of a console.
const LOG_TAIL: u64 = 1 << 20;
/// A worker thread with nothing to do for this long ends.
const WORKER_IDLE: Duration = Duration::from_secs(10);
/// Largest body of a `/system/*` request.
const SYSTEM_BODY_MAX: usize = 1 << 20;
/// The OpenAPI document of this API, served at `GET /openapi.yaml`.
const OPENAPI: &str = include_str!("../../docs/openapi.yaml");

pub struct Api {
    sched: Arc<Scheduler>,
    provider: Arc<Provider>,
    rid_prefix: String,
    next_rid: AtomicU64,
    /// Requests being handled, for the drain at shutdown.
    active: Mutex<usize>,
    idle: Condvar,
    /// Worker threads waiting for a request, not yet claimed.
    waiting: AtomicUsize,
    work_tx: Sender<Request>,
    work_rx: Receiver<Request>,
    /// `--cluster`: a function's own 503 becomes a 500 (see the top).
    cluster: bool,
}

struct Reply {
    status: u16,
    body: Vec<u8>,
    content_type: String,
    headers: Vec<(String, String)>,
    /// Function label for the request metrics (invocations only).
    function: Option<String>,
}

impl Reply {
    fn json(status: u16, v: &Value) -> Self {
        Self {
            status,
            body: v.to_string().into_bytes(),
            content_type: "application/json".into(),
            headers: Vec::new(),
            function: None,
        }
    }

    fn error(status: u16, msg: impl std::fmt::Display, rid: &str) -> Self {
        let mut r = Self::json(
            status,
            &json!({"error": msg.to_string(), "request_id": rid}),
        );
        if status == 503 {
            r.headers.push(("Retry-After".into(), "1".into()));
        }
        r
    }

    fn text(status: u16, body: Vec<u8>, content_type: &str) -> Self {
        Self {
            status,
            body,
            content_type: content_type.to_string(),
            headers: Vec::new(),
            function: None,
        }
    }
}

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

impl Api {
    pub fn new(sched: Arc<Scheduler>, provider: Arc<Provider>, cluster: bool) -> Arc<Self> {
        let seed = crate::protocol::fresh_seed().unwrap_or([0; 32]);
        let rid_prefix: String = seed[..4].iter().map(|b| format!("{b:02x}")).collect();
        let (work_tx, work_rx) = unbounded();
        Arc::new(Self {
            sched,
            provider,
            rid_prefix,
            next_rid: AtomicU64::new(1),
            active: Mutex::new(0),
            idle: Condvar::new(),
            waiting: AtomicUsize::new(0),
            work_tx,
            work_rx,
            cluster,
        })
    }

    /// Hands `req` to a waiting worker thread, or to a new one when all
    /// are busy (requests may wait in the scheduler for long: the pool
    /// grows with them; workers idle for [`WORKER_IDLE`] end).
    pub fn dispatch(self: &Arc<Self>, req: Request) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        // Claim a waiting worker; the count never goes below zero.
        let claimed = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if claimed {
            if let Err(e) = self.work_tx.send(req) {
                // Unreachable: `self` holds a receiver.
                drop(e.into_inner());
                self.done();
            }
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("http-worker".into())
            .stack_size(HANDLER_STACK)
            .spawn(move || me.work(req));
        if let Err(e) = spawned {
            log::error!("cannot start a request thread: {e}");
            self.done();
        }
    }

    /// A worker: serves `first`, then whatever it is handed, until idle.
    fn work(&self, first: Request) {
        let mut req = first;
        loop {
            self.handle(req);
            self.done();
            self.waiting.fetch_add(1, Ordering::AcqRel);
            req = loop {
                match self.work_rx.recv_timeout(WORKER_IDLE) {
                    Ok(r) => break r,
                    Err(_) => {
                        // Leave only if no request has claimed a waiter
                        // that it might be counting on; else keep waiting.
                        let left = self
                            .waiting
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                            .is_ok();
                        if left {
                            return;
                        }
                    }
                }
            };
        }
    }

    fn done(&self) {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Blocks until no request is being handled.
    pub fn wait_idle(&self) {
        let mut n = self.active.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn handle(&self, mut req: Request) {
        let t0 = Instant::now();
        let rid = format!(
            "{}-{}",
            self.rid_prefix,
            self.next_rid.fetch_add(1, Ordering::Relaxed)
        );
        let (path, query) = req.url().split_once('?').unwrap_or((req.url(), ""));
        let (path, query) = (path.to_string(), query.to_string());
        let method = req.method().clone();
        let reply = self.route(&mut req, &method, (&path, &query), &rid, t0);
        let status = reply.status;
        let mut resp = Response::from_data(reply.body).with_status_code(status);
        for h in [
            header("Content-Type", &reply.content_type),
            header("X-Request-Id", &rid),
        ]
        .into_iter()
        .chain(reply.headers.iter().map(|(k, v)| header(k, v)))
        .flatten()
        {
            resp = resp.with_header(h);
        }
        if let Some(f) = &reply.function {
            self.sched.metrics.request(f, status, t0.elapsed());
        }
        log::info!(
            "[{rid}] {method} {path} -> {status} in {} us",
            t0.elapsed().as_micros()
        );
        if let Err(e) = req.respond(resp) {
            log::debug!("[{rid}] cannot send the response: {e}");
        }
    }

    fn route(
        &self,
        req: &mut Request,
        method: &Method,
        (path, query): (&str, &str),
        rid: &str,
        t0: Instant,
    ) -> Reply {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let get = *method == Method::Get || *method == Method::Head;
        match (parts.as_slice(), get) {
            (["system", rest @ ..], _) => self.system(req, method, rest, query, rid),
            (["function", name, ..], _) => {
                // The path after /function/NAME, as received.
                let sub = path
                    .trim_start_matches('/')
                    .strip_prefix("function/")
                    .and_then(|p| p.strip_prefix(*name))
                    .unwrap_or_default();
                // A name that does not decode is no function's: a 404.
                let name = percent_decode(name, false).unwrap_or_else(|| name.to_string());
                self.invoke(req, &name, (sub, query), rid, t0)
            }
            (["healthz"], true) => {
                if self.sched.is_shutting_down() {
                    Reply::json(503, &json!({"status": "shutting down"}))
                } else {
                    Reply::json(200, &json!({"status": "ok"}))
                }
            }
            (["metrics"], true) => {
                let page = self.sched.metrics.render(&self.sched.gauges());
                Reply::text(200, page.into_bytes(), "text/plain; version=0.0.4")
            }
            (["openapi.yaml"], true) => {
                Reply::text(200, OPENAPI.as_bytes().to_vec(), "application/yaml")
            }
            (["functions"], true) => Reply::json(200, &self.sched.functions_json()),
            (["vms"], true) => Reply::json(200, &self.sched.vms_json()),
            (["vms", id, "log"], true) => {
                let log = id.parse().ok().and_then(|id| self.sched.vm_log(id));
                match log {
                    Some(p) => match read_tail(&p, LOG_TAIL) {
                        Ok(b) => Reply::text(200, b, "text/plain; charset=utf-8"),
                        // Launched, but the console has no output yet.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            Reply::text(200, Vec::new(), "text/plain; charset=utf-8")
                        }
                        Err(e) => Reply::error(500, format!("cannot read the log: {e}"), rid),
                    },
                    None => Reply::error(404, format!("no VM {id}"), rid),
                }
            }
            (
                ["healthz"]
                | ["metrics"]
                | ["openapi.yaml"]
                | ["functions"]
                | ["vms"]
                | ["vms", _, "log"],
                false,
            ) => method_not_allowed("GET", rid),
            _ => Reply::error(404, format!("no such endpoint: {path}"), rid),
        }
    }

    fn invoke(
        &self,
        req: &mut Request,
        name: &str,
        target: (&str, &str),
        rid: &str,
        t0: Instant,
    ) -> Reply {
        let mut reply = self.invoke_fn(req, name, target, rid, t0);
        if reply.status != 404 {
            reply.function = Some(name.to_string());
        }
        reply
    }

    /// An invocation: `(sub, query)` are the path after /function/NAME and
    /// the query string; see envelope.rs for what reaches the guest.
    fn invoke_fn(
        &self,
        req: &mut Request,
        name: &str,
        (sub, query): (&str, &str),
        rid: &str,
        t0: Instant,
    ) -> Reply {
        let body = match read_body(req, MAX_FRAME, rid) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let method = req.method().as_str().to_ascii_uppercase();
        let http = HttpRequest {
            method: &method,
            path: sub,
            query,
            headers: req
                .headers()
                .iter()
                .map(|h| (h.field.to_string(), h.value.to_string()))
                .collect(),
            body: &body,
        };
        let frame = http.frame();
        if frame.get(envelope::KEY).is_some() && body.len() > envelope::MAX_BODY {
            return Reply::error(
                413,
                format!(
                    "a body that is not JSON travels in base64: at most {} bytes",
                    envelope::MAX_BODY
                ),
                rid,
            );
        }
        let payload = frame.to_string().into_bytes();
        if payload.len() > MAX_FRAME {
            return Reply::error(413, format!("request over the {MAX_FRAME}-byte limit"), rid);
        }
        match self.sched.invoke(name, &payload, rid) {
            Ok(inv) => {
                let answer = serde_json::from_slice::<Value>(&inv.body).ok();
                let mut r = match answer.as_ref().and_then(envelope::response) {
                    Some(Ok(http)) => {
                        let status = if self.cluster && http.status == 503 {
                            500
                        } else {
                            http.status
                        };
                        let mut r = Reply::text(status, http.body, "application/octet-stream");
                        if status != http.status {
                            r.headers
                                .push(("X-Function-Status".into(), http.status.to_string()));
                        }
                        for (k, v) in http.headers {
                            if k == "content-type" {
                                r.content_type = v;
                            } else {
                                r.headers.push((k, v));
                            }
                        }
                        r
                    }
                    Some(Err(e)) => Reply::error(502, e, rid),
                    None => Reply::text(200, inv.body, "application/json"),
                };
                let is_error = answer.is_some_and(|v| v.get("error").is_some());
                if is_error {
                    self.sched.metrics.function_error(name);
                }
                if inv.start == Start::Warm && inv.queued.is_zero() {
                    self.sched
                        .metrics
                        .overhead(t0.elapsed().saturating_sub(inv.guest));
                }
                log::debug!(
                    "[{rid}] vm {} {}: queued {} us, launch {} us, guest {} us",
                    inv.vm,
                    inv.start.as_str(),
                    inv.queued.as_micros(),
                    inv.launch.as_micros(),
                    inv.guest.as_micros()
                );
                r.headers.push(("X-Vm-Id".into(), inv.vm.to_string()));
                r.headers
                    .push(("X-Start".into(), inv.start.as_str().to_string()));
                if is_error {
                    r.headers.push(("X-Function-Error".into(), "true".into()));
                }
                r
            }
            Err(SchedulerError::NoSuchFunction(_)) if self.provider.not_ready(name).is_some() => {
                let why = self.provider.not_ready(name).unwrap_or_default();
                Reply::error(503, why, rid)
            }
            Err(e) => {
                log::warn!("[{rid}] {e}");
                Reply::error(e.status(), e, rid)
            }
        }
    }

    /// The provider API under `/system/` (`rest` is the path after it).
    fn system(
        &self,
        req: &mut Request,
        method: &Method,
        rest: &[&str],
        query: &str,
        rid: &str,
    ) -> Reply {
        let authorization = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.as_str().to_string());
        if !self.provider.authorized(authorization.as_deref()) {
            let mut r = Reply::error(
                401,
                "/system/* needs HTTP basic authentication with the credentials of --basic_auth_dir",
                rid,
            );
            r.headers.push((
                "WWW-Authenticate".into(),
                format!("Basic realm=\"{REALM}\""),
            ));
            return r;
        }
        // A value that does not decode is refused as the namespace it names.
        let namespace = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("namespace="))
            .map(|v| percent_decode(v, true).unwrap_or_else(|| v.to_string()));
        if let Err(e) = check_namespace(namespace.as_deref()) {
            return Reply::error(400, e, rid);
        }
        let get = *method == Method::Get || *method == Method::Head;
        let p = &self.provider;
        // Guest memory arrives through these: never from anyone unasked.
        let moving = matches!(
            (rest, method),
            (["migrate"], Method::Post) | (["hibernated", _], Method::Put)
        );
        if moving && !p.has_credentials() {
            return Reply::error(
                403,
                "moving VMs between nodes needs multivm's --basic_auth_dir (the provider API's credentials)",
                rid,
            );
        }
        let moved = match (rest, method) {
            (["migrate"], Method::Post) => {
                let body = match read_body(req, SYSTEM_BODY_MAX, rid) {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                Some(match serde_json::from_slice::<MigrateRequest>(&body) {
                    Ok(m) => self
                        .sched
                        .migrate_out(&m.function, &m.target, authorization.as_deref())
                        .map(|v| (200, v)),
                    Err(e) => {
                        return Reply::error(400, format!("invalid migrate request: {e}"), rid)
                    }
                })
            }
            (["hibernated", name], Method::Put) => Some(match path_name(name) {
                Ok(name) => self
                    .sched
                    .migrate_in(&name, &mut req.as_reader())
                    .map(|v| (201, v)),
                Err(e) => return Reply::error(400, e, rid),
            }),
            (["migrate"], _) => return method_not_allowed("POST", rid),
            (["hibernated", _], _) => return method_not_allowed("PUT", rid),
            _ => None,
        };
        if let Some(result) = moved {
            return match result {
                Ok((status, v)) => Reply::json(status, &v),
                Err(e) => {
                    log::warn!("[{rid}] {e}");
                    Reply::error(e.status(), e, rid)
                }
            };
        }
        let result: Result<(u16, Value), ProviderError> = match (rest, method) {
            (["functions"], _) if get => Ok((200, p.list())),
            (["functions"], Method::Post | Method::Put | Method::Delete) => {
                let body = match read_body(req, SYSTEM_BODY_MAX, rid) {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match method {
                    Method::Delete => p.delete(&body).map(|()| (200, json!({}))),
                    m => p.deploy(&body, *m == Method::Put).map(|s| (202, s)),
                }
            }
            (["function", name], _) if get => path_name(name)
                .and_then(|name| p.status(&name))
                .map(|s| (200, s)),
            (["scale-function", name], Method::Post) => {
                let body = match read_body(req, SYSTEM_BODY_MAX, rid) {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                path_name(name)
                    .and_then(|name| p.scale(&name, &body))
                    .map(|()| (202, json!({})))
            }
            (["info"], _) if get => Ok((200, p.info())),
            (["namespaces"], _) if get => Ok((200, p.namespaces())),
            (["functions"], _) => return method_not_allowed("GET, POST, PUT, DELETE", rid),
            (["function", _] | ["info"] | ["namespaces"], _) => {
                return method_not_allowed("GET", rid)
            }
            (["scale-function", _], _) => return method_not_allowed("POST", rid),
            _ => {
                return Reply::error(
                    404,
                    format!("no such endpoint: /system/{}", rest.join("/")),
                    rid,
                )
            }
        };
        match result {
            Ok((status, v)) => Reply::json(status, &v),
            Err(e) => {
                log::info!("[{rid}] /system/{}: {e}", rest.join("/"));
                Reply::error(e.status(), e, rid)
            }
        }
    }
}

/// A function name from a `/system/` path segment, percent-decoded and
/// checked.
fn path_name(segment: &str) -> Result<String, ProviderError> {
    let name = percent_decode(segment, false).ok_or_else(|| {
        ProviderError::Invalid(format!(
            "function name {segment:?}: malformed percent-encoding"
        ))
    })?;
    check_name(&name)
        .map_err(|e| ProviderError::Invalid(format!("function name {name:?}: {e}")))?;
    Ok(name)
}

/// `s` with its `%XX` escapes decoded (RFC 3986, section 2.1) and, in a
/// query (`plus_is_space`), `+` read as a space as HTML forms write it;
/// `None` when an escape is malformed or the bytes are not UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let hex = |c: u8| char::from(c).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `POST /system/migrate`: move an idle VM of `function` to the multivm
/// at `target` (`HOST:PORT`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    function: String,
    target: String,
}

/// The request body, at most `max` bytes; otherwise the 400 or 413 reply.
fn read_body(req: &mut Request, max: usize, rid: &str) -> Result<Vec<u8>, Reply> {
    let mut body = Vec::new();
    if let Err(e) = req.as_reader().take(max as u64 + 1).read_to_end(&mut body) {
        return Err(Reply::error(
            400,
            format!("cannot read the request body: {e}"),
            rid,
        ));
    }
    if body.len() > max {
        return Err(Reply::error(
            413,
            format!("request body over the {max}-byte limit"),
            rid,
        ));
    }
    Ok(body)
}

/// The last `max` bytes of a file.
fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut b = Vec::new();
    f.take(max).read_to_end(&mut b)?;
    Ok(b)
}

fn method_not_allowed(allow: &str, rid: &str) -> Reply {
    let mut r = Reply::error(405, format!("method not allowed; use {allow}"), rid);
    r.headers.push(("Allow".into(), allow.to_string()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_decode_and_malformed_ones_are_refused() {
        assert_eq!(
            percent_decode("openfaas%2Dfn", true).as_deref(),
            Some("openfaas-fn")
        );
        assert_eq!(percent_decode("a%2Fb", false).as_deref(), Some("a/b"));
        assert_eq!(percent_decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%C3%A9", false).as_deref(), Some("\u{e9}"));
        for bad in ["%", "%4", "%zz", "%+f", "%FF"] {
            assert_eq!(percent_decode(bad, true), None, "{bad}");
        }
        assert!(path_name("hello%2Dapi").is_ok_and(|n| n == "hello-api"));
        for bad in ["a%2Fb", "a%00", "%", ".."] {
            assert!(path_name(bad).is_err(), "{bad}");
        }
    }
}
