#!/usr/bin/env bash
# vsock benchmarks, each beside a host-only floor measured in the same run:
#  1. warm round trip through singlevm (stdin line -> stdout line) of N echo
#     requests (default 2000), vs the same framed JSON round trip over a
#     Unix socket to an echo thread on the host;
#  2. throughput of 1 MiB payloads (>= 20 runs) into a guest vsock port that
#     discards them (testguest `sink=`), vs a Unix socket to a discarding
#     thread on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
cargo build --release -q
tg=$(scripts/build-testguest.sh 2>/dev/null | tail -1)
python3 - "$n" "$tg" <<'PY'
import json, os, socket, statistics, struct, subprocess, sys, tempfile, threading, time

n, tg = int(sys.argv[1]), sys.argv[2]
sv = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "singlevm")
fr = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "firerunner")
tmp = tempfile.mkdtemp(prefix="snapvm-bench-")
rootfs = os.path.join(tmp, "rootfs.img")
open(rootfs, "wb").write(b"\0" * 4096)
def app(name, lines):
    p = os.path.join(tmp, name)
    data = "".join(l + "\n" for l in lines).encode()
    open(p, "wb").write(data + b"\0" * (4096 - len(data)))
    return p

def pct(v):
    v = sorted(v)
    return f"min {v[0]:8.1f}  median {statistics.median(v):8.1f}  p99 {v[int(len(v) * 0.99) - 1]:8.1f}  max {v[-1]:8.1f}"

# 1. Round trip through singlevm.
p = subprocess.Popen([sv, "--kernel", tg, "--rootfs", rootfs, "--appfs", app("echo.img", ["fn=echo"])],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
rt = []
for i in range(n + 50):
    line = json.dumps({"i": i}).encode() + b"\n"
    t = time.perf_counter_ns()
    p.stdin.write(line)
    got = p.stdout.readline()
    dt = (time.perf_counter_ns() - t) / 1000
    assert json.loads(got) == {"i": i}, got
    if i >= 50:
        rt.append(dt)
p.stdin.close(); p.wait(timeout=30)

# Floor: the same framed round trip to an echo thread over a Unix socket.
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
def recv_exact(s, k):
    buf = b""
    while len(buf) < k:
        c = s.recv(k - len(buf))
        if not c: raise EOFError
        buf += c
    return buf
def echo():
    try:
        while True:
            (k,) = struct.unpack(">I", recv_exact(b, 4))
            body = recv_exact(b, k)
            b.sendall(struct.pack(">I", k) + json.dumps(json.loads(body)).encode())
    except EOFError:
        pass
threading.Thread(target=echo, daemon=True).start()
floor = []
for i in range(n + 50):
    body = json.dumps({"i": i}).encode()
    t = time.perf_counter_ns()
    a.sendall(struct.pack(">I", len(body)) + body)
    (k,) = struct.unpack(">I", recv_exact(a, 4)); recv_exact(a, k)
    dt = (time.perf_counter_ns() - t) / 1000
    if i >= 50:
        floor.append(dt)
a.close()

print(f"warm round trip, {n} echo requests (us)")
print(f"  singlevm stdin->stdout  {pct(rt)}")
print(f"  host unix socket floor  {pct(floor)}")
print(f"  ratio of medians: {statistics.median(rt) / statistics.median(floor):.1f}x")

# 2. Throughput into a discarding guest port.
uds = os.path.join(tmp, "v.sock")
vm = subprocess.Popen([fr, "--kernel", tg, "--rootfs", rootfs, "--appfs", app("sink.img", ["fn=echo", "sink=6000"]),
                       "--vsock_uds", uds, "--console", os.path.join(tmp, "console.log")])
payload = os.urandom(1 << 20)
def connect():
    s = socket.socket(socket.AF_UNIX); s.connect(uds)
    s.sendall(b"CONNECT 6000\n")
    f = s.makefile("rb")
    line = f.readline()
    if not line.startswith(b"OK "): raise ConnectionError(line)
    return s, f
deadline = time.time() + 60
while True:
    try:
        s, f = connect(); s.close(); break
    except (ConnectionError, OSError):
        if time.time() > deadline: sys.exit("guest never listened")
        time.sleep(0.05)
tput = []
for i in range(25):
    s, f = connect()
    t = time.perf_counter()
    s.sendall(payload); s.shutdown(socket.SHUT_WR)
    count = int(f.read().strip())
    dt = time.perf_counter() - t
    assert count == len(payload), count
    tput.append(len(payload) / 2**20 / dt)
    s.close()
vm.kill(); vm.wait()

a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
def sink():
    while True:
        total = 0
        while True:
            c = b.recv(1 << 16)
            if c == b"END": break
            total += len(c)
            if total >= len(payload): break
        b.sendall(str(total).encode() + b"\n")
threading.Thread(target=sink, daemon=True).start()
host = []
fa = a.makefile("rb")
for i in range(25):
    t = time.perf_counter()
    a.sendall(payload)
    assert int(fa.readline()) == len(payload)
    host.append(len(payload) / 2**20 / (time.perf_counter() - t))
print("1 MiB payload throughput, 25 runs (MiB/s)")
print(f"  guest vsock sink        {pct(tput)}")
print(f"  host unix socket floor  {pct(host)}")
print(f"  ratio of medians: {statistics.median(tput) / statistics.median(host):.2f}")
import shutil; shutil.rmtree(tmp)
PY
