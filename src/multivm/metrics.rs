//! Counters and latency histograms, rendered in the Prometheus text format
//! (version 0.0.4) together with the scheduler's gauges: snapvm's own
//! (`multivm_*`) and, beside them, the OpenFaaS gateway's names and labels
//! (`gateway_function_invocation_total{function_name,code}`,
//! `gateway_functions_seconds{function_name,code}`,
//! `gateway_service_count{function_name}`) so OpenFaaS dashboards and
//! alerts work unchanged. As in OpenFaaS, `function_name` is
//! `NAME.NAMESPACE` (`hello.openfaas-fn`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use super::provider::types::NAMESPACE;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 22] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// Label values are function names and fixed words; escape anyway.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A counter by function and a fixed word.
type ByResult = BTreeMap<(String, &'static str), u64>;

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    function_errors: BTreeMap<String, u64>,
    timeouts: BTreeMap<String, u64>,
    cold_starts: BTreeMap<(String, &'static str), u64>,
    warm_starts: BTreeMap<String, u64>,
    launch_failures: BTreeMap<String, u64>,
    crashes: BTreeMap<String, u64>,
    evictions: BTreeMap<(String, &'static str), u64>,
    hibernations: ByResult,
    hibernate_seconds: BTreeMap<String, Histogram>,
    wakes: ByResult,
    migrations: ByResult,
    hibernated_dropped: u64,
    queue_rejections: BTreeMap<String, u64>,
    request_seconds: BTreeMap<String, Histogram>,
    /// The same requests by function and status (gateway_functions_seconds).
    gateway_seconds: BTreeMap<(String, u16), Histogram>,
    launch_seconds: BTreeMap<(String, &'static str), Histogram>,
    queue_seconds: BTreeMap<String, Histogram>,
    overhead_seconds: Histogram,
}

/// The scheduler's live numbers at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    pub memory_used_mib: u64,
    pub memory_budget_mib: u64,
    pub memory_high_water_mib: u64,
    /// (function, state, count) for every function and state.
    pub vms: Vec<(String, &'static str, usize)>,
    /// (function, waiting requests).
    pub queue_depth: Vec<(String, usize)>,
    /// ((guest MiB, vCPUs), ready VM shells) per configured shape.
    pub shells_ready: Vec<((u64, u64), usize)>,
    /// (function, hibernated VMs waiting for a wake).
    pub hibernated: Vec<(String, usize)>,
    /// Bytes of hibernated layers on disk, when hibernation is configured.
    pub hibernate_disk_bytes: Option<u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

macro_rules! counter_fn {
    ($name:ident, $field:ident) => {
        pub fn $name(&self, function: &str) {
            *self.lock().$field.entry(function.to_string()).or_default() += 1;
        }
    };
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self, function: &str, status: u16, took: Duration) {
        let mut m = self.lock();
        *m.requests
            .entry((function.to_string(), status))
            .or_default() += 1;
        m.request_seconds
            .entry(function.to_string())
            .or_default()
            .observe(took);
        m.gateway_seconds
            .entry((function.to_string(), status))
            .or_default()
            .observe(took);
    }

    counter_fn!(function_error, function_errors);
    counter_fn!(timeout, timeouts);
    counter_fn!(warm_start, warm_starts);
    counter_fn!(launch_failure, launch_failures);
    counter_fn!(crash, crashes);
    counter_fn!(queue_rejection, queue_rejections);

    pub fn cold_start(&self, function: &str, kind: &'static str, took: Duration) {
        let mut m = self.lock();
        *m.cold_starts
            .entry((function.to_string(), kind))
            .or_default() += 1;
        m.launch_seconds
            .entry((function.to_string(), kind))
            .or_default()
            .observe(took);
    }

    pub fn eviction(&self, function: &str, reason: &'static str) {
        *self
            .lock()
            .evictions
            .entry((function.to_string(), reason))
            .or_default() += 1;
    }

    /// A hibernation of a VM of `function` (`result`: ok, failed) that took `took`.
    pub fn hibernation(&self, function: &str, result: &'static str, took: Duration) {
        let mut m = self.lock();
        *m.hibernations
            .entry((function.to_string(), result))
            .or_default() += 1;
        m.hibernate_seconds
            .entry(function.to_string())
            .or_default()
            .observe(took);
    }

    /// A wake of a hibernated VM of `function` (`result`: ok; refused, its
    /// layers changed; failed, the restore did).
    pub fn wake(&self, function: &str, result: &'static str) {
        *self
            .lock()
            .wakes
            .entry((function.to_string(), result))
            .or_default() += 1;
    }

    /// A VM of `function` moved to another node (`out`) or from one (`in`).
    pub fn migration(&self, function: &str, direction: &'static str) {
        *self
            .lock()
            .migrations
            .entry((function.to_string(), direction))
            .or_default() += 1;
    }

    /// Hibernated VMs dropped to keep within the disk budget.
    pub fn hibernated_dropped(&self, n: usize) {
        self.lock().hibernated_dropped += n as u64;
    }

    pub fn queued(&self, function: &str, waited: Duration) {
        self.lock()
            .queue_seconds
            .entry(function.to_string())
            .or_default()
            .observe(waited);
    }

    pub fn overhead(&self, d: Duration) {
        self.lock().overhead_seconds.observe(d);
    }

    /// Warm starts of `function` so far (tests, /functions).
    pub fn warm_starts(&self, function: &str) -> u64 {
        self.lock().warm_starts.get(function).copied().unwrap_or(0)
    }

    /// Invocations of `function` answered so far, whatever their status.
    pub fn invocations(&self, function: &str) -> u64 {
        self.lock()
            .requests
            .iter()
            .filter(|((f, _), _)| f == function)
            .map(|(_, n)| n)
            .sum()
    }

    /// Cold starts of `function` so far, every launch kind.
    pub fn cold_starts(&self, function: &str) -> u64 {
        self.lock()
            .cold_starts
            .iter()
            .filter(|((f, _), _)| f == function)
            .map(|(_, n)| n)
            .sum()
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self, g: &Gauges) -> String {
        let m = self.lock();
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
        };

        head(
            &mut o,
            "multivm_requests_total",
            "counter",
            "HTTP invocations answered, by function and status code.",
        );
        for ((f, code), n) in &m.requests {
            let _ = writeln!(
                o,
                "multivm_requests_total{{function=\"{}\",code=\"{code}\"}} {n}",
                esc(f)
            );
        }
        let simple: [(&str, &str, &BTreeMap<String, u64>); 6] = [
            (
                "multivm_function_errors_total",
                "Responses whose JSON carries an \"error\" field.",
                &m.function_errors,
            ),
            (
                "multivm_timeouts_total",
                "Requests past request_timeout; each killed its VM.",
                &m.timeouts,
            ),
            (
                "multivm_warm_starts_total",
                "Requests served by an idle VM.",
                &m.warm_starts,
            ),
            (
                "multivm_launch_failures_total",
                "VM launches that failed.",
                &m.launch_failures,
            ),
            (
                "multivm_vm_crashes_total",
                "VMs that died while idle or serving.",
                &m.crashes,
            ),
            (
                "multivm_queue_rejections_total",
                "Requests refused because the queue was full.",
                &m.queue_rejections,
            ),
        ];
        for (name, help, map) in simple {
            head(&mut o, name, "counter", help);
            for (f, n) in map {
                let _ = writeln!(o, "{name}{{function=\"{}\"}} {n}", esc(f));
            }
        }
        head(
            &mut o,
            "multivm_cold_starts_total",
            "counter",
            "VM launches for a request or pre-warming, by kind (boot or restore).",
        );
        for ((f, kind), n) in &m.cold_starts {
            let _ = writeln!(
                o,
                "multivm_cold_starts_total{{function=\"{}\",kind=\"{kind}\"}} {n}",
                esc(f)
            );
        }
        head(
            &mut o,
            "multivm_evictions_total",
            "counter",
            "Idle VMs stopped, by reason (lru: memory for another VM; idle_timeout; crashed).",
        );
        for ((f, reason), n) in &m.evictions {
            let _ = writeln!(
                o,
                "multivm_evictions_total{{function=\"{}\",reason=\"{reason}\"}} {n}",
                esc(f)
            );
        }

        let by_word: [(&str, &str, &str, &ByResult); 3] = [
            (
                "multivm_hibernations_total",
                "result",
                "Idle VMs of keep_state functions hibernated instead of stopped, by result (ok, failed).",
                &m.hibernations,
            ),
            (
                "multivm_wakes_total",
                "result",
                "Hibernated VMs restored for a launch, by result (ok; refused: its layers changed on disk; failed: the restore did).",
                &m.wakes,
            ),
            (
                "multivm_migrations_total",
                "direction",
                "Hibernated VMs moved to another node (out) or taken in from one (in).",
                &m.migrations,
            ),
        ];
        for (name, label, help, map) in by_word {
            head(&mut o, name, "counter", help);
            for ((f, word), n) in map {
                let _ = writeln!(
                    o,
                    "{name}{{function=\"{}\",{label}=\"{word}\"}} {n}",
                    esc(f)
                );
            }
        }
        head(
            &mut o,
            "multivm_hibernated_dropped_total",
            "counter",
            "Hibernated VMs dropped, oldest first, to keep within the hibernation disk budget.",
        );
        let _ = writeln!(
            o,
            "multivm_hibernated_dropped_total {}",
            m.hibernated_dropped
        );

        head(
            &mut o,
            "multivm_memory_used_mib",
            "gauge",
            "MiB reserved for VMs (guest memory plus VMM overhead) and VM shells.",
        );
        let _ = writeln!(o, "multivm_memory_used_mib {}", g.memory_used_mib);
        head(
            &mut o,
            "multivm_memory_budget_mib",
            "gauge",
            "The --mem budget in MiB.",
        );
        let _ = writeln!(o, "multivm_memory_budget_mib {}", g.memory_budget_mib);
        head(
            &mut o,
            "multivm_memory_high_water_mib",
            "gauge",
            "Highest multivm_memory_used_mib since start; never above the budget.",
        );
        let _ = writeln!(
            o,
            "multivm_memory_high_water_mib {}",
            g.memory_high_water_mib
        );
        head(&mut o, "multivm_vms", "gauge", "VMs by function and state.");
        for (f, state, n) in &g.vms {
            let _ = writeln!(
                o,
                "multivm_vms{{function=\"{}\",state=\"{state}\"}} {n}",
                esc(f)
            );
        }
        head(
            &mut o,
            "multivm_queue_depth",
            "gauge",
            "Requests waiting for a VM, by function.",
        );
        for (f, n) in &g.queue_depth {
            let _ = writeln!(o, "multivm_queue_depth{{function=\"{}\"}} {n}", esc(f));
        }
        if !g.shells_ready.is_empty() {
            head(
                &mut o,
                "multivm_shells_ready",
                "gauge",
                "VM shells ready to restore into, by shape.",
            );
            for ((mib, vcpus), n) in &g.shells_ready {
                let _ = writeln!(
                    o,
                    "multivm_shells_ready{{memory_mib=\"{mib}\",vcpus=\"{vcpus}\"}} {n}"
                );
            }
        }

        if let Some(bytes) = g.hibernate_disk_bytes {
            head(
                &mut o,
                "multivm_hibernate_disk_bytes",
                "gauge",
                "Bytes of hibernated layers on disk (waiting images and woken VMs' chains).",
            );
            let _ = writeln!(o, "multivm_hibernate_disk_bytes {bytes}");
            head(
                &mut o,
                "multivm_hibernated_vms",
                "gauge",
                "Hibernated VMs waiting for a wake, by function.",
            );
            for (f, n) in &g.hibernated {
                let _ = writeln!(o, "multivm_hibernated_vms{{function=\"{}\"}} {n}", esc(f));
            }
        }

        head(
            &mut o,
            "multivm_request_duration_seconds",
            "histogram",
            "Time from request received to response ready, by function.",
        );
        for (f, h) in &m.request_seconds {
            h.render(
                &mut o,
                "multivm_request_duration_seconds",
                &format!("function=\"{}\"", esc(f)),
            );
        }
        head(
            &mut o,
            "multivm_launch_duration_seconds",
            "histogram",
            "VM launch time until the guest agent is ready, by function and kind.",
        );
        for ((f, kind), h) in &m.launch_seconds {
            h.render(
                &mut o,
                "multivm_launch_duration_seconds",
                &format!("function=\"{}\",kind=\"{kind}\"", esc(f)),
            );
        }
        head(
            &mut o,
            "multivm_hibernate_duration_seconds",
            "histogram",
            "Time to hibernate an idle VM (layer written, VM exited, layer adopted), by function.",
        );
        for (f, h) in &m.hibernate_seconds {
            h.render(
                &mut o,
                "multivm_hibernate_duration_seconds",
                &format!("function=\"{}\"", esc(f)),
            );
        }
        head(
            &mut o,
            "multivm_queue_wait_seconds",
            "histogram",
            "Time requests waited for a VM, by function.",
        );
        for (f, h) in &m.queue_seconds {
            h.render(
                &mut o,
                "multivm_queue_wait_seconds",
                &format!("function=\"{}\"", esc(f)),
            );
        }
        head(
            &mut o,
            "multivm_scheduler_overhead_seconds",
            "histogram",
            "Per warm request, time spent in multivm itself: total minus the guest round trip.",
        );
        m.overhead_seconds
            .render(&mut o, "multivm_scheduler_overhead_seconds", "");

        // The OpenFaaS gateway's metrics.
        let of = |f: &str| esc(&format!("{f}.{NAMESPACE}"));
        head(
            &mut o,
            "gateway_function_invocation_total",
            "counter",
            "Function invocations, by function and status code (OpenFaaS).",
        );
        for ((f, code), n) in &m.requests {
            let _ = writeln!(
                o,
                "gateway_function_invocation_total{{function_name=\"{}\",code=\"{code}\"}} {n}",
                of(f)
            );
        }
        head(
            &mut o,
            "gateway_functions_seconds",
            "histogram",
            "Function invocation time, by function and status code (OpenFaaS).",
        );
        for ((f, code), h) in &m.gateway_seconds {
            h.render(
                &mut o,
                "gateway_functions_seconds",
                &format!("function_name=\"{}\",code=\"{code}\"", of(f)),
            );
        }
        head(
            &mut o,
            "gateway_service_count",
            "gauge",
            "VMs of each function: launching, idle and busy (OpenFaaS replicas).",
        );
        let mut replicas: BTreeMap<&str, usize> = BTreeMap::new();
        for (f, _, n) in &g.vms {
            *replicas.entry(f).or_default() += n;
        }
        for (f, n) in replicas {
            let _ = writeln!(
                o,
                "gateway_service_count{{function_name=\"{}\"}} {n}",
                of(f)
            );
        }
        o
    }
}

/// Reads one sample (`name{labels} value`) from a rendered page: for tests
/// and the benchmark script's checks.
pub fn sample(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counted() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(500));
        let mut out = String::new();
        h.render(&mut out, "x", "function=\"f\"");
        assert!(
            out.contains("x_bucket{function=\"f\",le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{function=\"f\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{function=\"f\",le=\"120\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{function=\"f\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{function=\"f\"} 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn render_has_counters_gauges_and_samples_parse_back() {
        let m = Metrics::default();
        m.request("hello", 200, Duration::from_millis(2));
        m.request("hello", 504, Duration::from_millis(2));
        m.warm_start("hello");
        m.cold_start("hello", "boot", Duration::from_millis(30));
        m.eviction("hello", "lru");
        let page = m.render(&Gauges {
            memory_used_mib: 136,
            memory_budget_mib: 1024,
            memory_high_water_mib: 272,
            vms: vec![("hello".into(), "idle", 1), ("hello".into(), "busy", 2)],
            queue_depth: vec![("hello".into(), 0)],
            shells_ready: vec![((128, 1), 2)],
            hibernated: vec![("hello".into(), 3)],
            hibernate_disk_bytes: Some(4096),
        });
        assert_eq!(
            sample(&page, "multivm_hibernated_vms{function=\"hello\"}"),
            Some(3.0)
        );
        assert_eq!(sample(&page, "multivm_hibernate_disk_bytes"), Some(4096.0));
        assert_eq!(
            sample(
                &page,
                "multivm_requests_total{function=\"hello\",code=\"504\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&page, "multivm_warm_starts_total{function=\"hello\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &page,
                "multivm_cold_starts_total{function=\"hello\",kind=\"boot\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&page, "multivm_memory_high_water_mib"), Some(272.0));
        assert_eq!(
            sample(&page, "multivm_vms{function=\"hello\",state=\"idle\"}"),
            Some(1.0)
        );
        assert_eq!(m.cold_starts("hello"), 1);
        assert_eq!(m.warm_starts("hello"), 1);
        assert_eq!(m.invocations("hello"), 2);
        // The OpenFaaS names beside them.
        assert_eq!(
            sample(
                &page,
                "gateway_function_invocation_total{function_name=\"hello.openfaas-fn\",code=\"504\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &page,
                "gateway_functions_seconds_count{function_name=\"hello.openfaas-fn\",code=\"200\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &page,
                "gateway_functions_seconds_bucket{function_name=\"hello.openfaas-fn\",code=\"200\",le=\"0.0025\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &page,
                "gateway_service_count{function_name=\"hello.openfaas-fn\"}"
            ),
            Some(3.0)
        );
        // Every sample line is `name[{labels}] number`.
        for l in page.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
