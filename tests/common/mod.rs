//! Shared helpers for the integration tests: build testguest once, run
//! firerunner with a deadline, scratch directories.

#![allow(dead_code)] // each test binary uses a different subset

pub mod daemon;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The testguest ELF, built by scripts/build-testguest.sh on first use.
pub fn testguest() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-testguest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-testguest.sh");
        assert!(out.status.success(), "building testguest failed");
        let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
        let last = stdout.lines().last().expect("build script printed a path");
        PathBuf::from(last.trim())
    })
}

pub fn firerunner() -> &'static str {
    env!("CARGO_BIN_EXE_firerunner")
}

/// Names of the entries in `dir`, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("snapvm-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes a file and returns its path.
    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write scratch file");
        p
    }

    /// Names of the entries in the directory, sorted.
    pub fn entries(&self) -> Vec<String> {
        dir_entries(&self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished process left.
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Serial lines the guest printed with the `testguest: ` prefix, prefix removed.
    pub fn guest_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("testguest: "))
            .collect()
    }
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let s = child.wait().expect("wait after kill");
            let stdout = t_out.join().unwrap_or_default();
            let stderr = t_err.join().unwrap_or_default();
            panic!("process did not finish within {limit:?}\nstdout:\n{stdout}\nstderr:\n{stderr}\nstatus {s}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// firerunner on testguest with `args` (plus `--kernel`), 120 s at most.
pub fn run_testguest(extra: &[&str]) -> Outcome {
    let mut cmd = Command::new(firerunner());
    cmd.arg("--kernel").arg(testguest()).args(extra);
    run_with_deadline(cmd, Duration::from_secs(120))
}

pub fn singlevm() -> &'static str {
    env!("CARGO_BIN_EXE_singlevm")
}

/// A testguest appfs image: manifest lines, NUL-padded to 4 KiB.
pub fn app_image(scratch: &Scratch, name: &str, lines: &[&str]) -> PathBuf {
    let mut m = Vec::new();
    for l in lines {
        m.extend_from_slice(l.as_bytes());
        m.push(b'\n');
    }
    m.resize(4096, 0);
    scratch.file(name, &m)
}

/// Runs `cmd` with `input` on stdin, killing it after `limit`.
pub fn run_with_input(mut cmd: Command, input: Vec<u8>, limit: Duration) -> Outcome {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            if start.elapsed() > limit {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    let out = child.wait_with_output().expect("wait");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = feeder.join();
    let killed = watchdog.join().unwrap_or(false);
    let outcome = Outcome {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !killed,
        "process did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
        outcome.stdout, outcome.stderr
    );
    outcome
}

/// singlevm on testguest with `extra` flags, `input` on stdin; its runtime
/// files go to `scratch` (TMPDIR) so a test can check nothing is left.
pub fn run_singlevm(scratch: &Scratch, extra: &[&str], input: &str, limit: Duration) -> Outcome {
    let mut cmd = Command::new(singlevm());
    cmd.arg("--kernel")
        .arg(testguest())
        .args(extra)
        .env("TMPDIR", &scratch.0)
        .env_remove("XDG_RUNTIME_DIR");
    run_with_input(cmd, input.as_bytes().to_vec(), limit)
}

/// PIDs of `ancestor`'s descendants whose command name is `name`: its
/// children, and theirs.
pub fn descendants_named(ancestor: u32, name: &str) -> Vec<u32> {
    // (pid, command name, parent pid) of every process.
    let mut procs = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map(|x| x.1).unwrap_or("").to_string();
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        procs.push((pid, comm, ppid));
    }
    let mut tree = vec![ancestor];
    let mut out = Vec::new();
    while let Some(parent) = tree.pop() {
        for (pid, comm, ppid) in &procs {
            if *ppid == parent {
                tree.push(*pid);
                if comm == name {
                    out.push(*pid);
                }
            }
        }
    }
    out
}

/// (name, `Seccomp:` mode) of every thread of process `pid`.
pub fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:")));
    }
    out.sort();
    out
}

/// FNV-1a 64 of `bytes`, as testguest reports disk contents.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A child's output, collected by a thread.
pub fn collect(
    mut r: impl std::io::Read + Send + 'static,
) -> (
    std::sync::Arc<std::sync::Mutex<String>>,
    std::thread::JoinHandle<()>,
) {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let b = buf.clone();
    let h = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    (buf, h)
}

/// An HTTP response as the tests see it.
pub struct Reply {
    pub status: u16,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// One HTTP/1.1 exchange on a fresh connection, with a JSON body.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> Reply {
    http_with(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// One HTTP/1.1 exchange with the given headers and body. A server that
/// answers before reading the whole body (413) may close the connection
/// while it is being written: the answer is read all the same.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect to multivm");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += &format!("Content-Length: {}\r\n\r\n", body.len());
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let _ = s.write_all(&request);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw.get(split + 4..).unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {head:?}"));
    let headers: std::collections::BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            panic!("truncated chunked body");
        };
        let size = std::str::from_utf8(&raw[..eol]).unwrap_or_default();
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

/// Runs `ip ARGS` (iproute2), which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
