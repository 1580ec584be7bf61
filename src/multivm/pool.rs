//! The scheduler's decisions, apart from any process or thread: the
//! pools of idle VMs per function, the reservations against the memory
//! budget, the FIFO of waiters, and the two decisions — [`State::pump`]
//! (who gets a warm VM or the right to launch one) and [`State::make_room`]
//! (which idle VMs to evict, least recently used first). Generic over the
//! VM, so the unit tests below drive it with a fake one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::config::{Config, Function, LaunchKind};
use super::metrics::Metrics;
use super::vm::{FunctionVm, VmId};

/// Console logs of this many stopped VMs stay readable through the API.
pub(super) const KEPT_LOGS: usize = 32;

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
    pub function: usize,
    pub state: VmState,
    pub kind: LaunchKind,
    pub created: Instant,
    pub changed: Instant,
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
    /// Launch VM `id` (its memory is reserved) after killing `victims`.
    Launch {
        id: VmId,
        victims: Vec<V>,
    },
    Refused,
}

pub(super) struct Waiter<V> {
    pub id: u64,
    pub function: usize,
    pub tx: Sender<Grant<V>>,
}

pub(super) struct FnState<V> {
    /// Oldest first: `since` ascending; warm starts pop the newest.
    pub idle: Vec<IdleVm<V>>,
    /// Launching + idle + busy VMs (what concurrency_limit bounds).
    pub vms: usize,
    pub queued: usize,
    pub prewarming: usize,
    pub prewarm_retry: Option<(Instant, Duration)>,
}

impl<V> Default for FnState<V> {
    fn default() -> Self {
        Self {
            idle: Vec::new(),
            vms: 0,
            queued: 0,
            prewarming: 0,
            prewarm_retry: None,
        }
    }
}

impl<V> FnState<V> {
    /// When the oldest idle VM beyond the function's `min_idle` reaches its
    /// idle timeout (none if all idle VMs are kept).
    pub fn next_idle_expiry(&self, f: &Function) -> Option<Instant> {
        let evictable = self.idle.len().saturating_sub(f.min_idle);
        self.idle
            .iter()
            .take(evictable)
            .next()
            .map(|first| first.since + f.idle_timeout)
    }
}

pub(super) struct State<V> {
    pub fns: Vec<FnState<V>>,
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

pub(super) fn footprint(cfg: &Config, function: usize) -> u64 {
    cfg.functions[function].memory_mib + cfg.vm_overhead_mib
}

impl<V: Pooled> State<V> {
    /// No VMs, no waiters, for `functions` functions.
    pub fn new(functions: usize) -> Self {
        Self {
            fns: (0..functions).map(|_| FnState::default()).collect(),
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

    pub fn reserve(&mut self, mib: u64) {
        self.used_mib += mib;
        self.high_water_mib = self.high_water_mib.max(self.used_mib);
    }

    /// Frees `need` MiB of `budget` by choosing idle VMs, least recently
    /// used first; `None` (and nothing chosen) when even that is not enough.
    pub fn make_room(
        &mut self,
        need: u64,
        budget: u64,
        metrics: &Metrics,
        cfg: &Config,
    ) -> Option<Vec<V>> {
        let free = budget - self.used_mib.min(budget);
        if free >= need {
            return Some(Vec::new());
        }
        let mut candidates: Vec<(Instant, usize)> = self
            .fns
            .iter()
            .enumerate()
            .flat_map(|(f, s)| s.idle.iter().map(move |i| (i.since, f)))
            .collect();
        candidates.sort_by_key(|c| c.0);
        let mut gain = 0;
        let mut take: BTreeMap<usize, usize> = BTreeMap::new();
        for (_, f) in &candidates {
            if free + gain >= need {
                break;
            }
            gain += footprint(cfg, *f);
            *take.entry(*f).or_default() += 1;
        }
        if free + gain < need {
            return None;
        }
        let mut victims = Vec::new();
        for (f, n) in take {
            // The oldest n of this function are exactly the ones chosen.
            for idle in self.fns[f].idle.drain(..n).collect::<Vec<_>>() {
                self.fns[f].vms -= 1;
                self.used_mib -= footprint(cfg, f);
                self.forget(idle.vm.id());
                metrics.eviction(&cfg.functions[f].name, "lru");
                log::info!(
                    "evicting idle VM {} of {} (LRU) to make room",
                    idle.vm.id(),
                    cfg.functions[f].name
                );
                victims.push(idle.vm);
            }
        }
        Some(victims)
    }

    /// Drops a VM's record, keeping its console log for a while.
    pub fn forget(&mut self, id: VmId) {
        if let Some(r) = self.vms.remove(&id) {
            self.gone_logs.push_back((id, r.log));
            while self.gone_logs.len() > KEPT_LOGS {
                if let Some((_, p)) = self.gone_logs.pop_front() {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    pub fn new_record(&mut self, cfg: &Config, function: usize, log_dir: &Path) -> VmId {
        let id = self.next_vm;
        self.next_vm += 1;
        let now = Instant::now();
        self.vms.insert(
            id,
            VmRecord {
                function,
                state: VmState::Launching,
                kind: cfg.functions[function].launch_kind(),
                created: now,
                changed: now,
                mib: footprint(cfg, function),
                served: 0,
                log: log_dir.join(format!("vm-{id}.log")),
                abort: None,
            },
        );
        self.fns[function].vms += 1;
        self.reserve(footprint(cfg, function));
        id
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
    pub fn pump(&mut self, cfg: &Config, budget: u64, metrics: &Metrics, log_dir: &Path) {
        if self.shutting_down {
            return; // Waiters are refused by `shutdown`.
        }
        let mut memory_blocked = false;
        let mut i = 0;
        while i < self.queue.len() {
            let f = self.queue[i].function;
            if let Some(idle) = self.fns[f].idle.pop() {
                let w = self.queue.remove(i).expect("index in range");
                self.fns[f].queued -= 1;
                self.set_state(idle.vm.id(), VmState::Busy);
                if let Err(e) = w.tx.send(Grant::Warm(idle.vm)) {
                    // The waiter is gone (cannot happen while queued); keep the VM.
                    if let Grant::Warm(vm) = e.into_inner() {
                        self.set_state(vm.id(), VmState::Idle);
                        self.fns[f].idle.push(IdleVm {
                            vm,
                            since: idle.since,
                        });
                    }
                }
                continue;
            }
            if !memory_blocked && self.fns[f].vms < cfg.functions[f].concurrency_limit {
                match self.make_room(footprint(cfg, f), budget, metrics, cfg) {
                    Some(victims) => {
                        let w = self.queue.remove(i).expect("index in range");
                        self.fns[f].queued -= 1;
                        let id = self.new_record(cfg, f, log_dir);
                        if w.tx.send(Grant::Launch { id, victims }).is_err() {
                            // The waiter is gone (cannot happen while queued):
                            // the victims die with the unsent grant; undo the launch.
                            self.fns[f].vms -= 1;
                            self.used_mib -= footprint(cfg, f);
                            self.forget(id);
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
            min_idle: 0,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(1),
            max_queue: 10,
        }
    }

    /// Functions `a` (90 + 10 MiB) and `b` (40 + 10 MiB), `a` limited to
    /// two VMs.
    fn config() -> Config {
        Config {
            firerunner: PathBuf::from("firerunner"),
            boot_timeout: Duration::from_secs(1),
            vm_overhead_mib: OVERHEAD,
            jail: false,
            functions: vec![function("a", 90, 2), function("b", 40, 8)],
        }
    }

    /// A launched VM of `f` that has gone idle, `age_ms` old.
    fn idle(st: &mut State<FakeVm>, cfg: &Config, f: usize, base: Instant, age_ms: u64) -> VmId {
        let id = st.new_record(cfg, f, Path::new("/nonexistent"));
        st.set_state(id, VmState::Idle);
        st.fns[f].idle.push(IdleVm {
            vm: FakeVm(id),
            since: base + Duration::from_millis(age_ms),
        });
        st.fns[f].idle.sort_by_key(|i| i.since);
        id
    }

    fn wait(st: &mut State<FakeVm>, function: usize) -> Receiver<Grant<FakeVm>> {
        let (tx, rx) = unbounded();
        st.queue.push_back(Waiter {
            id: st.next_waiter,
            function,
            tx,
        });
        st.next_waiter += 1;
        st.fns[function].queued += 1;
        rx
    }

    #[test]
    fn make_room_evicts_least_recently_used_idle_vms_or_none() {
        let cfg = config();
        let m = Metrics::default();
        let t = Instant::now();
        let mut st = State::new(2);
        let old_b = idle(&mut st, &cfg, 1, t, 0);
        let old_a = idle(&mut st, &cfg, 0, t, 10);
        let new_b = idle(&mut st, &cfg, 1, t, 20);
        assert_eq!(st.used_mib, 200);
        // 250 MiB budget, 50 free: a `b` fits without eviction.
        assert_eq!(st.make_room(50, 250, &m, &cfg), Some(vec![]));
        // 120 MiB needs the two oldest (50 + 100), not the newest.
        let victims = st.make_room(120, 250, &m, &cfg).unwrap();
        let mut ids: Vec<VmId> = victims.iter().map(|v| v.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![old_b, old_a]);
        assert_eq!(st.used_mib, 50);
        assert_eq!(st.fns[1].idle.len(), 1);
        assert_eq!(st.fns[1].idle[0].vm, FakeVm(new_b));
        assert!(!st.vms.contains_key(&old_a));
        // More than every idle VM frees: nothing is evicted.
        assert!(st.make_room(500, 250, &m, &cfg).is_none());
        assert_eq!(st.fns[1].idle.len(), 1);
    }

    #[test]
    fn pump_gives_warm_vms_then_launches_oldest_waiter_first() {
        let cfg = config();
        let m = Metrics::default();
        let log = Path::new("/nonexistent");
        let t = Instant::now();
        let mut st = State::new(2);
        let older = idle(&mut st, &cfg, 1, t, 0);
        let newer = idle(&mut st, &cfg, 1, t, 5);
        // Budget 200: 100 used by the two idle `b`s.
        let w_b = wait(&mut st, 1);
        let w_a1 = wait(&mut st, 0);
        let w_a2 = wait(&mut st, 0);
        let w_a3 = wait(&mut st, 0);
        st.pump(&cfg, 200, &m, log);
        // The `b` waiter gets the most recently used idle `b`.
        match w_b.try_recv().unwrap() {
            Grant::Warm(vm) => assert_eq!(vm, FakeVm(newer)),
            _ => panic!("a warm start"),
        }
        // The first `a` may launch in the free 100 MiB.
        let Grant::Launch { victims, .. } = w_a1.try_recv().unwrap() else {
            panic!("a launch");
        };
        assert!(victims.is_empty());
        // The second evicts the remaining idle `b` (50) but still lacks
        // memory: it waits, and so does the third behind it.
        assert!(w_a2.try_recv().is_err() && w_a3.try_recv().is_err());
        assert_eq!(st.queue.len(), 2);
        assert_eq!(st.fns[1].idle.len(), 1);
        assert_eq!(st.fns[1].idle[0].vm, FakeVm(older));
        // A bigger budget: the second launches after evicting the idle
        // `b`; the third hits `a`'s concurrency limit of two.
        st.pump(&cfg, 250, &m, log);
        let Grant::Launch { victims, .. } = w_a2.try_recv().unwrap() else {
            panic!("a launch");
        };
        assert_eq!(victims, vec![FakeVm(older)]);
        assert!(w_a3.try_recv().is_err());
        assert_eq!((st.fns[0].vms, st.used_mib), (2, 250));
    }
}
