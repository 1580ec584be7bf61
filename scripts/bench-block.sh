#!/usr/bin/env bash
# virtio-blk read throughput: testguest reads a 64 MiB disk sequentially
# (64 KiB requests, 8 in flight) between two control-port timestamps,
# beside `dd` reading the same (page-cached) file on the host, alternating,
# N runs each (default 5). The guest's checksum of the whole disk is
# compared with the host's.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -q
tg=$(scripts/build-testguest.sh 2>/dev/null | tail -1)
python3 - "$runs" "$tg" <<'PY'
import os, re, statistics, subprocess, sys, tempfile, time

runs, tg = int(sys.argv[1]), sys.argv[2]
fr = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "firerunner")
tmp = tempfile.mkdtemp(prefix="snapvm-bench-")
disk = os.path.join(tmp, "disk.img")
size = 64 << 20
with open(disk, "wb") as f:
    f.write(os.urandom(size))

def fnv(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
    return h

guest, host = [], []
expect = None
for i in range(runs):
    out = subprocess.run([fr, "--kernel", tg, "--rootfs", disk, "--vsock_uds", os.path.join(tmp, "v.sock"),
                          "--kernel_args", "testguest.readbench=vda testguest.exit=reboot"],
                         capture_output=True, text=True, env=dict(os.environ, RUST_LOG="info"), timeout=300)
    stamps = [int(x) for x in re.findall(r"guest timestamp (\d+) us", out.stderr)]
    m = re.search(r"readbench vda bytes (\d+) fnv ([0-9a-f]{16})", out.stdout)
    if out.returncode != 0 or len(stamps) != 2 or not m:
        sys.exit(f"run {i} failed:\n{out.stdout}\n{out.stderr}")
    assert int(m.group(1)) == size
    if expect is None:
        with open(disk, "rb") as f:
            expect = fnv(f.read())
    assert int(m.group(2), 16) == expect, "guest read different bytes"
    guest.append(size / 2**20 / ((stamps[1] - stamps[0]) / 1e6))
    t = time.perf_counter()
    subprocess.run(["dd", f"if={disk}", "of=/dev/null", "bs=64K", "status=none"], check=True)
    host.append(size / 2**20 / (time.perf_counter() - t))

print(f"sequential read of a 64 MiB disk, {runs} runs (MiB/s, min/median/max)")
for name, v in (("testguest virtio-blk", guest), ("host dd bs=64K", host)):
    print(f"{name:22} {min(v):9.0f} {statistics.median(v):9.0f} {max(v):9.0f}")
print(f"guest/host median ratio: {statistics.median(guest) / statistics.median(host):.2f}")
import shutil; shutil.rmtree(tmp)
PY
