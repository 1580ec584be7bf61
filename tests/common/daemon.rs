//! A multivm daemon under test: started on a loopback port with its own
//! runtime directory, talked to over HTTP, stopped by SIGTERM or killed on
//! drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{collect, descendants_named, http, Reply, Scratch};

pub fn multivm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_multivm")
}

/// A running multivm; SIGKILLed on drop if a test did not stop it.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    stderr: Arc<std::sync::Mutex<String>>,
    /// XDG_RUNTIME_DIR of the daemon: everything it creates lives here.
    pub runtime: PathBuf,
}

impl Daemon {
    pub fn start(s: &Scratch, config: &str, mem: u64, extra: &[&str]) -> Daemon {
        Self::start_env(s, config, mem, extra, &[])
    }

    /// As `start`, with `env` added to the daemon's environment.
    pub fn start_env(
        s: &Scratch,
        config: &str,
        mem: u64,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let cfg = s.file("multivm.yaml", config.as_bytes());
        Self::spawn(Path::new(multivm_bin()), s, &cfg, mem, extra, env)
    }

    /// `bin` (a multivm) on the config file `cfg`, with `--mem mem`,
    /// `extra` arguments and `env`; its runtime directory in `s`.
    pub fn spawn(
        bin: &Path,
        s: &Scratch,
        cfg: &Path,
        mem: u64,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let runtime = s.path("run");
        std::fs::create_dir_all(&runtime).unwrap();
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(cfg)
            .args(["--mem", &mem.to_string()])
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn multivm");
        let (stderr, _) = collect(child.stderr.take().unwrap());
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "multivm did not start: {line:?}\n{}",
                stderr.lock().unwrap()
            );
        };
        Daemon {
            addr: addr.to_string(),
            child,
            stderr,
            runtime,
        }
    }

    pub fn post(&self, function: &str, body: &str) -> Reply {
        http(&self.addr, "POST", &format!("/function/{function}"), body)
    }

    pub fn get(&self, path: &str) -> Reply {
        http(&self.addr, "GET", path, "")
    }

    pub fn metric(&self, sample: &str) -> f64 {
        let page = self.get("/metrics").body;
        snapvm::multivm::metrics::sample(&page, sample).unwrap_or(0.0)
    }

    pub fn vms(&self) -> Vec<Value> {
        self.get("/vms")
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls `cond` every 20 ms for up to `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Daemon) -> bool) {
        let t = Instant::now();
        while !cond(self) {
            assert!(
                t.elapsed() < limit,
                "timed out waiting for {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// firerunner processes this daemon started.
    pub fn firerunners(&self) -> Vec<u32> {
        descendants_named(self.child.id(), "firerunner")
    }

    /// SIGTERM, then the exit status within `limit`.
    pub fn terminate(self, limit: Duration) -> (Option<i32>, String) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped
        // (we still own the Child), so the pid is not reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(limit)
    }

    /// The exit status within `limit`, and everything it logged.
    pub fn wait_exit(mut self, limit: Duration) -> (Option<i32>, String) {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return (s.code(), self.log());
            }
            assert!(
                t.elapsed() < limit,
                "multivm did not stop within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
