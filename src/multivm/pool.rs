//! The scheduler's decisions, apart from any process or thread: the
//! function set, the pools of idle VMs per function, the reservations
//! against the memory budget, the FIFO of waiters, and the two decisions —
//! [`State::pump`] (who gets a warm VM or the right to launch one) and
//! [`State::make_room`] (which idle VMs to evict, least recently used
//! first). Generic over the VM, so the unit tests below drive it with a
//! fake one.
//!
//! Functions change at run time. Each registration of a name gets a fresh
//! [`FnId`] that is never reused, so a waiter or a VM of a removed function
//! can never be mistaken for one of a later function of the same name. An
//! update keeps the id and bumps the function's generation: idle VMs of the
//! old generation are handed back for killing at once, busy ones are killed
//! when their request ends, and waiters stay queued for the new spec. Every
//! VM record carries its own footprint, so memory is returned exactly as it
//! was reserved whatever happened to its function since.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::config::{Function, LaunchKind};
use super::metrics::Metrics;
use super::vm::{FunctionVm, VmId};

/// Console logs of this many stopped VMs stay readable through the API.
pub(super) const KEPT_LOGS: usize = 32;

/// One registration of a function name; never reused.
pub type FnId = u64;

/// What the pools need of a VM.
pub(super) trait Pooled {
    fn id(&self) -> VmId;
}

impl Pooled for FunctionVm {
    fn id(&self) -> VmId {
        self.id
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum VmState {
    Launching,
    Idle,
    Busy,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Launching => "launching",
            VmState::Idle => "idle",
            VmState::Busy => "busy",
        }
    }
}

pub(super) struct VmRecord {
    pub function: FnId,
    /// The function's name when the VM was launched.
    pub name: String,
    pub state: VmState,
    pub kind: LaunchKind,
    pub created: Instant,
    pub changed: Instant,
    /// Reserved for this VM; returned when the record goes.
    pub mib: u64,
    pub served: u64,
    pub log: PathBuf,
    /// For busy VMs: shutting it down fails the request at once (drain).
    pub abort: Option<UnixStream>,
}

pub(super) struct IdleVm<V> {
    pub vm: V,
    pub since: Instant,
}

pub(super) enum Grant<V> {
    Warm(V),
    /// Launch VM `id` of `spec` (its memory is reserved) after killing `victims`.
    Launch {
        id: VmId,
        spec: Arc<Function>,
        generation: u64,
        victims: Vec<V>,
    },
    /// multivm is shutting down.
    Refused,
    /// The function was removed while the request waited.
    Removed,
}

pub(super) struct Waiter<V> {
    pub id: u64,
    pub function: FnId,
    pub tx: Sender<Grant<V>>,
}

pub(super) struct FnState<V> {
    pub spec: Arc<Function>,
    /// Bumped by every update; VMs of an older one never go back to the pool.
    pub generation: u64,
    /// Oldest first: `since` ascending; warm starts pop the newest.
    pub idle: Vec<IdleVm<V>>,
    /// Launching + idle + busy VMs (what concurrency_limit bounds).
    pub vms: usize,
    pub queued: usize,
    pub prewarming: usize,
    pub prewarm_retry: Option<(Instant, Duration)>,
}

impl<V> FnState<V> {
    fn new(spec: Arc<Function>) -> Self {
        Self {
            spec,
            generation: 0,
            idle: Vec::new(),
            vms: 0,
            queued: 0,
            prewarming: 0,
            prewarm_retry: None,
        }
    }

    /// When the oldest idle VM beyond the function's `min_idle` reaches its
    /// idle timeout (none if all idle VMs are kept).
    pub fn next_idle_expiry(&self) -> Option<Instant> {
        let evictable = self.idle.len().saturating_sub(self.spec.min_idle);
        self.idle
            .iter()
            .take(evictable)
            .next()
            .map(|first| first.since + self.spec.idle_timeout)
    }
}

pub(super) struct State<V> {
    pub fns: BTreeMap<FnId, FnState<V>>,
    /// Function name to its current registration.
    pub names: BTreeMap<String, FnId>,
    pub next_fn: FnId,
    /// MiB accounted per VM on top of its guest memory.
    pub vm_overhead_mib: u64,
    pub vms: BTreeMap<VmId, VmRecord>,
    pub queue: VecDeque<Waiter<V>>,
    pub used_mib: u64,
    pub high_water_mib: u64,
    pub next_vm: VmId,
    pub next_waiter: u64,
    pub shutting_down: bool,
    /// Console logs of stopped VMs, oldest first.
    pub gone_logs: VecDeque<(VmId, PathBuf)>,
    /// Idle VMs the maintainer watches for an exit, and its next timer:
    /// what it already knows need not wake it.
    pub watched: BTreeSet<VmId>,
    pub maintainer_deadline: Option<Instant>,
}

impl<V: Pooled> State<V> {
    /// No functions, VMs or waiters.
    pub fn new(vm_overhead_mib: u64) -> Self {
        Self {
            fns: BTreeMap::new(),
            names: BTreeMap::new(),
            next_fn: 1,
            vm_overhead_mib,
            vms: BTreeMap::new(),
            queue: VecDeque::new(),
            used_mib: 0,
            high_water_mib: 0,
            next_vm: 1,
            next_waiter: 0,
            shutting_down: false,
            gone_logs: VecDeque::new(),
            watched: BTreeSet::new(),
            maintainer_deadline: None,
        }
    }

    /// MiB one VM of `spec` reserves.
    pub fn footprint(&self, spec: &Function) -> u64 {
        spec.memory_mib + self.vm_overhead_mib
    }

    /// Whether `spec` can run within `budget`: one VM fits, and the
    /// `min_idle` VMs of every function, with `spec` in place of the
    /// function of its name, fit together.
    pub fn check_fits(&self, spec: &Function, budget: u64) -> Result<(), String> {
        let one = self.footprint(spec);
        if one > budget {
            return Err(format!(
                "{} MiB plus {} MiB of VMM overhead does not fit in the --mem budget of {budget} MiB",
                spec.memory_mib, self.vm_overhead_mib
            ));
        }
        let others: u64 = self
            .fns
            .values()
            .filter(|f| f.spec.name != spec.name)
            .map(|f| f.spec.min_idle as u64 * self.footprint(&f.spec))
            .sum();
        let warm = others + spec.min_idle as u64 * one;
        if warm > budget {
            return Err(format!(
                "the min_idle VMs of every function would need {warm} MiB, more than the --mem budget of {budget} MiB"
            ));
        }
        Ok(())
    }

    /// Registers `spec`, or replaces the function of that name: by a new
    /// generation when its VMs would differ (kernel, disks, size, snapshot),
    /// in place when only scheduling settings change. Returns its id and the old generation's idle VMs, which
    /// the caller kills (their records go once each is reaped).
    pub fn put_function(&mut self, spec: Arc<Function>) -> (FnId, Vec<V>) {
        if let Some(&fid) = self.names.get(&spec.name) {
            if let Some(fs) = self.fns.get_mut(&fid) {
                if fs.spec.same_vm(&spec) {
                    // Only scheduling settings changed: the VMs stay.
                    fs.spec = spec;
                    return (fid, Vec::new());
                }
                fs.spec = spec;
                fs.generation += 1;
                fs.prewarm_retry = None;
                let old: Vec<V> = fs.idle.drain(..).map(|i| i.vm).collect();
                for vm in &old {
                    self.set_state(vm.id(), VmState::Busy);
                }
                return (fid, old);
            }
        }
        let fid = self.next_fn;
        self.next_fn += 1;
        self.names.insert(spec.name.clone(), fid);
        self.fns.insert(fid, FnState::new(spec));
        (fid, Vec::new())
    }

    /// Unregisters the function `name`: its waiters are answered
    /// [`Grant::Removed`]; returns its idle VMs for the caller to kill
    /// (busy and launching ones are killed when their request ends), or
    /// `None` if there is no such function.
    pub fn remove_function(&mut self, name: &str) -> Option<Vec<V>> {
        let fid = self.names.remove(name)?;
        let fs = self.fns.remove(&fid)?;
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|w| w.function == fid);
        self.queue = kept;
        for w in gone {
            let _ = w.tx.send(Grant::Removed);
        }
        let idle: Vec<V> = fs.idle.into_iter().map(|i| i.vm).collect();
        for vm in &idle {
            self.set_state(vm.id(), VmState::Busy);
        }
        Some(idle)
    }

    pub fn reserve(&mut self, mib: u64) {
        self.used_mib += mib;
        self.high_water_mib = self.high_water_mib.max(self.used_mib);
    }

    /// Frees `need` MiB of `budget` by choosing idle VMs, least recently
    /// used first; `None` (and nothing chosen) when even that is not enough.
    pub fn make_room(&mut self, need: u64, budget: u64, metrics: &Metrics) -> Option<Vec<V>> {
        let free = budget - self.used_mib.min(budget);
        if free >= need {
            return Some(Vec::new());
        }
        let records = &self.vms;
        let mut candidates: Vec<(Instant, FnId, u64)> = self
            .fns
            .iter()
            .flat_map(|(f, s)| {
                s.idle.iter().map(move |i| {
                    let mib = records.get(&i.vm.id()).map_or(0, |r| r.mib);
                    (i.since, *f, mib)
                })
            })
            .collect();
        candidates.sort_by_key(|c| c.0);
        let mut gain = 0;
        let mut take: BTreeMap<FnId, usize> = BTreeMap::new();
        for (_, f, mib) in &candidates {
            if free + gain >= need {
                break;
            }
            gain += mib;
            *take.entry(*f).or_default() += 1;
        }
        if free + gain < need {
            return None;
        }
        let mut victims = Vec::new();
        for (f, n) in take {
            let Some(fs) = self.fns.get_mut(&f) else {
                continue;
            };
            let name = fs.spec.name.clone();
            // The oldest n of this function are exactly the ones chosen.
            for idle in fs.idle.drain(..n).collect::<Vec<_>>() {
                self.drop_record(idle.vm.id());
                metrics.eviction(&name, "lru");
                log::info!(
                    "evicting idle VM {} of {name} (LRU) to make room",
                    idle.vm.id()
                );
                victims.push(idle.vm);
            }
        }
        Some(victims)
    }

    /// Drops VM `id`'s record and returns its memory and its place under
    /// its function's concurrency_limit; its console log is kept a while.
    pub fn drop_record(&mut self, id: VmId) {
        let Some(r) = self.vms.remove(&id) else {
            return;
        };
        if let Some(fs) = self.fns.get_mut(&r.function) {
            fs.vms -= 1;
        }
        self.used_mib -= r.mib;
        self.gone_logs.push_back((id, r.log));
        while self.gone_logs.len() > KEPT_LOGS {
            if let Some((_, p)) = self.gone_logs.pop_front() {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Records a VM of function `fid` being launched and reserves its
    /// memory; `None` if there is no such function.
    pub fn new_record(&mut self, fid: FnId, log_dir: &Path) -> Option<VmId> {
        let fs = self.fns.get_mut(&fid)?;
        fs.vms += 1;
        let spec = Arc::clone(&fs.spec);
        let mib = self.footprint(&spec);
        let id = self.next_vm;
        self.next_vm += 1;
        let now = Instant::now();
        self.vms.insert(
            id,
            VmRecord {
                function: fid,
                name: spec.name.clone(),
                state: VmState::Launching,
                kind: spec.launch_kind(),
                created: now,
                changed: now,
                mib,
                served: 0,
                log: log_dir.join(format!("vm-{id}.log")),
                abort: None,
            },
        );
        self.reserve(mib);
        Some(id)
    }

    pub fn set_state(&mut self, id: VmId, state: VmState) {
        if let Some(r) = self.vms.get_mut(&id) {
            r.state = state;
            r.changed = Instant::now();
            if state != VmState::Busy {
                r.abort = None;
            }
        }
    }

    /// Hands free VMs and memory to waiters, oldest first. Once a waiter
    /// lacks memory, later waiters get no memory either (only idle VMs),
    /// so a large function is not starved by a stream of small ones.
    pub fn pump(&mut self, budget: u64, metrics: &Metrics, log_dir: &Path) {
        if self.shutting_down {
            return; // Waiters are refused by `shutdown`.
        }
        let mut memory_blocked = false;
        let mut i = 0;
        while i < self.queue.len() {
            let f = self.queue[i].function;
            let Some(fs) = self.fns.get_mut(&f) else {
                // Unreachable: removing a function answers its waiters.
                let w = self.queue.remove(i).expect("index in range");
                let _ = w.tx.send(Grant::Removed);
                continue;
            };
            if let Some(idle) = fs.idle.pop() {
                fs.queued -= 1;
                let w = self.queue.remove(i).expect("index in range");
                self.set_state(idle.vm.id(), VmState::Busy);
                if let Err(e) = w.tx.send(Grant::Warm(idle.vm)) {
                    // The waiter is gone (cannot happen while queued); keep the VM.
                    if let Grant::Warm(vm) = e.into_inner() {
                        self.set_state(vm.id(), VmState::Idle);
                        if let Some(fs) = self.fns.get_mut(&f) {
                            fs.idle.push(IdleVm {
                                vm,
                                since: idle.since,
                            });
                        }
                    }
                }
                continue;
            }
            if !memory_blocked && fs.vms < fs.spec.concurrency_limit {
                let (spec, generation) = (Arc::clone(&fs.spec), fs.generation);
                match self.make_room(self.footprint(&spec), budget, metrics) {
                    Some(victims) => {
                        let w = self.queue.remove(i).expect("index in range");
                        let Some(id) = self.new_record(f, log_dir) else {
                            continue; // Unreachable: `f` is registered.
                        };
                        if let Some(fs) = self.fns.get_mut(&f) {
                            fs.queued -= 1;
                        }
                        let grant = Grant::Launch {
                            id,
                            spec,
                            generation,
                            victims,
                        };
                        if w.tx.send(grant).is_err() {
                            // The waiter is gone (cannot happen while queued):
                            // the victims die with the unsent grant; undo the launch.
                            self.drop_record(id);
                        }
                        continue;
                    }
                    None => memory_blocked = true,
                }
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use crossbeam_channel::{unbounded, Receiver};

    use super::*;

    /// A VM that is only its id.
    #[derive(Debug, PartialEq, Eq)]
    struct FakeVm(VmId);

    impl Pooled for FakeVm {
        fn id(&self) -> VmId {
            self.0
        }
    }

    const OVERHEAD: u64 = 10;
    const LOG: &str = "/nonexistent";

    fn function(name: &str, memory_mib: u64, concurrency_limit: usize) -> Function {
        Function {
            name: name.into(),
            kernel: PathBuf::from("k"),
            cmdline: None,
            rootfs: PathBuf::from("r"),
            appfs: None,
            vcpus: 1,
            memory_mib,
            concurrency_limit,
            load_dir: None,
            copy_base: false,
            copy_diff: false,
            load_ws: false,
            network: false,
            keep_state: false,
            min_idle: 0,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(1),
            max_queue: 10,
        }
    }

    /// Functions `a` (90 + 10 MiB, id A) and `b` (40 + 10 MiB, id B), `a`
    /// limited to two VMs.
    fn state() -> (State<FakeVm>, FnId, FnId) {
        let mut st = State::new(OVERHEAD);
        let (a, _) = st.put_function(Arc::new(function("a", 90, 2)));
        let (b, _) = st.put_function(Arc::new(function("b", 40, 8)));
        (st, a, b)
    }

    /// A launched VM of `f` that has gone idle, `age_ms` old.
    fn idle(st: &mut State<FakeVm>, f: FnId, base: Instant, age_ms: u64) -> VmId {
        let id = st.new_record(f, Path::new(LOG)).unwrap();
        st.set_state(id, VmState::Idle);
        let fs = st.fns.get_mut(&f).unwrap();
        fs.idle.push(IdleVm {
            vm: FakeVm(id),
            since: base + Duration::from_millis(age_ms),
        });
        fs.idle.sort_by_key(|i| i.since);
        id
    }

    fn wait(st: &mut State<FakeVm>, function: FnId) -> Receiver<Grant<FakeVm>> {
        let (tx, rx) = unbounded();
        st.queue.push_back(Waiter {
            id: st.next_waiter,
            function,
            tx,
        });
        st.next_waiter += 1;
        st.fns.get_mut(&function).unwrap().queued += 1;
        rx
    }

    #[test]
    fn make_room_evicts_least_recently_used_idle_vms_or_none() {
        let m = Metrics::default();
        let t = Instant::now();
        let (mut st, a, b) = state();
        let old_b = idle(&mut st, b, t, 0);
        let old_a = idle(&mut st, a, t, 10);
        let new_b = idle(&mut st, b, t, 20);
        assert_eq!(st.used_mib, 200);
        // 250 MiB budget, 50 free: a `b` fits without eviction.
        assert_eq!(st.make_room(50, 250, &m), Some(vec![]));
        // 120 MiB needs the two oldest (50 + 100), not the newest.
        let victims = st.make_room(120, 250, &m).unwrap();
        let mut ids: Vec<VmId> = victims.iter().map(|v| v.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![old_b, old_a]);
        assert_eq!(st.used_mib, 50);
        assert_eq!(st.fns[&b].idle.len(), 1);
        assert_eq!(st.fns[&b].idle[0].vm, FakeVm(new_b));
        assert!(!st.vms.contains_key(&old_a));
        // More than every idle VM frees: nothing is evicted.
        assert!(st.make_room(500, 250, &m).is_none());
        assert_eq!(st.fns[&b].idle.len(), 1);
    }

    #[test]
    fn pump_gives_warm_vms_then_launches_oldest_waiter_first() {
        let m = Metrics::default();
        let log = Path::new(LOG);
        let t = Instant::now();
        let (mut st, a, b) = state();
        let older = idle(&mut st, b, t, 0);
        let newer = idle(&mut st, b, t, 5);
        // Budget 200: 100 used by the two idle `b`s.
        let w_b = wait(&mut st, b);
        let w_a1 = wait(&mut st, a);
        let w_a2 = wait(&mut st, a);
        let w_a3 = wait(&mut st, a);
        st.pump(200, &m, log);
        // The `b` waiter gets the most recently used idle `b`.
        match w_b.try_recv().unwrap() {
            Grant::Warm(vm) => assert_eq!(vm, FakeVm(newer)),
            _ => panic!("a warm start"),
        }
        // The first `a` may launch in the free 100 MiB.
        let Grant::Launch { victims, spec, .. } = w_a1.try_recv().unwrap() else {
            panic!("a launch");
        };
        assert!(victims.is_empty());
        assert_eq!(spec.name, "a");
        // The second evicts the remaining idle `b` (50) but still lacks
        // memory: it waits, and so does the third behind it.
        assert!(w_a2.try_recv().is_err() && w_a3.try_recv().is_err());
        assert_eq!(st.queue.len(), 2);
        assert_eq!(st.fns[&b].idle.len(), 1);
        assert_eq!(st.fns[&b].idle[0].vm, FakeVm(older));
        // A bigger budget: the second launches after evicting the idle
        // `b`; the third hits `a`'s concurrency limit of two.
        st.pump(250, &m, log);
        let Grant::Launch { victims, .. } = w_a2.try_recv().unwrap() else {
            panic!("a launch");
        };
        assert_eq!(victims, vec![FakeVm(older)]);
        assert!(w_a3.try_recv().is_err());
        assert_eq!((st.fns[&a].vms, st.used_mib), (2, 250));
    }

    #[test]
    fn an_update_hands_back_idle_vms_and_keeps_waiters_for_the_new_spec() {
        let m = Metrics::default();
        let t = Instant::now();
        let (mut st, a, _) = state();
        let old = idle(&mut st, a, t, 0);
        let busy = st.new_record(a, Path::new(LOG)).unwrap();
        st.set_state(busy, VmState::Busy);
        // A new min_idle only: same generation, the VMs stay.
        let mut scaled = function("a", 90, 2);
        scaled.min_idle = 1;
        assert_eq!(st.put_function(Arc::new(scaled)), (a, vec![]));
        assert_eq!(st.fns[&a].spec.min_idle, 1);
        assert_eq!(st.fns[&a].idle.len(), 1);
        let (same, victims) = st.put_function(Arc::new(function("a", 20, 4)));
        assert_eq!(same, a, "an update keeps the function's id");
        assert_eq!(victims, vec![FakeVm(old)]);
        assert_eq!(st.fns[&a].generation, 1);
        assert!(st.fns[&a].idle.is_empty());
        // The old VMs still hold their old footprint until reaped.
        assert_eq!(st.used_mib, 200);
        st.drop_record(old);
        assert_eq!((st.used_mib, st.fns[&a].vms), (100, 1));
        // A waiter launches a VM of the new generation and size.
        let w = wait(&mut st, a);
        st.pump(1000, &m, Path::new(LOG));
        let Grant::Launch {
            id,
            spec,
            generation,
            ..
        } = w.try_recv().unwrap()
        else {
            panic!("a launch");
        };
        assert_eq!((spec.memory_mib, generation), (20, 1));
        assert_eq!(st.vms[&id].mib, 30);
        assert_eq!(st.used_mib, 130);
    }

    #[test]
    fn removal_answers_waiters_and_frees_memory_as_vms_go() {
        let m = Metrics::default();
        let t = Instant::now();
        let (mut st, a, b) = state();
        let busy = st.new_record(a, Path::new(LOG)).unwrap();
        st.set_state(busy, VmState::Busy);
        // Budget 100 is full: the `a` and `b` waiters queue.
        let w1 = wait(&mut st, a);
        let w2 = wait(&mut st, a);
        let wb = wait(&mut st, b);
        st.pump(100, &m, Path::new(LOG));
        assert!(w1.try_recv().is_err());
        assert_eq!(st.queue.len(), 3);
        // An idle VM of `a` (as if just pre-warmed past the budget).
        let old = idle(&mut st, a, t, 0);
        let victims = st.remove_function("a").unwrap();
        assert_eq!(victims, vec![FakeVm(old)]);
        assert!(matches!(w1.try_recv(), Ok(Grant::Removed)));
        assert!(matches!(w2.try_recv(), Ok(Grant::Removed)));
        assert_eq!(st.queue.len(), 1, "b still waits");
        assert!(st.remove_function("a").is_none());
        assert!(!st.names.contains_key("a"));
        // Memory returns as the processes are reaped; then `b` launches.
        st.drop_record(old);
        st.drop_record(busy);
        assert_eq!(st.used_mib, 0);
        st.pump(100, &m, Path::new(LOG));
        assert!(matches!(wb.try_recv(), Ok(Grant::Launch { .. })));
        // A new `a` is a new registration.
        let (again, _) = st.put_function(Arc::new(function("a", 90, 2)));
        assert_ne!(again, a);
    }

    #[test]
    fn check_fits_counts_min_idle_of_every_function() {
        let (mut st, _, _) = state();
        let mut big = function("c", 300, 1);
        assert!(st.check_fits(&big, 200).unwrap_err().contains("budget"));
        big.memory_mib = 40;
        big.min_idle = 1;
        assert!(st.check_fits(&big, 200).is_ok());
        let mut a = function("a", 90, 2);
        a.min_idle = 2;
        st.put_function(Arc::new(a));
        // a's two warm VMs (200) plus c's one (50) exceed 200.
        assert!(st.check_fits(&big, 200).unwrap_err().contains("min_idle"));
        // Replacing `a` itself is measured without the old `a`.
        let mut a = function("a", 90, 2);
        a.min_idle = 1;
        assert!(st.check_fits(&a, 100).is_ok());
    }
}
