//! multivm's pool of VM shells (`firerunner shell`, src/vmm/shell.rs):
//! per configured shape (`shells:` in the config), `count` shells are kept
//! ready — started, jailed like every VM, their VM, vCPUs and memory slots
//! made — so that a function that restores takes one and only names its
//! snapshot, instead of spawning firerunner. Refill threads
//! ([`REFILLERS`], each starting one shell at a time) replace what is
//! taken, and shells that die while they wait; one is handed out only if
//! it still runs. Their cost is carved out of the budget up front
//! ([`super::config::Config::shells_mib`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError};

use super::config::{Config, ShellShape};
use crate::control::Event;
use crate::jail::JailOptions;
use crate::launcher::{Launch, VmProcess};

/// Shells started at once: a start is mostly waiting (exec, the jail,
/// KVM registering the memory slots), so under a stream of cold starts
/// one refiller falls behind.
pub const REFILLERS: usize = 2;
/// How long a new shell may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the refill thread looks for shells that died while waiting.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// First and longest pause after a shell failed to start.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// (guest memory MiB, vCPUs).
pub type Shape = (u64, u64);

/// The ready shells of every configured shape.
pub struct ShellPool {
    shapes: Vec<ShellShape>,
    ready: Mutex<Shells>,
    launch: Launch,
    stopping: AtomicBool,
    wake: Sender<()>,
    wake_rx: Receiver<()>,
}

/// Per shape: the ready shells, and how many are being started.
#[derive(Default)]
struct Shells {
    ready: BTreeMap<Shape, Vec<VmProcess>>,
    starting: BTreeMap<Shape, usize>,
}

impl ShellPool {
    /// The pool for `cfg`'s shells (none configured: `None`), their
    /// firerunners jailed with `jail` when given. Call [`ShellPool::refill`]
    /// on [`REFILLERS`] threads of their own.
    pub fn new(cfg: &Config, jail: Option<JailOptions>) -> Option<Arc<Self>> {
        if cfg.shells.is_empty() {
            return None;
        }
        let (wake, wake_rx) = bounded(REFILLERS);
        let mut vm_args = vec!["shell".into()];
        if cfg.no_seccomp {
            vm_args.push("--no_seccomp".into());
        }
        Some(Arc::new(Self {
            shapes: cfg.shells.clone(),
            ready: Mutex::new(Shells::default()),
            launch: Launch {
                firerunner: cfg.firerunner.clone(),
                vm_args,
                console: None,
                jail,
                network: false,
            },
            stopping: AtomicBool::new(false),
            wake,
            wake_rx,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Shells> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready shell of `shape`, if one is left; the dead ones met on the
    /// way are dropped (killed and reaped).
    pub fn take(&self, shape: Shape) -> Option<VmProcess> {
        let mut dead = Vec::new();
        let found = {
            let mut shells = self.lock();
            let list = shells.ready.get_mut(&shape)?;
            loop {
                let Some(mut sh) = list.pop() else {
                    break None;
                };
                if alive(&mut sh) {
                    break Some(sh);
                }
                dead.push(sh);
            }
        };
        if !dead.is_empty() {
            log::warn!(
                "{} shell(s) of {shape:?} died while they waited",
                dead.len()
            );
        }
        let _ = self.wake.try_send(());
        found
    }

    /// Ready shells per shape, for the metrics.
    pub fn counts(&self) -> Vec<(Shape, usize)> {
        let shells = self.lock();
        self.shapes
            .iter()
            .map(|s| {
                let shape = (s.memory_mib, s.vcpus);
                (shape, shells.ready.get(&shape).map_or(0, Vec::len))
            })
            .collect()
    }

    /// Keeps every shape at its count, with the other refillers, until
    /// [`ShellPool::stop`]; then stops the shells left.
    pub fn refill(&self) {
        let mut backoff: Option<(Instant, Duration)> = None;
        while !self.stopping.load(Ordering::SeqCst) {
            let waiting = backoff.is_some_and(|(until, _)| Instant::now() < until);
            let missing = if waiting { None } else { self.reserve() };
            match missing {
                Some(shape) => match self.start(shape) {
                    Ok(sh) => {
                        backoff = None;
                        let mut shells = self.lock();
                        *shells.starting.entry(shape).or_default() -= 1;
                        shells.ready.entry(shape).or_default().push(sh);
                    }
                    Err(why) => {
                        *self.lock().starting.entry(shape).or_default() -= 1;
                        log::warn!("a shell of {shape:?} did not start: {why}");
                        let pause = backoff.map_or(BACKOFF.0, |(_, p)| (p * 2).min(BACKOFF.1));
                        backoff = Some((Instant::now() + pause, pause));
                    }
                },
                None => {
                    let _ = self.wake_rx.recv_timeout(CHECK_EVERY);
                    self.drop_dead();
                }
            }
        }
        let left: Vec<VmProcess> = std::mem::take(&mut self.lock().ready)
            .into_values()
            .flatten()
            .collect();
        drop(left);
    }

    /// Makes [`ShellPool::refill`] stop the shells and return.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in 0..REFILLERS {
            let _ = self.wake.try_send(());
        }
    }

    /// The first shape short of its count, ready and starting shells
    /// together; one more of it is then counted as starting.
    fn reserve(&self) -> Option<Shape> {
        let mut shells = self.lock();
        let shape = self.shapes.iter().find_map(|s| {
            let shape = (s.memory_mib, s.vcpus);
            let have = shells.ready.get(&shape).map_or(0, Vec::len)
                + shells.starting.get(&shape).copied().unwrap_or(0);
            (have < s.count).then_some(shape)
        })?;
        *shells.starting.entry(shape).or_default() += 1;
        Some(shape)
    }

    /// Drops (kills and reaps) the ready shells that died.
    fn drop_dead(&self) {
        let mut dead = Vec::new();
        for list in self.lock().ready.values_mut() {
            let mut live = Vec::new();
            for mut sh in list.drain(..) {
                if alive(&mut sh) {
                    live.push(sh);
                } else {
                    dead.push(sh);
                }
            }
            *list = live;
        }
        if !dead.is_empty() {
            log::warn!("{} ready shell(s) died; replacing them", dead.len());
        }
    }

    /// Starts one shell of `shape` and waits until it is ready.
    fn start(&self, (mib, vcpus): Shape) -> Result<VmProcess, String> {
        let mut launch = self.launch.clone();
        launch.vm_args.extend([
            "--mem_size".into(),
            mib.to_string().into(),
            "--vcpu_count".into(),
            vcpus.to_string().into(),
        ]);
        let mut sh = VmProcess::spawn(&launch).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match sh.events().recv_deadline(deadline) {
                Ok(Event::ShellReady { .. }) => return Ok(sh),
                Ok(_) => {}
                Err(_) => {
                    sh.kill();
                    return Err(format!(
                        "not ready within {READY_TIMEOUT:?}{}",
                        sh.failure_detail()
                    ));
                }
            }
        }
    }
}

/// Whether a waiting shell still runs and has said nothing since it was
/// ready.
fn alive(sh: &mut VmProcess) -> bool {
    sh.try_status().is_none() && matches!(sh.events().try_recv(), Err(TryRecvError::Empty))
}
