#!/usr/bin/env bash
# Boot benchmark: firerunner on testguest, N runs (default 20).
# Reports min/median/max of
#   exec -> first KVM_RUN        (VMM set-up cost)
#   exec -> first guest output   (first serial byte on the console pipe)
#   exec -> boot done            (guest wrote 123 to the control port)
#   firerunner RSS minus guest RAM pages, at boot done
# Timestamps: the script's clock just before exec, firerunner's log clock
# (same host realtime clock, microseconds) and the pipe read time.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
mem=${MEM:-128}
cargo build --release -q
tg=$(scripts/build-testguest.sh 2>/dev/null | tail -1)
python3 - "$runs" "$tg" "$mem" <<'PY'
import datetime, os, select, signal, statistics, subprocess, sys, tempfile, time

runs, tg, mem = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
fr = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "firerunner")
tmp = tempfile.mkdtemp(prefix="snapvm-bench-")
rootfs = os.path.join(tmp, "rootfs.img")
with open(rootfs, "wb") as f:
    f.write(b"\0" * 4096)

def log_time(line):
    # "[2026-11-21T21:35:48.961837Z INFO ...": realtime, microseconds.
    ts = line[1:line.index("Z")]
    dt = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
    return int(dt.timestamp() * 1_000_000) * 1000

def rss_minus_guest(pid, guest_bytes):
    total = guest = 0
    size = rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
            elif parts[0] == "Rss:":
                rss = int(parts[1]) * 1024
                total += rss
                if size in guest_bytes:
                    guest += rss
    return total - guest

regions = [mem << 20] if mem <= 3072 else [3 << 30, (mem << 20) - (3 << 30)]
res = {"exec->first KVM_RUN": [], "exec->first output": [], "exec->boot done": [], "RSS - guest (MiB)": []}
for i in range(runs):
    env = dict(os.environ, RUST_LOG="info")
    t0 = time.time_ns()
    p = subprocess.Popen([fr, "--kernel", tg, "--rootfs", rootfs, "--mem_size", str(mem),
                          "--vsock_uds", os.path.join(tmp, f"v{i}.sock"),
                          "--kernel_args", "testguest.exit=halt"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first_out = None
    err = b""
    first_run = boot_done = None
    deadline = time.time() + 60
    while boot_done is None and time.time() < deadline:
        r, _, _ = select.select([p.stdout, p.stderr], [], [], 1)
        for s in r:
            chunk = os.read(s.fileno(), 65536)
            if s is p.stdout and chunk and first_out is None:
                first_out = time.time_ns()
            if s is p.stderr:
                err += chunk
        for line in err.decode(errors="replace").splitlines():
            if "first KVM_RUN" in line and first_run is None:
                first_run = log_time(line)
            if "guest boot done" in line:
                boot_done = log_time(line)
    if boot_done is None:
        p.kill()
        sys.exit(f"run {i}: no boot done:\n{err.decode(errors='replace')}")
    res["RSS - guest (MiB)"].append(rss_minus_guest(p.pid, regions) / 2**20)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=10)
    res["exec->first KVM_RUN"].append((first_run - t0) / 1e6)
    res["exec->first output"].append((first_out - t0) / 1e6)
    res["exec->boot done"].append((boot_done - t0) / 1e6)

print(f"firerunner boot, testguest, {mem} MiB, {runs} runs")
print(f"{'metric':24} {'min':>8} {'median':>8} {'max':>8}")
for k, v in res.items():
    unit = "" if "MiB" in k else " ms"
    print(f"{k:24} {min(v):8.2f} {statistics.median(v):8.2f} {max(v):8.2f}{unit}")
import shutil; shutil.rmtree(tmp)
PY
