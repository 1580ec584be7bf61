//! The scheduler: per-function pools of idle VMs over one memory budget.
//!
//! Every request joins one global FIFO of waiters; [`State::pump`] hands
//! out what is free, oldest waiter first: an idle VM of its function (the
//! most recently used: warm start), or the right to launch a new one (cold
//! start) when the function is under its `concurrency_limit` and the
//! budget has room — made, if need be, by evicting idle VMs of any
//! function, least recently used first. A waiter that cannot be served
//! waits on its own channel (no spinning) until its function's
//! `request_timeout`; beyond `max_queue` waiters it is refused at once.
//!
//! Memory: a VM's footprint (`memory` + `vm_overhead` MiB) is reserved in
//! [`State::used_mib`] before its firerunner is spawned and released only
//! after the process is reaped. An eviction hands the evicted VMs'
//! reservations straight to the launch that needed them, and the launching
//! thread kills them before it spawns, so the processes alive at any time
//! never need more than the budget. `high_water_mib` records the peak.
//!
//! Functions come and go at run time ([`Scheduler::deploy`],
//! [`Scheduler::remove_function`]; see pool.rs for what an update and a
//! removal do to VMs and waiters): every lookup of a function happens
//! under the lock, and a VM carries the spec it was launched from.
//!
//! Locking: one mutex over [`State`], never held across a launch, a kill
//! or any guest I/O. A maintainer thread pre-warms `min_idle` VMs (only
//! from free memory, and only while nobody waits), stops VMs idle past
//! `idle_timeout` (keeping `min_idle`), and notices idle VMs that died.
//!
//! Idle VMs of `keep_state` functions are hibernated rather than killed
//! when evicted or timed out (hibernate.rs), in line: an eviction's
//! launch waits for the layer to be written, so that the memory it takes
//! over is free. A launch of such a function wakes its newest hibernated
//! VM, and falls back to a clean start when that fails.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Select, Sender};
use serde_json::{json, Value};

use crate::jail::JailOptions;

use super::config::{Config, Function, LaunchKind};
use super::hibernate::{Image, Kept, Store};
use super::metrics::{Gauges, Metrics};
use super::migrate::{self, MigrateError};
use super::pool::{self, FnId, VmState};
use super::shells::ShellPool;

type State = pool::State<FunctionVm>;
type Grant = pool::Grant<FunctionVm>;
type IdleVm = pool::IdleVm<FunctionVm>;
type Waiter = pool::Waiter<FunctionVm>;
use super::vm::{FunctionVm, VmError, VmId};

/// First and longest pause before retrying a failed pre-warm launch.
const PREWARM_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("no function named {0:?}")]
    NoSuchFunction(String),
    #[error("function {function} was removed while this request waited for a VM")]
    Removed { function: String },
    #[error("function {function} cannot run within the budget: {reason}")]
    Unfit { function: String, reason: String },
    #[error("function {function} has {max} requests waiting already; retry later")]
    QueueFull { function: String, max: usize },
    #[error("no VM of function {function} became free within {waited:?}; retry later")]
    QueueTimeout { function: String, waited: Duration },
    #[error("multivm is shutting down")]
    ShuttingDown,
    #[error("launching a VM of function {function} failed: {source}")]
    Launch { function: String, source: VmError },
    #[error(
        "timeout: function {function} gave no response within {timeout:?}; its VM was stopped"
    )]
    Timeout { function: String, timeout: Duration },
    #[error("the VM of function {function} failed: {source}")]
    Vm { function: String, source: VmError },
}

impl SchedulerError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            SchedulerError::NoSuchFunction(_) => 404,
            SchedulerError::Removed { .. } => 410,
            SchedulerError::Unfit { .. } => 400,
            // All three are answered before the function sees the request,
            // so a balancer may send it to another node (scripts/cluster.sh
            // re-dispatches 503s; HAProxy cannot retry on 429).
            SchedulerError::QueueFull { .. }
            | SchedulerError::QueueTimeout { .. }
            | SchedulerError::ShuttingDown => 503,
            SchedulerError::Launch { .. } | SchedulerError::Vm { .. } => 502,
            SchedulerError::Timeout { .. } => 504,
        }
    }
}

/// How the VM that served a request was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Warm,
    Cold(LaunchKind),
}

impl Start {
    pub fn as_str(self) -> &'static str {
        match self {
            Start::Warm => "warm",
            Start::Cold(LaunchKind::Boot) => "cold-boot",
            Start::Cold(LaunchKind::Shell) => "cold-shell",
            Start::Cold(LaunchKind::Restore) => "cold-restore",
            Start::Cold(LaunchKind::Wake) => "cold-wake",
        }
    }
}

/// A served request.
#[derive(Debug)]
pub struct Invocation {
    /// The function's JSON response, as the guest sent it.
    pub body: Vec<u8>,
    pub vm: VmId,
    pub start: Start,
    /// Time spent waiting in the queue.
    pub queued: Duration,
    /// Time spent launching the VM (cold starts).
    pub launch: Duration,
    /// Request sent to response received.
    pub guest: Duration,
}

/// A function as it is now: its spec and its VMs.
#[derive(Clone, Debug)]
pub struct FunctionLive {
    pub spec: Arc<Function>,
    pub launching: usize,
    pub idle: usize,
    pub busy: usize,
    pub queued: usize,
    /// Hibernated VMs waiting for a wake.
    pub hibernated: usize,
}

pub struct Scheduler {
    cfg: Arc<Config>,
    /// How VMs are jailed (none: unjailed).
    jail: Option<JailOptions>,
    /// Ready VM shells, when the config keeps some.
    shells: Option<Arc<ShellPool>>,
    /// Hibernated VMs of keep_state functions, when configured.
    hibernation: Option<Arc<Store>>,
    /// The budget for VMs: `--mem` less the shells' share.
    budget_mib: u64,
    log_dir: PathBuf,
    state: Mutex<State>,
    /// Notified whenever a VM stops being launching or busy (drain).
    changed: Condvar,
    reaper: Reaper,
    wake: Sender<()>,
    wake_rx: Receiver<()>,
    pub metrics: Arc<Metrics>,
}

/// Reaps the VMs evicted for launches off the launches' path: a VM's end
/// (its process reaped, its jail finished and removed, its network
/// namespace removed) takes 5-40 ms that a cold start need not wait for.
struct Reaper {
    tx: Mutex<Option<Sender<FunctionVm>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Reaper {
    fn start() -> Self {
        let (tx, rx) = unbounded::<FunctionVm>();
        let thread = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || rx.into_iter().for_each(FunctionVm::kill))
            .map_err(|e| {
                log::error!("cannot start the reaper thread (VMs are reaped in line): {e}")
            })
            .ok();
        Self {
            tx: Mutex::new(thread.as_ref().map(|_| tx)),
            thread: Mutex::new(thread),
        }
    }

    /// Stops evicted VMs now (SIGKILL: their memory, which already belongs
    /// to the launch that evicted them, is freed as they exit) and leaves
    /// the rest of their end to the reaper thread (in line once it is
    /// stopped).
    fn reap(&self, victims: Vec<FunctionVm>) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for mut v in victims {
            v.stop_now();
            match &tx {
                Some(tx) => {
                    if let Err(e) = tx.send(v) {
                        e.into_inner().kill();
                    }
                }
                None => v.kill(),
            }
        }
    }

    /// Waits until every VM handed over is reaped; later ones are reaped
    /// in line.
    fn stop(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Scheduler {
    /// A scheduler serving the functions of `cfg` (more come and go
    /// through [`Scheduler::deploy`] and [`Scheduler::remove_function`]);
    /// its VMs are jailed with `jail` when given. `budget_mib` is `--mem`;
    /// the shells' share of it is set aside. `hibernation` keeps the
    /// hibernated VMs of keep_state functions.
    pub fn new(
        cfg: Arc<Config>,
        (jail, hibernation): (Option<JailOptions>, Option<Arc<Store>>),
        budget_mib: u64,
        log_dir: PathBuf,
    ) -> Arc<Self> {
        let (wake, wake_rx) = bounded(1);
        let mut state = State::new(cfg.vm_overhead_mib);
        for f in &cfg.functions {
            state.put_function(Arc::new(f.clone()));
        }
        Arc::new(Self {
            state: Mutex::new(state),
            shells: ShellPool::new(&cfg, jail.clone()),
            budget_mib: cfg.vm_budget_mib(budget_mib),
            hibernation,
            cfg,
            jail,
            log_dir,
            changed: Condvar::new(),
            reaper: Reaper::start(),
            wake,
            wake_rx,
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// The pool of ready VM shells, if the config keeps some.
    pub fn shells(&self) -> Option<Arc<ShellPool>> {
        self.shells.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pump(&self, st: &mut State) {
        st.pump(self.budget_mib, &self.metrics, &self.log_dir);
        self.changed.notify_all();
        if self.maintainer_has_work(st) {
            let _ = self.wake.try_send(());
        }
    }

    /// Whether the maintainer would act now or sooner than it plans to:
    /// a VM to pre-warm, an idle VM it does not watch, or an idle timeout
    /// before its next timer. Keeps it asleep on the warm path.
    fn maintainer_has_work(&self, st: &State) -> bool {
        let now = Instant::now();
        for s in st.fns.values() {
            let f = &s.spec;
            if s.idle.iter().any(|i| !st.watched.contains(&i.vm.id)) {
                return true;
            }
            if let Some(at) = s.next_idle_expiry() {
                if st.maintainer_deadline.is_none_or(|d| at < d) {
                    return true;
                }
            }
            if s.idle.len() + s.prewarming < f.min_idle
                && st.queue.is_empty()
                && s.vms < f.concurrency_limit
                && st.used_mib + st.footprint(f) <= self.budget_mib
                && s.prewarm_retry.is_none_or(|(at, _)| at <= now)
            {
                return true;
            }
        }
        false
    }

    /// How this scheduler's VMs are jailed (none: unjailed).
    pub fn jail(&self) -> Option<&JailOptions> {
        self.jail.as_ref()
    }

    /// Registers `spec`, or updates the function of its name (see
    /// pool.rs: idle VMs of an old generation are stopped, busy ones when
    /// their request ends). Refused when it cannot run within the budget.
    pub fn deploy(&self, spec: Function) -> Result<(), SchedulerError> {
        let name = spec.name.clone();
        let old = {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(SchedulerError::ShuttingDown);
            }
            if let Err(reason) = st.check_fits(&spec, self.budget_mib) {
                return Err(SchedulerError::Unfit {
                    function: name,
                    reason,
                });
            }
            let (fid, old) = st.put_function(Arc::new(spec));
            if let (Some(h), Some(fs)) = (&self.hibernation, st.fns.get(&fid)) {
                h.forget(fid, Some(fs.generation));
            }
            self.pump(&mut st);
            old
        };
        for vm in old {
            log::info!(
                "stopping idle VM {} of {name}: the function was updated",
                vm.id
            );
            self.metrics.eviction(&name, "updated");
            self.remove(vm);
        }
        let _ = self.wake.try_send(());
        Ok(())
    }

    /// Whether `spec` could be deployed now (see [`pool::State::check_fits`]).
    pub fn check_fits(&self, spec: &Function) -> Result<(), SchedulerError> {
        self.lock()
            .check_fits(spec, self.budget_mib)
            .map_err(|reason| SchedulerError::Unfit {
                function: spec.name.clone(),
                reason,
            })
    }

    /// Unregisters function `name`: its waiting requests are answered
    /// [`SchedulerError::Removed`], its idle VMs are stopped now and its
    /// busy ones as their requests end.
    pub fn remove_function(&self, name: &str) -> Result<(), SchedulerError> {
        let idle = {
            let mut st = self.lock();
            if let (Some(h), Some(fid)) = (&self.hibernation, st.names.get(name)) {
                h.forget(*fid, None);
            }
            let idle = st
                .remove_function(name)
                .ok_or_else(|| SchedulerError::NoSuchFunction(name.to_string()))?;
            self.pump(&mut st);
            idle
        };
        for vm in idle {
            log::info!(
                "stopping idle VM {} of {name}: the function was removed",
                vm.id
            );
            self.metrics.eviction(name, "removed");
            self.remove(vm);
        }
        Ok(())
    }

    /// Every function, by name, with its VMs.
    pub fn functions(&self) -> Vec<FunctionLive> {
        let st = self.lock();
        let mut out: Vec<FunctionLive> = st
            .names
            .values()
            .filter_map(|fid| st.fns.get(fid).map(|s| (fid, s)))
            .map(|(fid, s)| {
                let count = |state: VmState| {
                    st.vms
                        .values()
                        .filter(|r| r.function == *fid && r.state == state)
                        .count()
                };
                FunctionLive {
                    spec: Arc::clone(&s.spec),
                    launching: count(VmState::Launching),
                    idle: count(VmState::Idle),
                    busy: count(VmState::Busy),
                    queued: s.queued,
                    hibernated: self.hibernation.as_ref().map_or(0, |h| h.waiting(*fid)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        out
    }

    /// Serves one request on a VM of the function called `function`.
    pub fn invoke(
        &self,
        function: &str,
        request: &[u8],
        rid: &str,
    ) -> Result<Invocation, SchedulerError> {
        let arrived = Instant::now();
        let mut launch = Duration::ZERO;
        let (mut vm, start, queued) = loop {
            let (grant, waited, fid, name) = self.acquire(function, arrived)?;
            let queued = if waited {
                arrived.elapsed()
            } else {
                Duration::ZERO
            };
            match grant {
                Grant::Refused => return Err(SchedulerError::ShuttingDown),
                Grant::Removed => return Err(SchedulerError::Removed { function: name }),
                Grant::Warm(mut vm) => {
                    if vm.is_healthy() {
                        break (vm, Start::Warm, queued);
                    }
                    log::warn!("[{rid}] idle VM {} of {name} died; trying another", vm.id);
                    self.metrics.crash(&name);
                    self.metrics.eviction(&name, "crashed");
                    self.remove(vm);
                }
                Grant::Launch {
                    id,
                    spec,
                    generation,
                    victims,
                } => {
                    // The image to wake is taken before the evicted VMs
                    // hibernate: theirs must not push it off the disk.
                    let image = self.take_image(fid, generation, &spec);
                    self.evict(victims);
                    let t = Instant::now();
                    match self.launch_vm((fid, generation, spec), id, image) {
                        Ok((vm, kind)) => {
                            launch = t.elapsed();
                            self.metrics.cold_start(&name, kind.as_str(), launch);
                            log::info!(
                                "[{rid}] launched VM {id} of {name} by {} in {} us",
                                kind.as_str(),
                                launch.as_micros()
                            );
                            let mut st = self.lock();
                            if st.shutting_down {
                                drop(st);
                                self.remove(vm);
                                return Err(SchedulerError::ShuttingDown);
                            }
                            st.set_state(id, VmState::Busy);
                            break (vm, Start::Cold(kind), queued);
                        }
                        Err(source) => {
                            log::warn!("[{rid}] launching VM {id} of {name} failed: {source}");
                            self.metrics.launch_failure(&name);
                            self.release_reservation(id);
                            return Err(SchedulerError::Launch {
                                function: name,
                                source,
                            });
                        }
                    }
                }
            }
        };
        let spec = Arc::clone(&vm.spec);
        let name = &spec.name;
        if start == Start::Warm {
            self.metrics.warm_start(name);
        }
        if !queued.is_zero() {
            self.metrics.queued(name, queued);
        }
        {
            let mut st = self.lock();
            let abort = vm.abort_handle();
            if let Some(r) = st.vms.get_mut(&vm.id) {
                r.abort = abort;
                r.served += 1;
            }
        }
        log::debug!("[{rid}] {name} on VM {} ({})", vm.id, start.as_str());
        let t = Instant::now();
        let result = vm.call(request, spec.request_timeout);
        let guest = t.elapsed();
        match result {
            Ok(body) => {
                let id = vm.id;
                self.release(vm);
                Ok(Invocation {
                    body,
                    vm: id,
                    start,
                    queued,
                    launch,
                    guest,
                })
            }
            Err(VmError::BadJson(e)) => {
                // The frame was read whole: the VM is still in step.
                self.release(vm);
                Err(SchedulerError::Vm {
                    function: name.clone(),
                    source: VmError::BadJson(e),
                })
            }
            Err(VmError::Timeout(timeout)) => {
                log::warn!(
                    "[{rid}] {name} timed out after {timeout:?}; stopping VM {}",
                    vm.id
                );
                self.metrics.timeout(name);
                self.remove(vm);
                Err(SchedulerError::Timeout {
                    function: name.clone(),
                    timeout,
                })
            }
            Err(source) => {
                log::warn!("[{rid}] VM {} of {name} failed: {source}", vm.id);
                self.metrics.crash(name);
                self.remove(vm);
                Err(SchedulerError::Vm {
                    function: name.clone(),
                    source,
                })
            }
        }
    }

    /// Waits for a grant: an idle VM or a launch reservation; `true` when
    /// the request had to wait in the queue for it; the function's
    /// registration and name.
    fn acquire(
        &self,
        name: &str,
        arrived: Instant,
    ) -> Result<(Grant, bool, FnId, String), SchedulerError> {
        let (tx, rx) = bounded(1);
        let wid;
        let spec;
        let fid;
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(SchedulerError::ShuttingDown);
            }
            let Some(function) = st.names.get(name).copied() else {
                return Err(SchedulerError::NoSuchFunction(name.to_string()));
            };
            fid = function;
            let Some(fs) = st.fns.get_mut(&function) else {
                return Err(SchedulerError::NoSuchFunction(name.to_string()));
            };
            fs.queued += 1;
            spec = Arc::clone(&fs.spec);
            wid = st.next_waiter;
            st.next_waiter += 1;
            st.queue.push_back(Waiter {
                id: wid,
                function: fid,
                tx,
            });
            self.pump(&mut st);
            let waiting = st.queue.iter().any(|w| w.id == wid);
            let full = |fs: &&mut pool::FnState<FunctionVm>| waiting && fs.queued > spec.max_queue;
            if let Some(fs) = st.fns.get_mut(&fid).filter(full) {
                fs.queued -= 1;
                st.queue.retain(|w| w.id != wid);
                self.metrics.queue_rejection(&spec.name);
                return Err(SchedulerError::QueueFull {
                    function: spec.name.clone(),
                    max: spec.max_queue,
                });
            }
        }
        let name = spec.name.clone();
        if let Ok(g) = rx.try_recv() {
            return Ok((g, false, fid, name));
        }
        match rx.recv_deadline(arrived + spec.request_timeout) {
            Ok(g) => Ok((g, true, fid, name)),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                let mut st = self.lock();
                let before = st.queue.len();
                st.queue.retain(|w| w.id != wid);
                if st.queue.len() < before {
                    if let Some(fs) = st.fns.get_mut(&fid) {
                        fs.queued -= 1;
                    }
                    return Err(SchedulerError::QueueTimeout {
                        function: name,
                        waited: arrived.elapsed(),
                    });
                }
                drop(st);
                // Granted just as the deadline passed: take it.
                rx.try_recv()
                    .map(|g| (g, true, fid, name))
                    .map_err(|_| SchedulerError::ShuttingDown)
            }
        }
    }

    fn log_path(&self, id: VmId) -> PathBuf {
        self.log_dir.join(format!("vm-{id}.log"))
    }

    /// Returns a healthy VM after a request: to its pool, or straight to a
    /// waiter; a VM whose function was since updated or removed is stopped.
    fn release(&self, vm: FunctionVm) {
        let mut st = self.lock();
        let current = st
            .fns
            .get(&vm.function)
            .is_some_and(|fs| fs.generation == vm.generation);
        if st.shutting_down || !current {
            drop(st);
            self.remove(vm);
            return;
        }
        st.set_state(vm.id, VmState::Idle);
        if let Some(fs) = st.fns.get_mut(&vm.function) {
            fs.idle.push(IdleVm {
                vm,
                since: Instant::now(),
            });
        }
        self.pump(&mut st);
    }

    /// Where VMs of `spec` hibernate: the store, for a keep_state function
    /// when multivm has one.
    fn store_for(&self, spec: &Function) -> Option<&Store> {
        self.hibernation.as_deref().filter(|_| spec.keep_state)
    }

    /// The newest hibernated VM of a keep_state function, if any.
    fn take_image(&self, fid: FnId, generation: u64, spec: &Function) -> Option<Image> {
        self.store_for(spec)?.take(fid, generation)
    }

    /// Launches VM `id` of a function and says how it started: a VM of a
    /// keep_state function wakes `image` (from [`Self::take_image`]) if
    /// its layers check out, and starts clean when they do not or the wake
    /// fails.
    fn launch_vm(
        &self,
        (fid, generation, spec): (FnId, u64, Arc<Function>),
        id: VmId,
        image: Option<Image>,
    ) -> Result<(FunctionVm, LaunchKind), VmError> {
        let log = self.log_path(id);
        let launch = |kept: Option<Kept>| {
            FunctionVm::launch(
                &self.cfg,
                self.jail.as_ref(),
                self.shells.as_deref(),
                (fid, generation, Arc::clone(&spec)),
                (id, kept),
                &log,
            )
        };
        let Some(store) = self.store_for(&spec) else {
            let vm = launch(None)?;
            let kind = if vm.from_shell {
                LaunchKind::Shell
            } else {
                spec.launch_kind()
            };
            return Ok((vm, kind));
        };
        let name = &spec.name;
        let dir = || store.vm_dir(id).map_err(|e| VmError::Launch(e.to_string()));
        if let Some(image) = image {
            match image.verify() {
                Err(e) => {
                    log::warn!("not waking a hibernated VM of {name}: {e}; starting it clean");
                    self.metrics.wake(name, "refused");
                }
                Ok(()) => {
                    let kept = Kept {
                        dir: dir()?,
                        chain: image.chain,
                    };
                    match launch(Some(kept)) {
                        Ok(vm) => {
                            self.metrics.wake(name, "ok");
                            return Ok((vm, LaunchKind::Wake));
                        }
                        Err(e) => {
                            log::warn!(
                                "waking a hibernated VM of {name} failed: {e}; starting it clean"
                            );
                            self.metrics.wake(name, "failed");
                        }
                    }
                }
            }
        }
        let kept = Kept {
            dir: dir()?,
            chain: Vec::new(),
        };
        Ok((launch(Some(kept))?, spec.launch_kind()))
    }

    /// Stops the idle VMs evicted for a launch, whose memory the launch
    /// already holds: a keep_state function's VM is hibernated first (in
    /// line, so its memory is free when this returns), the others are
    /// killed (their end reaped off this path).
    fn evict(&self, victims: Vec<FunctionVm>) {
        let (keep, kill): (Vec<_>, Vec<_>) = victims
            .into_iter()
            .partition(|v| self.store_for(&v.spec).is_some());
        self.reaper.reap(kill);
        for vm in keep {
            self.hibernate(vm);
        }
    }

    /// Hibernates an idle VM of a keep_state function and keeps the image
    /// (or, failing that, it is gone with its state); its memory
    /// reservation is the caller's.
    fn hibernate(&self, vm: FunctionVm) {
        if let (Some(image), Some(store)) = (self.hibernate_image(vm), &self.hibernation) {
            self.metrics.hibernated_dropped(store.keep(image));
        }
    }

    /// Hibernates a VM of a keep_state function into an image not yet kept
    /// anywhere; `None` when that failed (the VM is gone with its state).
    fn hibernate_image(&self, vm: FunctionVm) -> Option<Image> {
        let store = self.hibernation.as_ref()?;
        let (id, key, name) = (vm.id, (vm.function, vm.generation), vm.spec.name.clone());
        let t = Instant::now();
        let result = vm
            .hibernate(self.cfg.boot_timeout)
            .map_err(|e| e.to_string())
            .and_then(|mut kept| {
                let chain = std::mem::take(&mut kept.chain);
                store
                    .adopt(key, &kept.dir, chain)
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(image) => {
                log::info!(
                    "hibernated VM {id} of {name} in {} us ({} KiB of layers on disk)",
                    t.elapsed().as_micros(),
                    store.disk_bytes() >> 10
                );
                self.metrics.hibernation(&name, "ok", t.elapsed());
                Some(image)
            }
            Err(e) => {
                log::warn!("hibernating VM {id} of {name} failed, its state is lost: {e}");
                self.metrics.hibernation(&name, "failed", t.elapsed());
                None
            }
        }
    }

    /// Moves an idle VM of keep_state function `name` to the multivm at
    /// `target` (`host:port`): hibernates it, sends its layers there
    /// (`PUT /system/hibernated/NAME`, with `authorization`), and keeps
    /// the image here again if the target does not take it, so that the
    /// VM's state is never lost to a failed move.
    pub fn migrate_out(
        &self,
        name: &str,
        target: &str,
        authorization: Option<&str>,
    ) -> Result<Value, MigrateError> {
        let t = Instant::now();
        let store = self.hibernation.as_ref().ok_or(MigrateError::NotKept)?;
        let vm = {
            let mut st = self.lock();
            let (_, fs) = kept_function(&mut st, name)?;
            let vm = fs.idle.pop().ok_or(MigrateError::NoIdleVm)?.vm;
            st.set_state(vm.id, VmState::Busy);
            vm
        };
        let id = vm.id;
        let image = self.hibernate_image(vm);
        self.release_reservation(id);
        let image = image.ok_or(MigrateError::Hibernate)?;
        let bytes = Store::stream_len(&image)?;
        match migrate::put_image(target, name, authorization, &image, bytes) {
            Ok(()) => {
                self.metrics.migration(name, "out");
                log::info!(
                    "moved VM {id} of {name} to {target}: {bytes} bytes in {} us",
                    t.elapsed().as_micros()
                );
                Ok(json!({
                    "function": name,
                    "vm": id,
                    "target": target,
                    "bytes": bytes,
                    "ms": t.elapsed().as_millis() as u64,
                }))
            }
            Err(e) => {
                log::warn!(
                    "moving VM {id} of {name} to {target} failed: {e}; it stays hibernated here"
                );
                self.metrics.hibernated_dropped(store.keep(image));
                Err(e)
            }
        }
    }

    /// Takes in a VM another node moved here (`Store::send`'s stream on
    /// `input`), as a hibernated VM of function `name` that its next
    /// launch wakes.
    pub fn migrate_in(
        &self,
        name: &str,
        input: &mut impl std::io::Read,
    ) -> Result<Value, MigrateError> {
        let store = self.hibernation.as_ref().ok_or(MigrateError::NotKept)?;
        let (fid, generation, spec) = {
            let mut st = self.lock();
            let (fid, fs) = kept_function(&mut st, name)?;
            (fid, fs.generation, Arc::clone(&fs.spec))
        };
        let image = store.receive(
            (fid, generation),
            input,
            spec.memory_mib << 20,
            &spec.layers(),
        )?;
        let layers = image.chain.len();
        self.metrics.hibernated_dropped(store.keep(image));
        self.metrics.migration(name, "in");
        Ok(json!({"function": name, "layers": layers, "hibernated": store.waiting(fid)}))
    }

    /// Kills a VM and returns its memory.
    fn remove(&self, vm: FunctionVm) {
        let id = vm.id;
        vm.kill();
        self.release_reservation(id);
    }

    /// Returns the memory of a VM that is gone or never started.
    fn release_reservation(&self, id: VmId) {
        let mut st = self.lock();
        st.drop_record(id);
        self.pump(&mut st);
    }

    /// The maintainer: pre-warming, idle timeouts, dead idle VMs. Returns
    /// when the scheduler has shut down.
    pub fn maintain(self: &Arc<Self>) {
        loop {
            let now = Instant::now();
            let mut victims = Vec::new();
            let mut launches = Vec::new();
            let mut watched: Vec<(VmId, FnId, Receiver<crate::control::Event>)> = Vec::new();
            let mut next: Option<Instant> = None;
            {
                let mut st = self.lock();
                if st.shutting_down {
                    return;
                }
                let fids: Vec<FnId> = st.fns.keys().copied().collect();
                for fi in fids {
                    let need = st.footprint(&st.fns[&fi].spec);
                    let queue_empty = st.queue.is_empty();
                    let Some(s) = st.fns.get_mut(&fi) else {
                        continue;
                    };
                    let f = Arc::clone(&s.spec);
                    // Idle timeouts: the oldest beyond min_idle.
                    let spare = s.idle.len().saturating_sub(f.min_idle);
                    let expired = s
                        .idle
                        .iter()
                        .take(spare)
                        .take_while(|i| i.since + f.idle_timeout <= now)
                        .count();
                    for idle in s.idle.drain(..expired).collect::<Vec<_>>() {
                        log::info!(
                            "VM {} of {} idle for {:?}; stopping it",
                            idle.vm.id,
                            f.name,
                            f.idle_timeout
                        );
                        self.metrics.eviction(&f.name, "idle_timeout");
                        victims.push(idle.vm);
                    }
                    if let Some(at) = s.next_idle_expiry() {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    // Pre-warming: free memory only, never while anyone waits.
                    let want = f.min_idle.saturating_sub(s.idle.len() + s.prewarming);
                    let retry_ok = s.prewarm_retry.is_none_or(|(at, _)| at <= now);
                    if let Some((at, _)) = s.prewarm_retry.filter(|_| want > 0 && !retry_ok) {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    for _ in 0..want {
                        let vms = st.fns.get(&fi).map_or(usize::MAX, |s| s.vms);
                        if !retry_ok
                            || !queue_empty
                            || vms >= f.concurrency_limit
                            || st.used_mib + need > self.budget_mib
                        {
                            break;
                        }
                        let Some(id) = st.new_record(fi, &self.log_dir) else {
                            break;
                        };
                        let Some(s) = st.fns.get_mut(&fi) else {
                            break;
                        };
                        s.prewarming += 1;
                        launches.push((fi, s.generation, Arc::clone(&f), id));
                    }
                }
                st.watched.clear();
                let mut ids = Vec::new();
                for (fi, s) in &st.fns {
                    for i in &s.idle {
                        watched.push((i.vm.id, *fi, i.vm.events()));
                        ids.push(i.vm.id);
                    }
                }
                st.watched.extend(ids);
                st.maintainer_deadline = next;
            }
            // Their memory returns once each is reaped (or hibernated).
            for vm in victims {
                if self.store_for(&vm.spec).is_some() {
                    let id = vm.id;
                    self.hibernate(vm);
                    self.release_reservation(id);
                } else {
                    self.remove(vm);
                }
            }
            for (fi, generation, spec, id) in launches {
                let me = Arc::clone(self);
                let spawned = std::thread::Builder::new()
                    .name(format!("prewarm-{id}"))
                    .spawn(move || me.prewarm((fi, generation, spec), id));
                if let Err(e) = spawned {
                    log::error!("cannot start a pre-warm thread: {e}");
                    let mut st = self.lock();
                    if let Some(s) = st.fns.get_mut(&fi) {
                        s.prewarming -= 1;
                    }
                    drop(st);
                    self.release_reservation(id);
                }
            }
            // Sleep until woken, a deadline, or an idle VM's firerunner reports.
            let mut sel = Select::new();
            sel.recv(&self.wake_rx);
            for (_, _, rx) in &watched {
                sel.recv(rx);
            }
            let ready = match next {
                Some(at) => sel.ready_deadline(at).ok(),
                None => Some(sel.ready()),
            };
            match ready {
                Some(0) => {
                    let _ = self.wake_rx.try_recv();
                }
                Some(i) => {
                    let (id, fi, rx) = &watched[i - 1];
                    let dead = loop {
                        match rx.try_recv() {
                            Ok(crate::control::Event::Exit { .. }) => break true,
                            Ok(_) => {}
                            Err(crossbeam_channel::TryRecvError::Empty) => break false,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => break true,
                        }
                    };
                    if dead {
                        self.drop_dead_idle(*id, *fi);
                    }
                }
                None => {}
            }
        }
    }

    /// Removes idle VM `id` whose firerunner has exited.
    fn drop_dead_idle(&self, id: VmId, fi: FnId) {
        let vm = {
            let mut st = self.lock();
            let Some(s) = st.fns.get_mut(&fi) else {
                return;
            };
            let Some(pos) = s.idle.iter().position(|i| i.vm.id == id) else {
                return;
            };
            s.idle.remove(pos).vm
        };
        let name = vm.spec.name.clone();
        log::warn!("idle VM {id} of {name} exited; removing it");
        self.metrics.crash(&name);
        self.metrics.eviction(&name, "crashed");
        self.remove(vm);
    }

    /// Launches one pre-warmed VM into the idle pool.
    fn prewarm(&self, (fi, generation, spec): (FnId, u64, Arc<Function>), id: VmId) {
        let t = Instant::now();
        let name = spec.name.clone();
        let image = self.take_image(fi, generation, &spec);
        match self.launch_vm((fi, generation, spec), id, image) {
            Ok((vm, kind)) => {
                self.metrics.cold_start(&name, kind.as_str(), t.elapsed());
                log::info!(
                    "pre-warmed VM {id} of {name} in {} us",
                    t.elapsed().as_micros()
                );
                let mut st = self.lock();
                if let Some(s) = st.fns.get_mut(&fi) {
                    s.prewarming -= 1;
                    s.prewarm_retry = None;
                }
                drop(st);
                self.release(vm);
            }
            Err(e) => {
                log::warn!("pre-warming a VM of {name} failed: {e}");
                self.metrics.launch_failure(&name);
                let mut st = self.lock();
                if let Some(s) = st.fns.get_mut(&fi) {
                    s.prewarming -= 1;
                    let pause = s
                        .prewarm_retry
                        .map_or(PREWARM_BACKOFF.0, |(_, p)| (p * 2).min(PREWARM_BACKOFF.1));
                    s.prewarm_retry = Some((Instant::now() + pause, pause));
                }
                drop(st);
                self.release_reservation(id);
            }
        }
    }

    /// From now on new requests are refused (503) and no VM is launched
    /// for the pool; [`Scheduler::shutdown`] does the rest.
    pub fn begin_shutdown(&self) {
        self.lock().shutting_down = true;
        let _ = self.wake.try_send(());
    }

    /// Stops taking requests, refuses the queued ones, stops idle VMs,
    /// lets requests in progress finish for up to `drain`, then fails the
    /// rest by cutting their VMs' connections; returns once every VM is gone.
    pub fn shutdown(&self, drain: Duration) {
        if let Some(p) = &self.shells {
            p.stop();
        }
        let victims: Vec<FunctionVm> = {
            let mut st = self.lock();
            st.shutting_down = true;
            for w in std::mem::take(&mut st.queue) {
                let _ = w.tx.send(Grant::Refused);
            }
            let mut v = Vec::new();
            for fs in st.fns.values_mut() {
                fs.queued = 0;
                v.extend(fs.idle.drain(..).map(|i| i.vm));
            }
            v
        };
        let _ = self.wake.try_send(());
        for vm in victims {
            self.remove(vm);
        }
        let deadline = Instant::now() + drain;
        let mut st = self.lock();
        let mut aborted = BTreeSet::new();
        while !st.vms.is_empty() {
            let now = Instant::now();
            let wait = if now >= deadline {
                // Past the drain: cut every busy VM's connection (again for
                // ones that turned busy since), failing its request at once.
                for (id, r) in &st.vms {
                    if let Some(s) = &r.abort {
                        if aborted.insert(*id) {
                            log::warn!("VM {id} still busy after {drain:?}; failing its request");
                        }
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                }
                // Launches in progress end within boot_timeout.
                Duration::from_millis(100)
            } else {
                deadline - now
            };
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        for (_, log) in st.gone_logs.drain(..) {
            let _ = std::fs::remove_file(log);
        }
        drop(st);
        self.reaper.stop();
    }

    /// Live numbers for /metrics.
    pub fn gauges(&self) -> Gauges {
        let fns = self.functions();
        let st = self.lock();
        let mut vms = Vec::new();
        let mut queue_depth = Vec::new();
        let mut hibernated = Vec::new();
        for f in fns {
            let name = &f.spec.name;
            vms.push((name.clone(), VmState::Launching.as_str(), f.launching));
            vms.push((name.clone(), VmState::Idle.as_str(), f.idle));
            vms.push((name.clone(), VmState::Busy.as_str(), f.busy));
            queue_depth.push((name.clone(), f.queued));
            hibernated.push((name.clone(), f.hibernated));
        }
        // The shells' share is reserved whether they are ready or not.
        let shells_mib = self.cfg.shells_mib();
        Gauges {
            memory_used_mib: st.used_mib + shells_mib,
            memory_budget_mib: self.budget_mib + shells_mib,
            memory_high_water_mib: st.high_water_mib + shells_mib,
            vms,
            queue_depth,
            shells_ready: self.shells.as_ref().map_or_else(Vec::new, |p| p.counts()),
            hibernated,
            hibernate_disk_bytes: self.hibernation.as_ref().map(|h| h.disk_bytes()),
        }
    }

    /// GET /vms.
    pub fn vms_json(&self) -> Value {
        let st = self.lock();
        let now = Instant::now();
        Value::Array(
            st.vms
                .iter()
                .map(|(id, r)| {
                    json!({
                        "id": id,
                        "function": r.name,
                        "state": r.state.as_str(),
                        "launch": r.kind.as_str(),
                        "memory_mib": r.mib,
                        "age_ms": now.duration_since(r.created).as_millis() as u64,
                        "state_ms": now.duration_since(r.changed).as_millis() as u64,
                        "requests": r.served,
                    })
                })
                .collect(),
        )
    }

    /// GET /functions.
    pub fn functions_json(&self) -> Value {
        Value::Array(
            self.functions()
                .into_iter()
                .map(|l| {
                    let f = &l.spec;
                    json!({
                        "name": f.name,
                        "launch": f.launch_kind().as_str(),
                        "memory_mib": f.memory_mib,
                        "vcpus": f.vcpus,
                        "concurrency_limit": f.concurrency_limit,
                        "min_idle": f.min_idle,
                        "keep_state": f.keep_state,
                        "hibernated": l.hibernated,
                        "max_queue": f.max_queue,
                        "idle_timeout_ms": f.idle_timeout.as_millis() as u64,
                        "request_timeout_ms": f.request_timeout.as_millis() as u64,
                        "vms": {
                            "launching": l.launching,
                            "idle": l.idle,
                            "busy": l.busy,
                        },
                        "queued": l.queued,
                        "warm_starts": self.metrics.warm_starts(&f.name),
                        "cold_starts": self.metrics.cold_starts(&f.name),
                    })
                })
                .collect(),
        )
    }

    /// The console log of VM `id`, live or recently stopped.
    pub fn vm_log(&self, id: VmId) -> Option<PathBuf> {
        let st = self.lock();
        st.vms.get(&id).map(|r| r.log.clone()).or_else(|| {
            st.gone_logs
                .iter()
                .find(|(g, _)| *g == id)
                .map(|(_, p)| p.clone())
        })
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }
}

/// The id and registration of keep_state function `name`, for a move.
fn kept_function<'a>(
    st: &'a mut State,
    name: &str,
) -> Result<(FnId, &'a mut pool::FnState<FunctionVm>), MigrateError> {
    let fid = st
        .names
        .get(name)
        .copied()
        .ok_or_else(|| MigrateError::NoSuchFunction(name.into()))?;
    let fs = st
        .fns
        .get_mut(&fid)
        .ok_or_else(|| MigrateError::NoSuchFunction(name.into()))?;
    if fs.spec.keep_state {
        Ok((fid, fs))
    } else {
        Err(MigrateError::NotKept)
    }
}
