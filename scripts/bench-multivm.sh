#!/usr/bin/env bash
# multivm benchmarks on loopback against testguest functions:
#  1. warm throughput (req/s) and p50/p99 latency at 1, 4 and 16 concurrent
#     clients (keep-alive HTTP/1.1, `echo`, VMs pre-warmed);
#  2. multivm's own overhead per warm request (HTTP in -> vsock out and
#     back, excluding guest time), from its metrics;
#  3. cold-start rate (VM launches/s) under a budget that forces an LRU
#     eviction for every request, by boot, and by restore when firerunner
#     can make and load snapshots (a fresh firerunner, and a pool of 2 VM
#     shells);
#  4. beside them, singlevm's warm round trip (stdin line -> stdout line).
# Usage: scripts/bench-multivm.sh [SECONDS_PER_RUN (default 5)]
# The load generator is a std-only Rust program (scripts/loadgen.rs, shared
# with scripts/bench.py), built with rustc into the cache directory. Every
# run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}
mkdir -p "$cache"
cargo build --release -q
bin=$(realpath "${CARGO_TARGET_DIR:-target}")/release
tg=$(scripts/build-testguest.sh 2>/dev/null | tail -1)

loadgen="$cache/multivm-loadgen-$(sha256sum scripts/loadgen.rs | cut -c1-16)"
[[ -x $loadgen ]] || rustc -O --edition 2021 --crate-name loadgen -o "$loadgen" scripts/loadgen.rs

python3 - "$secs" "$tg" "$loadgen" "$bin" <<'PY'
import atexit, json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time, urllib.request

secs, tg, loadgen, bin = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
mv, sv, fr = (os.path.join(bin, b) for b in ("multivm", "singlevm", "firerunner"))
tmp = tempfile.mkdtemp(prefix="snapvm-bench-mv-")
rootfs = os.path.join(tmp, "rootfs.img")
open(rootfs, "wb").write(b"\0" * 4096)

def app(name, lines):
    p = os.path.join(tmp, name)
    data = "".join(l + "\n" for l in lines).encode()
    open(p, "wb").write(data + b"\0" * (4096 - len(data)))
    return p

def config(functions, name="multivm.yaml", top=""):
    y = f"kernel_path: {tg}\nvm_overhead: 8\n{top}functions:\n"
    for fname, lines in functions.items():
        y += f"  {fname}:\n" + "".join(f"    {l}\n" for l in lines)
    p = os.path.join(tmp, name)
    open(p, "w").write(y)
    return p

daemons = []
@atexit.register
def _cleanup():
    for d in daemons:
        if d.p.poll() is None: d.p.kill(); d.p.wait()
    shutil.rmtree(tmp, ignore_errors=True)

class Daemon:
    def __init__(self, cfg, mem):
        env = dict(os.environ, XDG_RUNTIME_DIR=tmp, RUST_LOG="error")
        self.p = subprocess.Popen([mv, "--config", cfg, "--mem", str(mem), "--listen", "127.0.0.1:0"],
                                  stdout=subprocess.PIPE, env=env, text=True)
        daemons.append(self)
        line = self.p.stdout.readline()
        if not line.startswith("listening on http://"):
            self.p.kill(); sys.exit(f"multivm did not start: {line!r}")
        self.addr = line.strip().removeprefix("listening on http://")
    def get(self, path):
        return urllib.request.urlopen(f"http://{self.addr}{path}", timeout=30).read().decode()
    def metrics(self):
        out = {}
        for l in self.get("/metrics").splitlines():
            if l and not l.startswith("#"):
                k, v = l.rsplit(" ", 1)
                out[k] = float(v)
        return out
    def wait_idle(self, n, limit=60):
        t = time.time()
        while sum(v["state"] == "idle" for v in json.loads(self.get("/vms"))) < n:
            if time.time() - t > limit: sys.exit("VMs never became idle")
            time.sleep(0.05)
    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        if self.p.wait(timeout=60) != 0: sys.exit("multivm did not exit 0")

def load(addr, paths, clients, seconds, body='{"i": 1}'):
    out = subprocess.run([loadgen, addr, paths, body, str(clients), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 120, check=True)
    return json.loads(out.stdout)

def hist_quantile(m, name, q, labels=""):
    """Upper bound of the bucket holding quantile q of histogram `name`
    (samples whose labels contain `labels`)."""
    buckets = sorted((float(re.search(r'le="([^"]+)"', k).group(1)), v)
                     for k, v in m.items() if k.startswith(name + "_bucket") and labels in k)
    if not buckets or buckets[-1][1] == 0: return float("nan")
    for le, c in buckets:
        if c >= q * buckets[-1][1]: return le
    return float("inf")

# 1. + 2. Warm throughput and latency; overhead from the metrics.
d = Daemon(config({"echo": [f"runtimefs: {rootfs}", f"appfs: {app('echo.img', ['fn=echo'])}",
                            "memory: 32", "concurrency_limit: 16", "min_idle: 16", "max_queue: 1024"]}), 16 * 40)
d.wait_idle(16)
print(f"multivm warm invocations of testguest `echo`, {secs:g} s per run, keep-alive HTTP/1.1")
print(f"  {'clients':>7} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'max us':>8} {'errors':>6}")
for c in (1, 4, 16):
    load(d.addr, "/function/echo", c, 1)  # warm-up
    r = load(d.addr, "/function/echo", c, secs)
    print(f"  {c:>7} {r['rps']:>9.0f} {r['p50_us']:>8} {r['p99_us']:>8} {r['max_us']:>8} {r['errors']:>6}")
m = d.metrics()
n = m["multivm_scheduler_overhead_seconds_count"]
mean = m["multivm_scheduler_overhead_seconds_sum"] / n * 1e6
print(f"  multivm overhead per warm request (total - guest round trip), {n:.0f} requests:")
print(f"    mean {mean:.0f} us, p50 <= {hist_quantile(m, 'multivm_scheduler_overhead_seconds', 0.5) * 1e6:.0f} us, "
      f"p99 <= {hist_quantile(m, 'multivm_scheduler_overhead_seconds', 0.99) * 1e6:.0f} us (histogram buckets)")
print(f"  cold starts {sum(v for k, v in m.items() if k.startswith('multivm_cold_starts_total')):.0f} (pre-warm only)")
d.stop()

# 3. Cold starts forced by eviction: room for 2 VMs, 4 functions in turn.
def cold_rate(kind, extra, shells=0):
    fns = {f"f{i}": [f"runtimefs: {rootfs}", f"appfs: {app(f'h{i}.img', ['fn=hello'])}", "memory: 32"] + extra
           for i in range(4)}
    top = f"shells:\n  - memory: 32\n    count: {shells}\n" if shells else ""
    # Each shell is set aside at vm_overhead (8 MiB): room for 2 VMs still.
    d = Daemon(config(fns, f"{kind}.yaml", top), 2 * 40 + shells * 8)
    paths = ",".join(f"/function/f{i}" for i in range(4))
    for c in (1, 2):
        r = load(d.addr, paths, c, secs, "{}")
        m = d.metrics()
        launches = sum(v for k, v in m.items() if k.startswith("multivm_cold_starts_total"))
        ev = sum(v for k, v in m.items() if k.startswith("multivm_evictions_total"))
        p50 = hist_quantile(m, "multivm_launch_duration_seconds", 0.5, f'kind="{kind}"')
        hw = m["multivm_memory_high_water_mib"]
        print(f"  {kind:>7} {c:>7} {r['rps']:>12.1f} {r['p50_us']:>8} {r['p99_us']:>8} {r['errors']:>6}   "
              f"(launches {launches:.0f}, evictions {ev:.0f}, launch p50 <= {p50 * 1e3:g} ms, high water {hw:.0f} MiB)")
    d.stop()

print(f"cold starts forced by LRU eviction: budget 2 VMs, 4 functions in turn, {secs:g} s per run")
print(f"  {'launch':>7} {'clients':>7} {'launches/s':>12} {'p50 us':>8} {'p99 us':>8} {'errors':>6}")
cold_rate("boot", [])
snap = os.path.join(tmp, "snap")
os.makedirs(snap)
made = subprocess.run([fr, "--kernel", tg, "--rootfs", rootfs, "--appfs", app("hs.img", ["fn=hello"]),
                       "--mem_size", "32", "--dump_dir", snap, "--console", os.path.join(tmp, "dump.log")],
                      capture_output=True, text=True, timeout=120)
if made.returncode == 0:
    cold_rate("restore", [f"load_dir: {snap}"])
    cold_rate("shell", [f"load_dir: {snap}"], shells=2)
else:
    print(f"  restore: not measured; making a snapshot failed: {made.stderr.strip().splitlines()[-1] if made.stderr.strip() else made.returncode}")

# 4. singlevm's warm round trip, same guest function, for comparison.
p = subprocess.Popen([sv, "--kernel", tg, "--rootfs", rootfs, "--appfs", app("sv.img", ["fn=echo"])],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
rt = []
for i in range(1050):
    t = time.perf_counter_ns()
    p.stdin.write(b'{"i": 1}\n')
    p.stdout.readline()
    if i >= 50: rt.append((time.perf_counter_ns() - t) / 1000)
p.stdin.close(); p.wait(timeout=30)
rt.sort()
print(f"singlevm warm round trip (stdin line -> stdout line), 1000 echo requests: "
      f"p50 {statistics.median(rt):.0f} us, p99 {rt[int(len(rt) * 0.99) - 1]:.0f} us")
PY
