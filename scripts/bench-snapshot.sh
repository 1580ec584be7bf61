#!/usr/bin/env bash
# Snapshot benchmark (issue 6): testguest VMs of 128 MiB and 1 GiB, N runs
# each (default 10), min/median/max, all in one run:
#   create       full snapshot create time (firerunner's own measure, from
#                the guest's 124 to the directory in place) and the memory
#                file's size (allocated bytes; its apparent size is RAM)
#   floor        create VM + register RAM + first KVM_RUN, nothing else
#                (examples/restore_floor.rs)
#   restore      exec -> first KVM_RUN of a restore, lazy and --copy_base
#   first resp.  exec -> first response, booted vs restored (lazy, eager):
#                this script plays the controller (listens on the agent
#                port, sends the init frame and one request)
#   diff         (issue 7) on the full snapshot as base: diff layer create
#                time and size with 0 (hello), 16 and 64 MiB dirtied
#                (testguest `touch mib=N` fills N MiB at app load), and
#                restore base-only vs base + diff (lazy, --copy_diff), to
#                first KVM_RUN and, for hello, to first response
# "exec" is this script's CLOCK_MONOTONIC just before spawning, passed as
# SNAPVM_SPAWN_MONO_NS; firerunner and the floor report against it.
# Usage: scripts/bench-snapshot.sh [RUNS]   (SIZES="128 1024" to choose;
# DIFF_MIB="0 16 64" the dirtied sizes, DIFF_SIZES="128" the VM sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
sizes=${SIZES:-"128 1024"}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q --bins --example restore_floor
tg=$(scripts/build-testguest.sh 2>/dev/null | tail -1)
python3 - "$runs" "$tg" "$sizes" "$target/release" "${DIFF_MIB:-0 16 64}" "${DIFF_SIZES:-128}" <<'PY'
import json, os, re, signal, socket, statistics, struct, subprocess, sys, tempfile, time, shutil

sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
from bench import read_frame, send_frame  # the guest protocol's framing

runs, tg, sizes, bindir = int(sys.argv[1]), sys.argv[2], [int(x) for x in sys.argv[3].split()], sys.argv[4]
diff_mibs, diff_sizes = [int(x) for x in sys.argv[5].split()], [int(x) for x in sys.argv[6].split()]
fr = os.path.abspath(os.path.join(bindir, "firerunner"))
floor = os.path.abspath(os.path.join(bindir, "examples", "restore_floor"))
tmp = tempfile.mkdtemp(prefix="snapvm-bench-snap-")
rootfs = os.path.join(tmp, "rootfs.img")
with open(rootfs, "wb") as f:
    f.write(os.urandom(64 << 20))
def app_image(name, manifest):
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(manifest.encode().ljust(4096, b"\0"))
    return path

app = app_image("hello.img", "fn=hello\n")

def spawn(argv, **kw):
    env = dict(os.environ, RUST_LOG="info", SNAPVM_SPAWN_MONO_NS=str(time.monotonic_ns()))
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

def vm_args(mem, i, extra, appfs=app):
    return [fr, "--kernel", tg, "--rootfs", rootfs, "--appfs", appfs, "--mem_size", str(mem),
            "--console", os.path.join(tmp, "console.log"),
            "--vsock_uds", os.path.join(tmp, f"v{i}.sock")] + extra

def wait_line(p, pattern, limit=60):
    deadline = time.time() + limit
    for raw in p.stderr:
        line = raw.decode(errors="replace")
        m = re.search(pattern, line)
        if m:
            return m
        if time.time() > deadline:
            break
    raise SystemExit(f"no line matching {pattern!r} (exit {p.poll()})")

def stop(p):
    p.kill()
    p.wait()

def create(mem, i, snap):
    shutil.rmtree(snap, ignore_errors=True)
    p = spawn(vm_args(mem, i, ["--dump_dir", snap]))
    m = wait_line(p, r"snapshot written to .* in (\d+) us")
    p.wait()
    assert p.returncode == 0, p.returncode
    st = os.stat(os.path.join(snap, "memory"))
    return int(m.group(1)) / 1000, st.st_blocks * 512 / 2**20, os.path.getsize(os.path.join(snap, "snapshot.json")) / 1024

def create_diff(mem, i, base, diff, appfs):
    shutil.rmtree(diff, ignore_errors=True)
    p = spawn(vm_args(mem, i, ["--load_dir", base, "--dump_dir", diff], appfs))
    m = wait_line(p, r"diff snapshot written to .* in (\d+) us")
    p.wait()
    assert p.returncode == 0, p.returncode
    with open(os.path.join(diff, "snapshot.json")) as f:
        held = sum(l for _, l in json.load(f)["state"]["memory"]["layers"][-1]["ranges"])
    blocks = os.stat(os.path.join(diff, "memory")).st_blocks * 512
    return int(m.group(1)) / 1000, held / 2**20, blocks / 2**20

def restore_latency(mem, i, snap, extra):
    p = spawn(vm_args(mem, i, ["--load_dir", snap] + extra))
    m = wait_line(p, r"restore phases \(us\): (.*?)(?: \[alongside: (.*)\])?; first KVM_RUN (\d+) us after spawn")
    stop(p)
    parts = m.group(1).split(", ") + (m.group(2).split(", ") if m.group(2) else [])
    phases = dict((k.strip(), int(v)) for k, v in (x.rsplit(" ", 1) for x in parts))
    return int(m.group(3)) / 1000, phases

def floor_latency(mem):
    env = dict(os.environ, SNAPVM_SPAWN_MONO_NS=str(time.monotonic_ns()))
    out = subprocess.run([floor, "--mem_size", str(mem)], env=env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"floor: spawn→main (\d+), create VM (\d+), register \d+ MiB (\d+), →first KVM_RUN (\d+).*first KVM_RUN (\d+) us after spawn", out)
    phases = {"spawn→main": int(m.group(1)), "create VM": int(m.group(2)), "memslots": int(m.group(3)), "→first KVM_RUN": int(m.group(4))}
    return int(m.group(5)) / 1000, phases

def first_response(mem, i, extra):
    uds = os.path.join(tmp, f"r{i}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = f"{uds}_1234"
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(60)
    t0 = time.monotonic_ns()
    argv = vm_args(mem, i, extra)
    argv[argv.index("--vsock_uds") + 1] = uds
    env = dict(os.environ, RUST_LOG="warn", SNAPVM_SPAWN_MONO_NS=str(t0))
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn, _ = listener.accept()
    send_frame(conn, {"init": {"seed": os.urandom(32).hex(), "realtime_ns": time.time_ns()}})
    assert read_frame(conn) == {"ready": True}
    send_frame(conn, {"name": "bench"})
    resp = read_frame(conn)
    t = (time.monotonic_ns() - t0) / 1e6
    assert resp == {"message": "hello, bench"}, resp
    conn.close(); listener.close(); os.unlink(path)
    stop(p)
    return t

def stats(xs):
    return f"{min(xs):8.2f} {statistics.median(xs):8.2f} {max(xs):8.2f}"

print(f"snapshot benchmark: {runs} runs per row, testguest, 64 MiB rootfs; ms unless noted")
print(f"{'':44s} {'min':>8s} {'median':>8s} {'max':>8s}")
summary = []
for mem in sizes:
    snap = os.path.join(tmp, f"snap{mem}")
    created = [create(mem, i, snap) for i in range(runs)]
    fl = [floor_latency(mem) for _ in range(runs)]
    lazy = [restore_latency(mem, i, snap, []) for i in range(runs)]
    eager = [restore_latency(mem, i, snap, ["--copy_base"]) for i in range(runs)]
    boot_r = [first_response(mem, i, []) for i in range(runs)]
    lazy_r = [first_response(mem, i, ["--load_dir", snap]) for i in range(runs)]
    eager_r = [first_response(mem, i, ["--load_dir", snap, "--copy_base"]) for i in range(runs)]
    print(f"--- {mem} MiB")
    print(f"{'create full snapshot':44s} {stats([c[0] for c in created])}")
    print(f"{'memory file, allocated MiB':44s} {stats([c[1] for c in created])}")
    print(f"{'snapshot.json, KiB':44s} {stats([c[2] for c in created])}")
    print(f"{'floor: exec -> first KVM_RUN':44s} {stats([x[0] for x in fl])}")
    print(f"{'restore lazy: exec -> first KVM_RUN':44s} {stats([x[0] for x in lazy])}")
    print(f"{'restore --copy_base: exec -> first KVM_RUN':44s} {stats([x[0] for x in eager])}")
    for name, rows in (("floor", fl), ("lazy", lazy), ("copy", eager)):
        keys = list(rows[0][1].keys())
        med = ", ".join(f"{k} {statistics.median(r[1][k] for r in rows) / 1000:.2f}" for k in keys)
        print(f"  {name} phase medians: {med}")
    print(f"{'boot -> first response':44s} {stats(boot_r)}")
    print(f"{'restore lazy -> first response':44s} {stats(lazy_r)}")
    print(f"{'restore --copy_base -> first response':44s} {stats(eager_r)}")
    med = statistics.median
    summary.append((mem, med([x[0] for x in fl]), med([x[0] for x in lazy]), med([x[0] for x in eager]),
                    med(boot_r), med(lazy_r), med(eager_r), med([c[0] for c in created]),
                    med([c[1] for c in created])))
diff_summary = []
for mem in diff_sizes:
    base = os.path.join(tmp, f"base{mem}")
    create(mem, 0, base)
    apps = {n: app if n == 0 else app_image(f"touch{n}.img", f"fn=touch\nmib={n}\n") for n in diff_mibs}
    diffs = {n: os.path.join(tmp, f"diff{mem}-{n}") for n in diff_mibs}
    made = {n: [] for n in diff_mibs}
    for i in range(runs):  # interleaved: every size in each round
        for n in diff_mibs:
            made[n].append(create_diff(mem, i, base, diffs[n], apps[n]))
    base_only, lazy_d, copy_d = [], {n: [] for n in diff_mibs}, {n: [] for n in diff_mibs}
    for i in range(runs):
        base_only.append(restore_latency(mem, i, base, [])[0])
        for n in diff_mibs:
            lazy_d[n].append(restore_latency(mem, i, base, ["--diff_dirs", diffs[n]])[0])
            copy_d[n].append(restore_latency(mem, i, base, ["--diff_dirs", diffs[n], "--copy_diff"])[0])
    print(f"--- diff layers, {mem} MiB VM, on a full snapshot")
    for n in diff_mibs:
        what = "hello" if n == 0 else f"touch {n} MiB"
        print(f"{'diff create, ' + what:44s} {stats([x[0] for x in made[n]])}")
        print(f"{'  diff holds, MiB':44s} {stats([x[1] for x in made[n]])}")
        print(f"{'  diff memory file, allocated MiB':44s} {stats([x[2] for x in made[n]])}")
    print(f"{'restore base only: exec -> first KVM_RUN':44s} {stats(base_only)}")
    for n in diff_mibs:
        print(f"{f'restore base+diff({n}) lazy':44s} {stats(lazy_d[n])}")
        print(f"{f'restore base+diff({n}) --copy_diff':44s} {stats(copy_d[n])}")
    hello = [n for n in diff_mibs if n == 0]
    if hello:
        first_base, first_diff = [], []
        for i in range(runs):
            first_base.append(first_response(mem, i, ["--load_dir", base]))
            first_diff.append(first_response(mem, i, ["--load_dir", base, "--diff_dirs", diffs[0]]))
        print(f"{'hello: base only -> first response':44s} {stats(first_base)}")
        print(f"{'hello: base+diff -> first response':44s} {stats(first_diff)}")
    med = statistics.median
    diff_summary.append((mem, {n: (med([x[0] for x in made[n]]), med([x[1] for x in made[n]]),
                                   med(lazy_d[n]), med(copy_d[n])) for n in diff_mibs}, med(base_only)))

print("--- side by side (medians)")
print("  Firecracker on this host: restore 11.1 ms, full create 207 ms for 128 MiB")
print("  targets: restore <= floor + 2 ms; create <= 103 ms (half of Firecracker's)")
for mem, fl, lz, eg, br, lr, er, cr, sz in summary:
    print(f"  {mem:5d} MiB: restore lazy {lz:.2f} = floor {fl:.2f} + {lz - fl:.2f}; "
          f"copy {eg:.2f} = floor + {eg - fl:.2f}; first response boot {br:.2f} vs restore "
          f"{lr:.2f} (x{br / lr:.1f}), copy {er:.2f}; create {cr:.2f} ms, {sz:.2f} MiB on disk")
for mem, rows, bo in diff_summary:
    print(f"  {mem:5d} MiB diffs (Firecracker on this host: 16.5 ms for 16 MiB dirtied, 1.5 ms for none):")
    for n, (cr, held, lz, cp) in rows.items():
        print(f"    {n:3d} MiB dirtied: create {cr:.2f} ms, holds {held:.2f} MiB; restore lazy "
              f"{lz:.2f} (base only {bo:.2f}, x{lz / bo:.2f}), --copy_diff {cp:.2f}")
shutil.rmtree(tmp, ignore_errors=True)
PY
