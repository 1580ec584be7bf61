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
//! Locking: one mutex over [`State`], never held across a launch, a kill
//! or any guest I/O. A maintainer thread pre-warms `min_idle` VMs (only
//! from free memory, and only while nobody waits), stops VMs idle past
//! `idle_timeout` (keeping `min_idle`), and notices idle VMs that died.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Select, Sender};
use serde_json::{json, Value};

use crate::jail::JailOptions;

use super::config::{Config, LaunchKind};
use super::metrics::{Gauges, Metrics};
use super::pool::{self, footprint, VmState};

type State = pool::State<FunctionVm>;
type Grant = pool::Grant<FunctionVm>;
type IdleVm = pool::IdleVm<FunctionVm>;
type Waiter = pool::Waiter<FunctionVm>;
use super::vm::{FunctionVm, VmError, VmId};

/// First and longest pause before retrying a failed pre-warm launch.
const PREWARM_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
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

impl InvokeError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            InvokeError::QueueFull { .. } => 429,
            InvokeError::QueueTimeout { .. } | InvokeError::ShuttingDown => 503,
            InvokeError::Launch { .. } | InvokeError::Vm { .. } => 502,
            InvokeError::Timeout { .. } => 504,
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
            Start::Cold(LaunchKind::Restore) => "cold-restore",
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

pub struct Scheduler {
    cfg: Arc<Config>,
    /// How VMs are jailed (none: unjailed).
    jail: Option<JailOptions>,
    budget_mib: u64,
    log_dir: PathBuf,
    state: Mutex<State>,
    /// Notified whenever a VM stops being launching or busy (drain).
    changed: Condvar,
    wake: Sender<()>,
    wake_rx: Receiver<()>,
    pub metrics: Arc<Metrics>,
}

/// Kills evicted VMs, outside the lock; their memory already belongs to
/// the launch that evicted them, which spawns only after this.
fn reap(victims: Vec<FunctionVm>) {
    for v in victims {
        v.kill();
    }
}

impl Scheduler {
    pub fn new(
        cfg: Arc<Config>,
        jail: Option<JailOptions>,
        budget_mib: u64,
        log_dir: PathBuf,
    ) -> Arc<Self> {
        let (wake, wake_rx) = bounded(1);
        Arc::new(Self {
            state: Mutex::new(State::new(cfg.functions.len())),
            cfg,
            jail,
            budget_mib,
            log_dir,
            changed: Condvar::new(),
            wake,
            wake_rx,
            metrics: Arc::new(Metrics::default()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pump(&self, st: &mut State) {
        st.pump(&self.cfg, self.budget_mib, &self.metrics, &self.log_dir);
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
        for (fi, f) in self.cfg.functions.iter().enumerate() {
            let s = &st.fns[fi];
            if s.idle.iter().any(|i| !st.watched.contains(&i.vm.id)) {
                return true;
            }
            if let Some(at) = s.next_idle_expiry(f) {
                if st.maintainer_deadline.is_none_or(|d| at < d) {
                    return true;
                }
            }
            if s.idle.len() + s.prewarming < f.min_idle
                && st.queue.is_empty()
                && s.vms < f.concurrency_limit
                && st.used_mib + footprint(&self.cfg, fi) <= self.budget_mib
                && s.prewarm_retry.is_none_or(|(at, _)| at <= now)
            {
                return true;
            }
        }
        false
    }

    /// Index of the function called `name`.
    pub fn function(&self, name: &str) -> Option<usize> {
        self.cfg.functions.iter().position(|f| f.name == name)
    }

    /// Serves one request on a VM of function `function`.
    pub fn invoke(
        &self,
        function: usize,
        request: &[u8],
        rid: &str,
    ) -> Result<Invocation, InvokeError> {
        let f = &self.cfg.functions[function];
        let arrived = Instant::now();
        let mut launch = Duration::ZERO;
        let (mut vm, start, queued) = loop {
            let (grant, waited) = self.acquire(function, arrived)?;
            let queued = if waited {
                arrived.elapsed()
            } else {
                Duration::ZERO
            };
            match grant {
                Grant::Refused => return Err(InvokeError::ShuttingDown),
                Grant::Warm(mut vm) => {
                    if vm.is_healthy() {
                        break (vm, Start::Warm, queued);
                    }
                    log::warn!(
                        "[{rid}] idle VM {} of {} died; trying another",
                        vm.id,
                        f.name
                    );
                    self.metrics.crash(&f.name);
                    self.metrics.eviction(&f.name, "crashed");
                    self.remove(vm);
                }
                Grant::Launch { id, victims } => {
                    reap(victims);
                    let t = Instant::now();
                    let log = self.log_path(id);
                    match FunctionVm::launch(&self.cfg, self.jail.as_ref(), function, id, &log) {
                        Ok(vm) => {
                            launch = t.elapsed();
                            self.metrics
                                .cold_start(&f.name, f.launch_kind().as_str(), launch);
                            log::info!(
                                "[{rid}] launched VM {id} of {} by {} in {} us",
                                f.name,
                                f.launch_kind().as_str(),
                                launch.as_micros()
                            );
                            let mut st = self.lock();
                            if st.shutting_down {
                                drop(st);
                                self.remove(vm);
                                return Err(InvokeError::ShuttingDown);
                            }
                            st.set_state(id, VmState::Busy);
                            break (vm, Start::Cold(f.launch_kind()), queued);
                        }
                        Err(source) => {
                            log::warn!("[{rid}] launching VM {id} of {} failed: {source}", f.name);
                            self.metrics.launch_failure(&f.name);
                            self.release_reservation(id);
                            return Err(InvokeError::Launch {
                                function: f.name.clone(),
                                source,
                            });
                        }
                    }
                }
            }
        };
        if start == Start::Warm {
            self.metrics.warm_start(&f.name);
        }
        if !queued.is_zero() {
            self.metrics.queued(&f.name, queued);
        }
        {
            let mut st = self.lock();
            let abort = vm.abort_handle();
            if let Some(r) = st.vms.get_mut(&vm.id) {
                r.abort = abort;
                r.served += 1;
            }
        }
        log::debug!("[{rid}] {} on VM {} ({})", f.name, vm.id, start.as_str());
        let t = Instant::now();
        let result = vm.call(request, f.request_timeout);
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
                Err(InvokeError::Vm {
                    function: f.name.clone(),
                    source: VmError::BadJson(e),
                })
            }
            Err(VmError::Timeout(timeout)) => {
                log::warn!(
                    "[{rid}] {} timed out after {timeout:?}; stopping VM {}",
                    f.name,
                    vm.id
                );
                self.metrics.timeout(&f.name);
                self.remove(vm);
                Err(InvokeError::Timeout {
                    function: f.name.clone(),
                    timeout,
                })
            }
            Err(source) => {
                log::warn!("[{rid}] VM {} of {} failed: {source}", vm.id, f.name);
                self.metrics.crash(&f.name);
                self.remove(vm);
                Err(InvokeError::Vm {
                    function: f.name.clone(),
                    source,
                })
            }
        }
    }

    /// Waits for a grant: an idle VM or a launch reservation; `true` when
    /// the request had to wait in the queue for it.
    fn acquire(&self, function: usize, arrived: Instant) -> Result<(Grant, bool), InvokeError> {
        let f = &self.cfg.functions[function];
        let (tx, rx) = bounded(1);
        let wid;
        {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(InvokeError::ShuttingDown);
            }
            wid = st.next_waiter;
            st.next_waiter += 1;
            st.queue.push_back(Waiter {
                id: wid,
                function,
                tx,
            });
            st.fns[function].queued += 1;
            self.pump(&mut st);
            if st.queue.iter().any(|w| w.id == wid) && st.fns[function].queued > f.max_queue {
                st.queue.retain(|w| w.id != wid);
                st.fns[function].queued -= 1;
                self.metrics.queue_rejection(&f.name);
                return Err(InvokeError::QueueFull {
                    function: f.name.clone(),
                    max: f.max_queue,
                });
            }
        }
        if let Ok(g) = rx.try_recv() {
            return Ok((g, false));
        }
        match rx.recv_deadline(arrived + f.request_timeout) {
            Ok(g) => Ok((g, true)),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                let mut st = self.lock();
                let before = st.queue.len();
                st.queue.retain(|w| w.id != wid);
                if st.queue.len() < before {
                    st.fns[function].queued -= 1;
                    return Err(InvokeError::QueueTimeout {
                        function: f.name.clone(),
                        waited: arrived.elapsed(),
                    });
                }
                drop(st);
                // Granted just as the deadline passed: take it.
                rx.try_recv()
                    .map(|g| (g, true))
                    .map_err(|_| InvokeError::ShuttingDown)
            }
        }
    }

    fn log_path(&self, id: VmId) -> PathBuf {
        self.log_dir.join(format!("vm-{id}.log"))
    }

    /// Returns a healthy VM after a request: to its pool, or straight to a waiter.
    fn release(&self, vm: FunctionVm) {
        let mut st = self.lock();
        if st.shutting_down {
            drop(st);
            self.remove(vm);
            return;
        }
        st.set_state(vm.id, VmState::Idle);
        let f = vm.function;
        st.fns[f].idle.push(IdleVm {
            vm,
            since: Instant::now(),
        });
        self.pump(&mut st);
    }

    /// Kills a VM and returns its memory.
    fn remove(&self, vm: FunctionVm) {
        let (id, f) = (vm.id, vm.function);
        vm.kill();
        let mut st = self.lock();
        st.fns[f].vms -= 1;
        st.used_mib -= footprint(&self.cfg, f);
        st.forget(id);
        self.pump(&mut st);
    }

    /// Returns the memory of a launch that failed.
    fn release_reservation(&self, id: VmId) {
        let mut st = self.lock();
        if let Some(f) = st.vms.get(&id).map(|r| r.function) {
            st.fns[f].vms -= 1;
            st.used_mib -= footprint(&self.cfg, f);
            st.forget(id);
        }
        self.pump(&mut st);
    }

    /// The maintainer: pre-warming, idle timeouts, dead idle VMs. Returns
    /// when the scheduler has shut down.
    pub fn maintain(self: &Arc<Self>) {
        loop {
            let now = Instant::now();
            let mut victims = Vec::new();
            let mut launches = Vec::new();
            let mut watched: Vec<(VmId, usize, Receiver<crate::control::Event>)> = Vec::new();
            let mut next: Option<Instant> = None;
            {
                let mut st = self.lock();
                if st.shutting_down {
                    return;
                }
                for (fi, f) in self.cfg.functions.iter().enumerate() {
                    // Idle timeouts: the oldest beyond min_idle.
                    let s = &mut st.fns[fi];
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
                    let s = &st.fns[fi];
                    if let Some(at) = s.next_idle_expiry(f) {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    // Pre-warming: free memory only, never while anyone waits.
                    let want = f.min_idle.saturating_sub(s.idle.len() + s.prewarming);
                    let retry_ok = s.prewarm_retry.is_none_or(|(at, _)| at <= now);
                    if let Some((at, _)) = s.prewarm_retry.filter(|_| want > 0 && !retry_ok) {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    for _ in 0..want {
                        let s = &st.fns[fi];
                        let need = footprint(&self.cfg, fi);
                        if !retry_ok
                            || !st.queue.is_empty()
                            || s.vms >= f.concurrency_limit
                            || st.used_mib + need > self.budget_mib
                        {
                            break;
                        }
                        let id = st.new_record(&self.cfg, fi, &self.log_dir);
                        st.fns[fi].prewarming += 1;
                        launches.push((fi, id));
                    }
                }
                st.watched.clear();
                for fi in 0..st.fns.len() {
                    for i in 0..st.fns[fi].idle.len() {
                        let vm = &st.fns[fi].idle[i].vm;
                        watched.push((vm.id, vm.function, vm.events()));
                        let id = vm.id;
                        st.watched.insert(id);
                    }
                }
                st.maintainer_deadline = next;
            }
            // Their memory returns once each is reaped.
            for vm in victims {
                self.remove(vm);
            }
            for (fi, id) in launches {
                let me = Arc::clone(self);
                let spawned = std::thread::Builder::new()
                    .name(format!("prewarm-{id}"))
                    .spawn(move || me.prewarm(fi, id));
                if let Err(e) = spawned {
                    log::error!("cannot start a pre-warm thread: {e}");
                    let mut st = self.lock();
                    st.fns[fi].prewarming -= 1;
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
    fn drop_dead_idle(&self, id: VmId, fi: usize) {
        let vm = {
            let mut st = self.lock();
            let Some(pos) = st.fns[fi].idle.iter().position(|i| i.vm.id == id) else {
                return;
            };
            st.fns[fi].idle.remove(pos).vm
        };
        let name = &self.cfg.functions[fi].name;
        log::warn!("idle VM {id} of {name} exited; removing it");
        self.metrics.crash(name);
        self.metrics.eviction(name, "crashed");
        self.remove(vm);
    }

    /// Launches one pre-warmed VM into the idle pool.
    fn prewarm(&self, fi: usize, id: VmId) {
        let f = &self.cfg.functions[fi];
        let t = Instant::now();
        match FunctionVm::launch(&self.cfg, self.jail.as_ref(), fi, id, &self.log_path(id)) {
            Ok(vm) => {
                self.metrics
                    .cold_start(&f.name, f.launch_kind().as_str(), t.elapsed());
                log::info!(
                    "pre-warmed VM {id} of {} in {} us",
                    f.name,
                    t.elapsed().as_micros()
                );
                let mut st = self.lock();
                st.fns[fi].prewarming -= 1;
                st.fns[fi].prewarm_retry = None;
                drop(st);
                self.release(vm);
            }
            Err(e) => {
                log::warn!("pre-warming a VM of {} failed: {e}", f.name);
                self.metrics.launch_failure(&f.name);
                let mut st = self.lock();
                st.fns[fi].prewarming -= 1;
                let pause = st.fns[fi]
                    .prewarm_retry
                    .map_or(PREWARM_BACKOFF.0, |(_, p)| (p * 2).min(PREWARM_BACKOFF.1));
                st.fns[fi].prewarm_retry = Some((Instant::now() + pause, pause));
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
        let victims: Vec<FunctionVm> = {
            let mut st = self.lock();
            st.shutting_down = true;
            for w in std::mem::take(&mut st.queue) {
                let _ = w.tx.send(Grant::Refused);
            }
            let mut v = Vec::new();
            for fs in &mut st.fns {
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
    }

    /// Live numbers for /metrics.
    pub fn gauges(&self) -> Gauges {
        let st = self.lock();
        let mut vms = Vec::new();
        let mut queue_depth = Vec::new();
        for (fi, f) in self.cfg.functions.iter().enumerate() {
            for state in [VmState::Launching, VmState::Idle, VmState::Busy] {
                let n = st
                    .vms
                    .values()
                    .filter(|r| r.function == fi && r.state == state)
                    .count();
                vms.push((f.name.clone(), state.as_str(), n));
            }
            queue_depth.push((f.name.clone(), st.fns[fi].queued));
        }
        Gauges {
            memory_used_mib: st.used_mib,
            memory_budget_mib: self.budget_mib,
            memory_high_water_mib: st.high_water_mib,
            vms,
            queue_depth,
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
                        "function": self.cfg.functions[r.function].name,
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
        let st = self.lock();
        Value::Array(
            self.cfg
                .functions
                .iter()
                .enumerate()
                .map(|(fi, f)| {
                    let count = |s: VmState| {
                        st.vms
                            .values()
                            .filter(|r| r.function == fi && r.state == s)
                            .count()
                    };
                    json!({
                        "name": f.name,
                        "launch": f.launch_kind().as_str(),
                        "memory_mib": f.memory_mib,
                        "vcpus": f.vcpus,
                        "concurrency_limit": f.concurrency_limit,
                        "min_idle": f.min_idle,
                        "max_queue": f.max_queue,
                        "idle_timeout_ms": f.idle_timeout.as_millis() as u64,
                        "request_timeout_ms": f.request_timeout.as_millis() as u64,
                        "vms": {
                            "launching": count(VmState::Launching),
                            "idle": count(VmState::Idle),
                            "busy": count(VmState::Busy),
                        },
                        "queued": st.fns[fi].queued,
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
