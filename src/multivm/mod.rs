//! multivm: a daemon serving function invocations over HTTP from many
//! firerunner VMs within one memory budget.
//!
//! `multivm --config functions.yaml --mem 4096 --listen 127.0.0.1:8080`
//! reads the config (config.rs), prints `listening on http://ADDR` on
//! stdout once it accepts requests, and serves the API of http.rs with the
//! scheduler of scheduler.rs until SIGTERM or SIGINT. Then it stops
//! accepting, refuses queued requests (503), lets requests in progress
//! finish for up to `--drain_timeout`, fails the rest (502), kills every VM,
//! removes its runtime directory (sockets, console logs) and exits 0.
//!
//! A second SIGTERM/SIGINT during the drain exits at once (status 1); the
//! VMs then stop by themselves as their control channels close.
//!
//! Note: a Ctrl-C in a terminal also reaches the firerunner children (one
//! process group), which stop at once; their requests are answered 502.
//! Send SIGTERM to multivm alone for a clean drain.

pub mod config;
pub mod envelope;
pub mod hibernate;
pub mod http;
pub mod metrics;
pub mod migrate;
mod pool;
pub mod provider;
pub mod scheduler;
pub mod shells;
pub mod vm;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::cli::JailArgs;
use crate::launcher::{beside_exe, RuntimeDir};

use config::{Config, ConfigError};
use provider::auth::{AuthError, Credentials};
use provider::store::StoreError;
use provider::Provider;
use scheduler::Scheduler;

#[derive(Debug, thiserror::Error)]
pub enum MultiVmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--mem must be a positive number of MiB")]
    NoBudget,
    #[error("--listen {0:?}: expected [ADDR:]PORT")]
    BadListen(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("cannot block SIGTERM and SIGINT: {0}")]
    Signals(nix::Error),
    #[error("cannot create the runtime directory {path}: {source}")]
    RuntimeDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Server(std::io::Error),
    #[error("--basic_auth_dir: {0}")]
    Auth(#[from] AuthError),
    #[error("the deployed functions' state: {0}")]
    Store(#[from] StoreError),
    #[error(
        "functions with `network: true` need jailed VMs (their namespaces are named after the \
         jail slots): run multivm as root, without --no_jail"
    )]
    NetworkWithoutJail,
    #[error("the hibernation directory: {0}")]
    Hibernate(#[from] hibernate::HibernateError),
    #[error("the host's side of the VMs' network: {0}")]
    Network(#[from] crate::network::NetworkError),
}

pub struct Options {
    pub config: PathBuf,
    pub mem_mib: u64,
    pub listen: String,
    /// How long requests in progress may run on after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// firerunner to use when the config has no `firerunner_path`.
    pub default_firerunner: PathBuf,
    /// Where `basic-auth-user` and `basic-auth-password` are: `/system/*`
    /// then requires them.
    pub basic_auth_dir: Option<PathBuf>,
    /// Run every firerunner without its seccomp filters (debugging).
    pub no_seccomp: bool,
    /// How to jail the VMs (the config's `jail: false` also turns it off).
    pub jail: JailArgs,
    /// A node of a cluster behind a balancer that re-dispatches 503s: a
    /// function's own 503 is answered as 500 (see http.rs).
    pub cluster: bool,
}

/// `[ADDR:]PORT`; a bare port listens on loopback only.
pub fn parse_listen(s: &str) -> Result<SocketAddr, MultiVmError> {
    let bad = || MultiVmError::BadListen(s.to_string());
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// Runs the daemon until SIGTERM/SIGINT. Call it before starting any
/// thread: it blocks those signals so that only its own thread takes them.
pub fn run(opts: &Options) -> Result<(), MultiVmError> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(MultiVmError::Signals)?;

    if opts.mem_mib == 0 {
        return Err(MultiVmError::NoBudget);
    }
    let addr = parse_listen(&opts.listen)?;
    let mut cfg = Config::load(&opts.config, opts.mem_mib, opts.default_firerunner.clone())?;
    cfg.no_seccomp = opts.no_seccomp;
    let cfg = Arc::new(cfg);
    let credentials = opts
        .basic_auth_dir
        .as_deref()
        .map(Credentials::load)
        .transpose()?;
    let name = format!("multivm-{}", std::process::id());
    let dir = RuntimeDir::create(&name)
        .map_err(|source| MultiVmError::RuntimeDir { path: name, source })?;
    let server = tiny_http::Server::http(addr).map_err(|e| MultiVmError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let server = Arc::new(server);
    let bound = server
        .server_addr()
        .to_ip()
        .map_or_else(|| addr.to_string(), |a| a.to_string());

    // A VM's cgroup allows exactly what the budget counts for it.
    let jail = cfg
        .jail
        .then(|| opts.jail.options(beside_exe("jailer"), cfg.vm_overhead_mib))
        .flatten();
    if cfg.functions.iter().any(|f| f.network) {
        let Some(opts) = &jail else {
            return Err(MultiVmError::NetworkWithoutJail);
        };
        crate::network::install_host_rules()?;
        crate::jail::Slot::sweep_networks(opts);
    }
    let hibernation = cfg
        .hibernate
        .as_ref()
        .map(|h| hibernate::Store::open(&h.dir, h.disk_mib).map(Arc::new))
        .transpose()?;
    let sched = Scheduler::new(
        Arc::clone(&cfg),
        (jail, hibernation),
        opts.mem_mib,
        dir.path().to_path_buf(),
    );
    // Deployments must fit in what the shells leave of the budget.
    let vm_budget = cfg.vm_budget_mib(opts.mem_mib);
    let provider = Provider::start(Arc::clone(&sched), cfg, vm_budget, credentials)?;
    let refill = sched
        .shells()
        .map(|pool| {
            (0..shells::REFILLERS)
                .map(|i| {
                    let pool = Arc::clone(&pool);
                    std::thread::Builder::new()
                        .name(format!("shell-refill-{i}"))
                        .spawn(move || pool.refill())
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(MultiVmError::Thread)?
        .unwrap_or_default();
    let maintainer = {
        let s = Arc::clone(&sched);
        std::thread::Builder::new()
            .name("maintainer".into())
            .spawn(move || s.maintain())
            .map_err(MultiVmError::Thread)?
    };
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let server = Arc::downgrade(&server);
        let stopping = Arc::clone(&stopping);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match signals.wait() {
                    Ok(sig) if !stopping.swap(true, Ordering::SeqCst) => {
                        log::info!("{sig}: shutting down");
                        if let Some(s) = server.upgrade() {
                            s.unblock();
                        }
                    }
                    Ok(sig) => {
                        // A second signal: do not wait for the drain. The
                        // VMs stop when their control channels close.
                        log::warn!("{sig} again: exiting now");
                        std::process::exit(1);
                    }
                    Err(e) => {
                        log::error!("waiting for signals failed: {e}");
                        return;
                    }
                }
            })
            .map_err(MultiVmError::Thread)?;
    }
    let api = http::Api::new(Arc::clone(&sched), provider, opts.cluster);
    println!("listening on http://{bound}");
    let _ = std::io::stdout().flush();
    log::info!(
        "multivm: {} functions, budget {} MiB, listening on {bound}",
        sched.functions().len(),
        opts.mem_mib
    );

    let served = loop {
        match server.recv() {
            Ok(req) => api.dispatch(req),
            Err(_) if stopping.load(Ordering::SeqCst) => break Ok(()),
            Err(e) => break Err(MultiVmError::Server(e)),
        }
    };
    // Stop accepting (the accept thread ends with the server); requests
    // already read are refused rather than dropped.
    sched.begin_shutdown();
    while let Ok(Some(req)) = server.try_recv() {
        api.dispatch(req);
    }
    drop(server);
    sched.shutdown(opts.drain_timeout);
    api.wait_idle();
    let _ = maintainer.join();
    for r in refill {
        let _ = r.join();
    }
    drop(dir);
    log::info!("multivm stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_a_port_or_an_address() {
        assert_eq!(
            parse_listen("8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:81").unwrap(),
            "0.0.0.0:81".parse().unwrap()
        );
        assert_eq!(parse_listen("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        assert!(parse_listen("nope").is_err());
        assert!(parse_listen("70000").is_err());
    }
}
