#!/usr/bin/env python3
"""snapvm benchmarks side by side, driven by scripts/bench.sh.

Sections (--only picks some; each replaces its own rows in results.json):
  boot      exec -> first guest output and -> "boot done": firerunner vs
            QEMU microvm on the same testguest ELF, same memory; and each
            VMM's memory overhead with the guest booted and idle.
  snapshot  snapshot create and restore-to-running, 128 MiB and 1 GiB:
            firerunner --dump_dir/--load_dir (full, and a diff layer on
            it) vs QEMU migrate to a file / -incoming.
  ladder    snapvm's cold-start ladder: exec -> first response of `touch`
            functions with 4/16/64 MiB working sets: boot, and language
            snapshot + diff layer restored lazily, eagerly and with the
            recorded working set (--load_ws); cold and warm page cache,
            with page faults.
  multivm   warm throughput and p50/p99 at 1, 4 and 16 clients.
  provider  the OpenFaaS invocation path against snapvm's JSON path, on
            one testguest `http` function, interleaved: warm throughput and
            p99 of a raw text/plain body (request envelope in, response
            envelope out) and of a JSON body (the value itself), at 1 and
            4 clients; and deploy -> first answer of a testguest function
            through POST /system/functions (preparation + cold boot).
  density   idle restored VMs under multivm until their PSS sums to 4 GiB
            (or the host's pid space runs short).
  isolation what firerunner's walls cost: exec -> first response of the
            `hello` function with its seccomp filters and with
            --no_seccomp, booted and restored (lazy, and with its working
            set), 128 MiB.
  shells    multivm request -> first response of a cold function (every
            request evicts the other function's VM): boot, fresh restore,
            and restore into a pooled VM shell, three daemons interleaved.
  jail      singlevm exec -> first response, boot and lazy restore, jailed
            and --no_jail interleaved; PSS per idle restored VM under
            multivm, jailed and not (no jailer stays beside a VM).
  net       singlevm exec -> first response, boot and lazy restore, with
            a network (--net: a namespace, TAP, uplink and NAT made per
            VM, src/network.rs) and without, jailed, interleaved.
  hibernate multivm request -> first response of a keep_state function
            woken from its hibernated layer vs the same function restored
            afresh, 128 MiB and 1 GiB, interleaved; the hibernation; and
            a VM moved between two daemons on loopback (POST
            /system/migrate), then woken by the target's next request.
A/B comparisons are interleaved (A, B, A, B...) so that drift on the host
hits both sides alike. Every figure is measured; none is computed.

Clocks: "exec" is this script's clock read just before spawning the VMM.
Guest output is timestamped when the pipe read returns; firerunner's own
log lines (restore, snapshot) are against SNAPVM_SPAWN_MONO_NS or its own
timers; QEMU's QMP events carry QEMU's realtime timestamp.
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SECTIONS = ("boot", "snapshot", "ladder", "multivm", "provider", "density", "isolation", "jail", "shells", "net",
            "hibernate")
MIB = 1 << 20

# QEMU microvm trimmed as its documentation suggests for a fast boot (no
# option ROMs, RTC, PIT or PIC) and without ACPI (its firmware, qboot, then
# writes an MP table). The ISA serial port stays: it is the guest console.
QEMU_MACHINE = "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,acpi=off"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ------------------------------------------------------------- results


class Results:
    """Rows of results.json: one per (bench, system, variant, metric, params),
    with every sample and its summary. New kinds of measurement are new rows;
    nothing else in the file needs to change."""

    def __init__(self):
        self.rows = []

    def add(self, bench, system, variant, metric, unit, samples, **params):
        if not samples:
            raise BenchError(f"{bench}/{system}/{variant}/{metric}: no samples")
        s = sorted(samples)
        self.rows.append({
            "bench": bench, "system": system, "variant": variant,
            "metric": metric, "unit": unit, "params": params,
            "n": len(s), "median": statistics.median(s), "mean": statistics.fmean(s),
            "p10": quantile(s, 0.10), "p90": quantile(s, 0.90),
            "min": s[0], "max": s[-1], "samples": samples,
        })


def quantile(sorted_samples, q):
    """Nearest-rank quantile."""
    i = max(1, math.ceil(q * len(sorted_samples)))
    return sorted_samples[i - 1]


def machine():
    model = ""
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "qemu": qemu.stdout.splitlines()[0],
    }


# ------------------------------------------------------- process probes


def smaps_rollup(pid):
    """/proc/PID/smaps_rollup as {field: bytes}."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def guest_ram_rss(pid, guest_bytes):
    """Rss and Anonymous bytes of the mappings that are guest RAM: the VMAs
    exactly `guest_bytes` long (both VMMs map each RAM region as one
    anonymous VMA of the region's size). Exactly one must match."""
    found = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", parts[0]):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                cur = {"Rss": 0, "Anonymous": 0} if hi - lo == guest_bytes else None
                if cur is not None:
                    found.append(cur)
            elif cur is not None and parts[0].rstrip(":") in cur:
                cur[parts[0].rstrip(":")] = int(parts[1]) * 1024
    if len(found) != 1:
        raise BenchError(f"pid {pid}: {len(found)} mappings of {guest_bytes >> 20} MiB, expected one (guest RAM)")
    return found[0]


def mapping_sharing(pid, path):
    """Shared and private bytes (smaps) of `pid`'s mappings of file `path`."""
    shared = private = 0
    cur = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", parts[0]):
                cur = len(parts) >= 6 and parts[5] == path
            elif cur and parts[0] in ("Shared_Clean:", "Shared_Dirty:"):
                shared += int(parts[1]) * 1024
            elif cur and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                private += int(parts[1]) * 1024
    return shared, private


def overhead(pid, guest_bytes):
    """VMM memory overhead: the process's Rss (smaps_rollup) minus the Rss
    of its guest RAM mapping; and the same for anonymous memory only (no
    shared libraries or other file pages)."""
    total = smaps_rollup(pid)
    guest = guest_ram_rss(pid, guest_bytes)
    return {
        "rss_mib": total["Rss"] / MIB,
        "guest_rss_mib": guest["Rss"] / MIB,
        "overhead_rss_mib": (total["Rss"] - guest["Rss"]) / MIB,
        "overhead_anon_mib": (total["Anonymous"] - guest["Anonymous"]) / MIB,
    }


def page_faults(pid):
    """(minflt, majflt) of the whole process: /proc/PID/stat sums its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): minflt is field 10, majflt field 12.
    return int(fields[7]), int(fields[9])


def drop_page_cache(paths):
    """Evicts `paths` from the page cache (posix_fadvise DONTNEED, after an
    fsync: only clean pages can go) and returns the bytes still resident,
    as fincore counts them."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_bytes(paths)


def resident_bytes(paths):
    out = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", *paths],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


def warm_page_cache(paths):
    """Reads `paths` whole, so the next run finds them cached."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(4 * MIB):
                pass


def descendants_named(pid, name):
    """PIDs of `pid`'s descendants whose command name is `name`."""
    parent, comm = {}, {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                head, rest = f.read().rsplit(") ", 1)
        except OSError:
            continue
        parent[int(e)], comm[int(e)] = int(rest.split()[1]), head.split(" (", 1)[1]
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p:
                todo.append(c)
                if comm[c] == name:
                    out.append(c)
    return out


def kill(p):
    if p.poll() is None:
        p.kill()
    p.wait()


class LineReader:
    """Reads lines from a pipe or socket with deadlines, remembering when
    the first byte arrived."""

    def __init__(self, fd, what):
        self.fd, self.what, self.buf = fd, what, b""
        self.first_byte_ns = None

    def readline(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.what}: nothing within the deadline; got {self.buf[-300:]!r}")
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise BenchError(f"{self.what}: closed; got {self.buf[-300:]!r}")
            if self.first_byte_ns is None:
                self.first_byte_ns = time.monotonic_ns()
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace"), time.monotonic_ns()

    def wait_for(self, text, deadline):
        """Timestamp (monotonic ns) of the read that completed the first
        line containing `text`."""
        while True:
            line, t = self.readline(deadline)
            if text in line:
                return t


# ------------------------------------------------------------ QEMU QMP


class Qmp:
    """A QMP client over a pair of file descriptors (a Unix socket or the
    QEMU process's stdin/stdout). Events seen while waiting for something
    else are kept for wait_event."""

    def __init__(self, rfd, wfd, what):
        self.reader = LineReader(rfd, what)
        self.wfd, self.what, self.events = wfd, what, []

    def send(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        os.write(self.wfd, json.dumps(msg).encode() + b"\n")

    def _next(self, deadline):
        line, _ = self.reader.readline(deadline)
        return json.loads(line)

    def greeting(self, deadline):
        msg = self._next(deadline)
        if "QMP" not in msg:
            raise BenchError(f"{self.what}: no QMP greeting: {msg}")

    def result(self, deadline):
        """The answer to the oldest command sent and not yet answered."""
        while True:
            msg = self._next(deadline)
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise BenchError(f"{self.what}: {msg['error']}")
            elif "return" in msg:
                return msg["return"]

    def command(self, cmd, deadline, **args):
        self.send(cmd, **args)
        return self.result(deadline)

    def wait_event(self, name, deadline, match=lambda data: True):
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and match(ev.get("data", {})):
                    return self.events.pop(i)
            msg = self._next(deadline)
            if "event" in msg:
                self.events.append(msg)


def event_time_ns(ev):
    """A QMP event's timestamp (QEMU's realtime clock), in ns."""
    ts = ev["timestamp"]
    return ts["seconds"] * 1_000_000_000 + ts["microseconds"] * 1000


# ---------------------------------------------------------- the harness


class Bench:
    def __init__(self, args):
        self.n = args.iterations
        self.bindir = os.path.abspath(args.bindir)
        self.fr = os.path.join(self.bindir, "firerunner")
        self.mv = os.path.join(self.bindir, "multivm")
        self.tg = os.path.abspath(args.testguest)
        self.loadgen = os.path.abspath(args.loadgen)
        self.tmp = tempfile.mkdtemp(prefix="snapvm-bench-")
        self.results = Results()
        self.rootfs = os.path.join(self.tmp, "rootfs.img")
        with open(self.rootfs, "wb") as f:
            f.write(os.urandom(MIB))
        self.seq = 0

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def app(self, name, lines):
        """A testguest appfs image: manifest lines, NUL-padded to 4 KiB."""
        p = self.path(name)
        with open(p, "wb") as f:
            f.write("".join(l + "\n" for l in lines).encode().ljust(4096, b"\0"))
        return p

    def next_id(self):
        self.seq += 1
        return self.seq

    # ---- firerunner

    def firerunner(self, mem, extra, *, console=None, stdout=subprocess.DEVNULL, log_level="warn", uds=None):
        """Spawns firerunner on testguest; returns (process, exec time ns).
        Its log goes to a pipe when `log_level` is info (the caller reads
        it), else to a file (see firerunner_stderr)."""
        i = self.next_id()
        argv = [self.fr, "--kernel", self.tg, "--rootfs", self.rootfs, "--mem_size", str(mem),
                "--vsock_uds", uds or self.path(f"v{i}.sock")]
        if console:
            argv += ["--console", console]
        argv += extra
        err = subprocess.PIPE if log_level == "info" else open(self.path("firerunner-stderr.log"), "wb")
        t0 = time.monotonic_ns()
        env = dict(os.environ, RUST_LOG=log_level, SNAPVM_SPAWN_MONO_NS=str(t0))
        p = subprocess.Popen(argv, stdout=stdout, stderr=err, env=env)
        if err is not subprocess.PIPE:
            err.close()
        return p, t0

    def firerunner_stderr(self):
        return tail(self.path("firerunner-stderr.log"))

    def firerunner_log(self, p, pattern, limit=120):
        """The first match of `pattern` in firerunner's log (stderr)."""
        rd = LineReader(p.stderr.fileno(), "firerunner log")
        deadline = time.monotonic() + limit
        while True:
            try:
                line, _ = rd.readline(deadline)
            except BenchError as e:
                raise BenchError(f"no log line matching {pattern!r} (exit {p.poll()}): {e}") from None
            m = re.search(pattern, line)
            if m:
                return m

    def snapvm_snapshot(self, mem, app, snap):
        """Makes a full snapshot at testguest's first snapshot point; returns
        firerunner's own create time (guest's 124 -> directory in place) in
        ms and the memory file's allocated bytes."""
        shutil.rmtree(snap, ignore_errors=True)
        p, _ = self.firerunner(mem, ["--appfs", app, "--dump_dir", snap],
                               console=self.path("dump-console.log"), log_level="info")
        m = self.firerunner_log(p, r"snapshot written to .* in (\d+) us")
        if p.wait(timeout=120) != 0:
            raise BenchError(f"firerunner --dump_dir exited {p.returncode}")
        return int(m.group(1)) / 1000, os.stat(os.path.join(snap, "memory")).st_blocks * 512

    # ---- QEMU

    def qemu_argv(self, mem, append, extra):
        return ["qemu-system-x86_64", "-M", QEMU_MACHINE, "-accel", "kvm", "-smp", "1", "-m", str(mem),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", self.tg, "-append", append] + extra

    def qemu(self, mem, append, extra, stdin=subprocess.DEVNULL):
        """Spawns QEMU (stderr to a file: it warns about CPUID bits the host
        lacks); returns (process, exec time ns, exec time realtime ns)."""
        err = open(self.path("qemu-stderr.log"), "wb")
        t_real = time.time_ns()
        t0 = time.monotonic_ns()
        p = subprocess.Popen(self.qemu_argv(mem, append, extra), stdin=stdin,
                             stdout=subprocess.PIPE, stderr=err)
        err.close()
        return p, t0, t_real

    def qemu_stderr(self):
        return tail(self.path("qemu-stderr.log"))

    # ---- guest protocol (this script plays the controller)

    def first_response(self, mem, extra, request, cache_files=None):
        """exec -> first response of one request (ms), firerunner's page
        faults at that moment, and the response. With `cache_files`, those
        files are evicted from the page cache first (cold start); the bytes
        still resident are returned too."""
        uds = self.path(f"r{self.next_id()}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_1234")
        listener.listen(1)
        listener.settimeout(60)
        resident = drop_page_cache(cache_files) if cache_files else None
        p, t0 = self.firerunner(mem, extra, console=self.path("console.log"), uds=uds)
        try:
            conn, _ = listener.accept()
            conn.settimeout(60)
            send_frame(conn, {"init": {"seed": os.urandom(32).hex(), "realtime_ns": time.time_ns()}})
            if read_frame(conn) != {"ready": True}:
                raise BenchError("the guest did not answer the init frame")
            send_frame(conn, request)
            resp = read_frame(conn)
            t = (time.monotonic_ns() - t0) / 1e6
            minflt, majflt = page_faults(p.pid)
            conn.close()
        except (OSError, BenchError) as e:
            raise BenchError(f"first response: {e}; console: {tail(self.path('console.log'))}; "
                             f"stderr: {self.firerunner_stderr()}") from None
        finally:
            listener.close()
            os.unlink(f"{uds}_1234")
            kill(p)
        return t, minflt, majflt, resp, resident


def send_frame(sock, obj):
    body = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def read_frame(sock):
    def exact(n):
        b = b""
        while len(b) < n:
            c = sock.recv(n - len(b))
            if not c:
                raise BenchError("the guest closed the connection")
            b += c
        return b
    (n,) = struct.unpack(">I", exact(4))
    return json.loads(exact(n))


def tail(path, n=600):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(none)"


# -------------------------------------------------------------- boot


def boot_once(b, vmm, mem):
    """One boot to `testguest: boot done` with the console on a pipe; then,
    guest idle (testguest.exit=halt), the VMM's memory overhead."""
    if vmm == "snapvm":
        p, t0 = b.firerunner(mem, ["--kernel_args", "testguest.exit=halt"], stdout=subprocess.PIPE)
    else:
        p, t0, _ = b.qemu(mem, "testguest.exit=halt", ["-serial", "stdio"])
    try:
        rd = LineReader(p.stdout.fileno(), f"{vmm} console")
        done = rd.wait_for("testguest: boot done", time.monotonic() + 60)
        # Let the VMM finish whatever it does right after boot before
        # reading its memory: both get the same pause.
        time.sleep(0.1)
        mem_info = overhead(p.pid, mem * MIB)
    except BenchError as e:
        err = b.qemu_stderr() if vmm == "qemu" else b.firerunner_stderr()
        raise BenchError(f"{vmm} boot: {e}; stderr: {err}") from None
    finally:
        kill(p)
    return (rd.first_byte_ns - t0) / 1e6, (done - t0) / 1e6, mem_info


def bench_boot(b):
    mem = 128
    vmms = ("snapvm", "qemu")
    got = {v: {"first": [], "done": [], "mem": []} for v in vmms}
    for i in range(b.n):
        for vmm in vmms:  # interleaved: A, B, A, B...
            first, done, m = boot_once(b, vmm, mem)
            got[vmm]["first"].append(first)
            got[vmm]["done"].append(done)
            got[vmm]["mem"].append(m)
        log(f"boot {i + 1}/{b.n}: " + ", ".join(f"{v} first output {got[v]['first'][-1]:.1f} ms" for v in vmms))
    for vmm in vmms:
        g = got[vmm]
        b.results.add("boot", vmm, "boot", "exec_to_first_output", "ms", g["first"], mem_mib=mem)
        b.results.add("boot", vmm, "boot", "exec_to_boot_done", "ms", g["done"], mem_mib=mem)
        for k in ("overhead_rss_mib", "overhead_anon_mib", "rss_mib", "guest_rss_mib"):
            b.results.add("memory", vmm, "booted_idle", k.removesuffix("_mib"), "MiB",
                          [m[k] for m in g["mem"]], mem_mib=mem)


# ---------------------------------------------------------- snapshots


def qemu_snapshot(b, mem, path):
    """Boots QEMU, waits for boot done, migrates to `path` through QMP and
    fsyncs the file (firerunner's snapshots are fsynced too). Returns the
    create time in ms: `migrate` sent -> MIGRATION completed -> fsync done."""
    if os.path.exists(path):
        os.unlink(path)
    qmp_path = b.path(f"qmp{b.next_id()}.sock")
    p, _, _ = b.qemu(mem, "testguest.exit=halt",
                     ["-serial", "stdio", "-qmp", f"unix:{qmp_path},server=on,wait=off"])
    try:
        LineReader(p.stdout.fileno(), "qemu console").wait_for("testguest: boot done", time.monotonic() + 60)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(qmp_path)
        qmp = Qmp(s.fileno(), s.fileno(), "qemu source QMP")
        deadline = time.monotonic() + 120
        qmp.greeting(deadline)
        qmp.command("qmp_capabilities", deadline)
        qmp.command("migrate-set-capabilities", deadline,
                    capabilities=[{"capability": "events", "state": True}])
        t0 = time.monotonic_ns()
        qmp.command("migrate", deadline, uri=f"exec:cat > {path}")
        ev = qmp.wait_event("MIGRATION", deadline, lambda d: d.get("status") in ("completed", "failed"))
        if ev["data"]["status"] != "completed":
            raise BenchError(f"QEMU migration failed: {qmp.command('query-migrate', deadline)}")
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        t = (time.monotonic_ns() - t0) / 1e6
        s.close()
    except (OSError, BenchError) as e:
        raise BenchError(f"qemu snapshot: {e}; stderr: {b.qemu_stderr()}") from None
    finally:
        kill(p)
    return t, os.stat(path).st_blocks * 512


def qemu_restore(b, mem, path):
    """exec -> QEMU's RESUME event (ms) of a restore with -incoming. QMP is
    on QEMU's stdin/stdout, and both commands are written before QEMU
    reads them, so no round trip of this script's is inside the figure."""
    p, _, t_real = b.qemu(mem, "testguest.exit=halt",
                          ["-serial", "null", "-qmp", "stdio", "-incoming", "defer"], stdin=subprocess.PIPE)
    try:
        qmp = Qmp(p.stdout.fileno(), p.stdin.fileno(), "qemu restore QMP")
        qmp.send("qmp_capabilities")
        qmp.send("migrate-incoming", uri=f"exec:cat {path}")
        deadline = time.monotonic() + 120
        qmp.greeting(deadline)
        qmp.result(deadline)
        qmp.result(deadline)
        ev = qmp.wait_event("RESUME", deadline)
    except (OSError, BenchError) as e:
        raise BenchError(f"qemu restore: {e}; stderr: {b.qemu_stderr()}") from None
    finally:
        kill(p)
    return (event_time_ns(ev) - t_real) / 1e6


def snapvm_restore(b, mem, snap, app, extra=()):
    """exec -> firerunner's first KVM_RUN of a restore (ms), from its log."""
    p, _ = b.firerunner(mem, ["--appfs", app, "--load_dir", snap, *extra],
                        console=b.path("console.log"), log_level="info")
    try:
        m = b.firerunner_log(p, r"first KVM_RUN (\d+) us after spawn")
    finally:
        kill(p)
    return int(m.group(1)) / 1000


def snapvm_diff_snapshot(b, mem, app, base, diff):
    """Restores `base` with `app` and makes a diff layer at testguest's diff
    point; returns firerunner's own create time (ms) and the diff memory
    file's allocated bytes."""
    shutil.rmtree(diff, ignore_errors=True)
    p, _ = b.firerunner(mem, ["--appfs", app, "--load_dir", base, "--dump_dir", diff],
                        console=b.path("dump-console.log"), log_level="info")
    m = b.firerunner_log(p, r"diff snapshot written to .* in (\d+) us")
    if p.wait(timeout=120) != 0:
        raise BenchError(f"firerunner --dump_dir (diff) exited {p.returncode}")
    return int(m.group(1)) / 1000, os.stat(os.path.join(diff, "memory")).st_blocks * 512


def bench_snapshot(b):
    app = b.app("snap-hello.img", ["fn=hello"])
    for mem in (128, 1024):
        snap = b.path(f"snap{mem}")
        diff = b.path(f"snap{mem}-diff")
        qfile = b.path(f"qemu{mem}.mig")
        got = {k: [] for k in ("s_create", "s_size", "q_create", "q_size", "s_lazy", "s_eager", "q_restore",
                               "d_create", "d_size", "d_lazy")}
        for i in range(b.n):
            c, size = b.snapvm_snapshot(mem, app, snap)
            got["s_create"].append(c)
            got["s_size"].append(size / MIB)
            # The diff layer of the hello app on that (language-point) snapshot.
            c, size = snapvm_diff_snapshot(b, mem, app, snap, diff)
            got["d_create"].append(c)
            got["d_size"].append(size / MIB)
            c, size = qemu_snapshot(b, mem, qfile)
            got["q_create"].append(c)
            got["q_size"].append(size / MIB)
            got["s_lazy"].append(snapvm_restore(b, mem, snap, app))
            got["q_restore"].append(qemu_restore(b, mem, qfile))
            got["s_eager"].append(snapvm_restore(b, mem, snap, app, ["--copy_base"]))
            got["d_lazy"].append(snapvm_restore(b, mem, snap, app, ["--diff_dirs", diff]))
            log(f"snapshot {mem} MiB {i + 1}/{b.n}: create snapvm {got['s_create'][-1]:.1f} / qemu "
                f"{got['q_create'][-1]:.1f} ms; restore snapvm {got['s_lazy'][-1]:.1f} / qemu "
                f"{got['q_restore'][-1]:.1f} ms")
        add = b.results.add
        add("snapshot", "snapvm", "full", "create", "ms", got["s_create"], mem_mib=mem)
        add("snapshot", "snapvm", "full", "file_allocated", "MiB", got["s_size"], mem_mib=mem)
        add("snapshot", "qemu", "migrate_to_file", "create", "ms", got["q_create"], mem_mib=mem)
        add("snapshot", "qemu", "migrate_to_file", "file_allocated", "MiB", got["q_size"], mem_mib=mem)
        add("snapshot", "snapvm", "full_lazy", "restore_to_running", "ms", got["s_lazy"], mem_mib=mem)
        add("snapshot", "snapvm", "full_eager", "restore_to_running", "ms", got["s_eager"], mem_mib=mem)
        add("snapshot", "qemu", "incoming", "restore_to_running", "ms", got["q_restore"], mem_mib=mem)
        add("snapshot", "snapvm", "diff", "create", "ms", got["d_create"], mem_mib=mem)
        add("snapshot", "snapvm", "diff", "file_allocated", "MiB", got["d_size"], mem_mib=mem)
        add("snapshot", "snapvm", "diff_lazy", "restore_to_running", "ms", got["d_lazy"], mem_mib=mem)


# ------------------------------------------------------------ ladder


def record_working_set(b, mem, app, layers, request):
    """Serves `request` once with `--dump_ws` through singlevm (the
    controller that says when the request is done); the working set lands
    in the top layer."""
    argv = [os.path.join(b.bindir, "singlevm"), "--kernel", b.tg, "--rootfs", b.rootfs,
            "--mem_size", str(mem), "--appfs", app, "--load_dir", layers, "--dump_ws"]
    env = dict(os.environ, TMPDIR=b.tmp)
    r = subprocess.run(argv, input=json.dumps(request) + "\n", capture_output=True, text=True,
                       env=env, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"singlevm --dump_ws exited {r.returncode}: {r.stderr[-600:]}")


def ladder_variants(b, mem, ws, app, base):
    """The rungs of the cold-start ladder, SnapFaaS style: boot; the
    language snapshot `base` plus this function's diff layer (taken at the
    diff point, after `touch` filled its `mib=` pages), restored lazily,
    eagerly (`--copy_base --copy_diff`) and with its working set
    (`--load_ws`, recorded here by one `--dump_ws` request). Each rung is
    (name, firerunner flags, files a cold start must read from disk)."""
    diff = b.path(f"ladder{ws}-diff")
    snapvm_diff_snapshot(b, mem, app, base, diff)
    layers = f"{base},{diff}"
    record_working_set(b, mem, app, layers, {"mib": ws})
    boot_files = [b.tg, b.rootfs, app]
    layer_files = [os.path.join(d, f) for d in (base, diff) for f in ("snapshot.json", "memory")]
    ws_files = [os.path.join(diff, f) for f in ("ws", "ws.json")]
    restore = ["--appfs", app, "--load_dir", layers]
    return [
        ("boot", ["--appfs", app], boot_files),
        ("restore_lazy", restore, boot_files + layer_files),
        ("restore_eager", restore + ["--copy_base", "--copy_diff"], boot_files + layer_files),
        ("restore_ws", restore + ["--load_ws"], boot_files + layer_files + ws_files),
    ]


def bench_ladder(b):
    mem = 128
    sizes = (4, 16, 64)
    rungs = {}
    base = b.path("ladder-base")
    b.snapvm_snapshot(mem, b.app("ladder-empty.img", []), base)
    for ws in sizes:
        app = b.app(f"touch{ws}.img", ["fn=touch", f"mib={ws}"])
        rungs[ws] = ladder_variants(b, mem, ws, app, base)
    got = {}
    for i in range(b.n):
        for ws in sizes:
            for name, extra, files in rungs[ws]:  # interleaved rungs
                for cache in ("cold", "warm"):
                    if cache == "warm":
                        warm_page_cache(files)
                    t, minflt, majflt, resp, resident = b.first_response(
                        mem, extra, {"mib": ws}, files if cache == "cold" else None)
                    if resp.get("touched_mib") != ws:
                        raise BenchError(f"ladder {name} {ws} MiB: unexpected response {resp}")
                    g = got.setdefault((ws, name, cache), {"ms": [], "minflt": [], "majflt": [], "resident": []})
                    g["ms"].append(t)
                    g["minflt"].append(minflt)
                    g["majflt"].append(majflt)
                    if resident is not None:
                        g["resident"].append(resident / MIB)
        log(f"ladder {i + 1}/{b.n}: " + ", ".join(
            f"{name} {ws} MiB {got[(ws, name, 'cold')]['ms'][-1]:.0f}/{got[(ws, name, 'warm')]['ms'][-1]:.0f} ms"
            for ws in sizes for name, _, _ in rungs[ws]))
    for (ws, name, cache), g in got.items():
        p = {"mem_mib": mem, "ws_mib": ws, "cache": cache}
        b.results.add("ladder", "snapvm", name, "exec_to_first_response", "ms", g["ms"], **p)
        b.results.add("ladder", "snapvm", name, "minor_faults", "count", g["minflt"], **p)
        b.results.add("ladder", "snapvm", name, "major_faults", "count", g["majflt"], **p)
        if g["resident"]:
            b.results.add("ladder", "snapvm", name, "resident_after_drop", "MiB", g["resident"], **p)


# --------------------------------------------------------- isolation


def bench_isolation(b):
    """exec -> first response with and without the seccomp filters, each
    rung run both ways back to back (interleaved): a boot, and the language
    snapshot + `hello` diff layer restored lazily and with its working set."""
    mem = 128
    app = b.app("iso-hello.img", ["fn=hello"])
    base, diff = b.path("iso-base"), b.path("iso-diff")
    b.snapvm_snapshot(mem, b.app("iso-empty.img", []), base)
    snapvm_diff_snapshot(b, mem, app, base, diff)
    layers = f"{base},{diff}"
    request = {"name": "bench"}
    record_working_set(b, mem, app, layers, request)
    rungs = [("boot", ["--appfs", app]),
             ("restore_lazy", ["--appfs", app, "--load_dir", layers]),
             ("restore_ws", ["--appfs", app, "--load_dir", layers, "--load_ws"])]
    walls = [("seccomp", []), ("no_seccomp", ["--no_seccomp"])]
    got = {}
    for i in range(b.n):
        for name, extra in rungs:
            # Either order in turn, so that neither side always goes first.
            for wall, flags in (walls if i % 2 == 0 else walls[::-1]):
                t, _, _, resp, _ = b.first_response(mem, extra + flags, request)
                if resp != {"message": "hello, bench"}:
                    raise BenchError(f"isolation {name} {wall}: unexpected response {resp}")
                got.setdefault((name, wall), []).append(t)
        log(f"isolation {i + 1}/{b.n}: " + ", ".join(
            f"{name} {got[(name, 'seccomp')][-1]:.1f}/{got[(name, 'no_seccomp')][-1]:.1f} ms"
            for name, _ in rungs))
    for (name, wall), samples in got.items():
        b.results.add("isolation", "snapvm", f"{name}_{wall}", "exec_to_first_response", "ms", samples,
                      mem_mib=mem)
    for name, _ in rungs:
        on, off = sorted(got[(name, "seccomp")]), sorted(got[(name, "no_seccomp")])
        # On a loaded host the medians mostly measure the load; the fastest
        # runs (min, p10) are the least disturbed.
        log(f"isolation {name}: with / without seccomp, ms: min {on[0]:.2f} / {off[0]:.2f}, "
            f"p10 {quantile(on, 0.1):.2f} / {quantile(off, 0.1):.2f}, median "
            f"{statistics.median(on):.2f} / {statistics.median(off):.2f} "
            f"(x{statistics.median(on) / statistics.median(off):.3f})")


# ----------------------------------------------------------- multivm


class Multivm:
    def __init__(self, b, functions, budget_mib, extra_config="", args=()):
        y = f"kernel_path: {b.tg}\nvm_overhead: 8\n{extra_config}functions:\n"
        for name, lines in functions.items():
            y += f"  {name}:\n" + "".join(f"    {l}\n" for l in lines)
        cfg = b.path(f"multivm{b.next_id()}.yaml")
        with open(cfg, "w") as f:
            f.write(y)
        env = dict(os.environ, XDG_RUNTIME_DIR=b.tmp, RUST_LOG="error")
        self.p = subprocess.Popen([b.mv, "--config", cfg, "--mem", str(budget_mib), "--listen", "127.0.0.1:0", *args],
                                  stdout=subprocess.PIPE, env=env, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("listening on http://"):
            kill(self.p)
            raise BenchError(f"multivm did not start: {line!r}")
        self.addr = line.strip().removeprefix("listening on http://")
        self.terminated = False

    def get(self, path):
        return urllib.request.urlopen(f"http://{self.addr}{path}", timeout=60).read().decode()

    def wait_idle(self, n, limit):
        end = time.monotonic() + limit
        while True:
            idle = sum(v["state"] == "idle" for v in json.loads(self.get("/vms")))
            if idle >= n:
                return
            if time.monotonic() > end:
                raise BenchError(f"only {idle} of {n} VMs became idle within {limit} s")
            time.sleep(0.2)

    def firerunners(self):
        """PIDs of this daemon's firerunners."""
        return descendants_named(self.p.pid, "firerunner")

    def terminate(self):
        """Starts the drain (once: a second SIGTERM makes multivm exit at once)."""
        if not self.terminated:
            self.p.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self):
        self.terminate()
        try:
            if self.p.wait(timeout=300) != 0:
                raise BenchError(f"multivm exited {self.p.returncode}")
        finally:
            kill(self.p)


def stop_all(daemons):
    """Drains every daemon at once, then waits for each."""
    for d in daemons:
        d.terminate()
    failed = []
    for d in daemons:
        try:
            d.stop()
        except BenchError as e:
            failed.append(str(e))
    if failed:
        raise BenchError("; ".join(failed))


def loadgen(b, addr, clients, seconds, path="/function/echo", body='{"i": 1}', content_type="application/json"):
    out = subprocess.run([b.loadgen, addr, path, body, str(clients), str(seconds), content_type],
                         capture_output=True, text=True, timeout=seconds + 120, check=True)
    return json.loads(out.stdout)


def bench_multivm(b):
    levels = (1, 4, 16)
    seconds = 1.5
    echo = b.app("mv-echo.img", ["fn=echo"])
    d = Multivm(b, {"echo": [f"runtimefs: {b.rootfs}", f"appfs: {echo}", "memory: 32",
                             "concurrency_limit: 16", "min_idle: 16", "max_queue: 1024"]}, 16 * 40)
    try:
        d.wait_idle(16, 120)
        for c in levels:
            loadgen(b, d.addr, c, 1)  # warm-up
        got = {c: [] for c in levels}
        for i in range(b.n):
            for c in levels:  # interleaved client counts
                r = loadgen(b, d.addr, c, seconds)
                if r["errors"]:
                    raise BenchError(f"multivm: {r['errors']} failed requests at {c} clients")
                got[c].append(r)
            log(f"multivm {i + 1}/{b.n}: " + ", ".join(f"{c} clients {got[c][-1]['rps']:.0f} req/s" for c in levels))
    finally:
        d.stop()
    for c in levels:
        p = {"clients": c, "seconds_per_run": seconds, "function": "echo"}
        b.results.add("multivm", "snapvm", "warm", "throughput", "req/s", [r["rps"] for r in got[c]], **p)
        b.results.add("multivm", "snapvm", "warm", "p50", "us", [r["p50_us"] for r in got[c]], **p)
        b.results.add("multivm", "snapvm", "warm", "p99", "us", [r["p99_us"] for r in got[c]], **p)


# ---------------------------------------------------------- provider


def http(addr, method, path, body=b"", content_type="application/json", headers=None):
    """(status, content type, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(f"http://{addr}{path}", data=body, method=method,
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


# What each invocation path sends to testguest's `http` function: a JSON
# body reaches it as the JSON value (answered {"plain": value}); a raw
# text/plain body travels in a request envelope and comes back from its
# response envelope with the request's content type.
PROVIDER_PATHS = {
    "json": ('{"i": 1}', "application/json"),
    "passthrough": ("i=1, a raw body", "text/plain"),
}


def bench_provider(b):
    clients = (1, 4)
    seconds = 1.5
    apps = b.path("provider-apps")
    os.makedirs(apps)
    b.app("provider-apps/hello.img", ["fn=hello"])
    http_img = b.app("provider-http.img", ["fn=http"])
    deploy = (f"deploy:\n  state_dir: {b.path('provider-state')}\n  image_dir: {apps}\n"
              f"  runtimes:\n    testguest:\n      runtimefs: {b.rootfs}\n      memory: 32\n")
    d = Multivm(b, {"http": [f"runtimefs: {b.rootfs}", f"appfs: {http_img}", "memory: 32",
                             "concurrency_limit: 4", "min_idle: 4", "max_queue: 1024"]}, 6 * 40, deploy)
    got = {(v, c): [] for v in PROVIDER_PATHS for c in clients}
    firsts = []
    try:
        d.wait_idle(4, 120)
        # Each path answers as it should before it is timed.
        want = {"json": (200, "application/json", {"plain": {"i": 1}}),
                "passthrough": (200, "text/plain", PROVIDER_PATHS["passthrough"][0])}
        for v, (body, ct) in PROVIDER_PATHS.items():
            status, got_ct, out = http(d.addr, "POST", "/function/http", body.encode(), ct)
            answer = (status, got_ct, json.loads(out) if v == "json" else out.decode())
            if answer != want[v]:
                raise BenchError(f"provider: the {v} path answered {answer}")
            for c in clients:
                loadgen(b, d.addr, c, 1, "/function/http", body, ct)  # warm-up
        for i in range(b.n):
            for c in clients:
                for v, (body, ct) in PROVIDER_PATHS.items():  # interleaved paths
                    r = loadgen(b, d.addr, c, seconds, "/function/http", body, ct)
                    if r["errors"]:
                        raise BenchError(f"provider: {r['errors']} failed {v} requests at {c} clients")
                    got[(v, c)].append(r)
            log(f"provider {i + 1}/{b.n}: " + ", ".join(
                f"{v} {c} clients {got[(v, c)][-1]['rps']:.0f} req/s" for c in clients for v in PROVIDER_PATHS))

        # Deploy -> first answer: the POST's send to the first 200 of the
        # function (polled; 503 while it is being prepared), then removed.
        for i in range(b.n):
            name = f"fresh{i}"
            deployment = {"service": name, "image": "hello.img", "labels": {"com.snapvm.runtime": "testguest"}}
            t = time.monotonic()
            status, _, out = http(d.addr, "POST", "/system/functions", json.dumps(deployment).encode())
            if status != 202:
                raise BenchError(f"provider: deploying {name} answered {status}: {out!r}")
            while True:
                status, _, out = http(d.addr, "POST", f"/function/{name}", b'{"name": "bench"}')
                if status == 200:
                    break
                if status != 503 or time.monotonic() - t > 60:
                    raise BenchError(f"provider: {name} answered {status}: {out!r}")
                time.sleep(0.002)
            firsts.append((time.monotonic() - t) * 1e3)
            status, _, out = http(d.addr, "DELETE", "/system/functions",
                                  json.dumps({"functionName": name}).encode())
            if status != 200:
                raise BenchError(f"provider: removing {name} answered {status}: {out!r}")
    finally:
        d.stop()
    for (v, c), rs in got.items():
        p = {"clients": c, "seconds_per_run": seconds, "function": "http", "content_type": PROVIDER_PATHS[v][1]}
        b.results.add("provider", "snapvm", v, "throughput", "req/s", [r["rps"] for r in rs], **p)
        b.results.add("provider", "snapvm", v, "p50", "us", [r["p50_us"] for r in rs], **p)
        b.results.add("provider", "snapvm", v, "p99", "us", [r["p99_us"] for r in rs], **p)
    b.results.add("provider", "snapvm", "deploy", "deploy_to_first_answer", "ms", firsts,
                  function="hello", runtime="testguest", launch="boot")
    for c in clients:
        # Ratios of the runs made side by side (passthrough / json).
        tp = [p["rps"] / j["rps"] for p, j in zip(got[("passthrough", c)], got[("json", c)])]
        p99 = [p["p99_us"] / j["p99_us"] for p, j in zip(got[("passthrough", c)], got[("json", c)])]
        med = {v: statistics.median(r["rps"] for r in got[(v, c)]) for v in PROVIDER_PATHS}
        med99 = {v: statistics.median(r["p99_us"] for r in got[(v, c)]) for v in PROVIDER_PATHS}
        log(f"provider {c} clients: json {med['json']:.0f} req/s p99 {med99['json']:.0f} us, "
            f"passthrough {med['passthrough']:.0f} req/s p99 {med99['passthrough']:.0f} us; "
            f"passthrough/json throughput x{statistics.median(tp):.3f}, p99 x{statistics.median(p99):.3f} "
            f"(medians of paired runs)")
    log(f"provider deploy -> first answer: median {statistics.median(firsts):.0f} ms "
        f"(min {min(firsts):.0f}, max {max(firsts):.0f}, n={len(firsts)})")


# ----------------------------------------------------------- density


DENSITY_TARGET = 4 << 30
# VMs per multivm daemon: one daemon pre-warms all its `min_idle` VMs at
# once, ~6 file descriptors each while they launch, and the fd limit here is
# 20000 (measured: 5700 at once ran multivm out of descriptors).
DENSITY_SHARD = 1024
# Share of the host's pid space (every thread takes a pid) the VMs may use,
# so that the rest of the machine keeps working while they run.
DENSITY_PID_SHARE = 0.75


def meminfo(field):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/meminfo has no {field}")


def threads_in_use():
    n = 0
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                n += len(os.listdir(f"/proc/{e}/task"))
            except OSError:
                pass  # it exited meanwhile
    return n


DENSITY_SAMPLE = 16


def density_measure(daemons, snap_memory):
    """smaps_rollup summed over every firerunner of `daemons`, the threads
    they and the daemons run, and, over a sample of the VMs, how much of
    the guest memory mapped from the snapshot file is shared or private."""
    pids = [pid for d in daemons for pid in d.firerunners()]
    if not pids:
        raise BenchError("density: multivm runs no firerunner")
    rollups = [smaps_rollup(pid) for pid in pids]
    total = {k: sum(r[k] for r in rollups) for k in rollups[0]}
    threads = sum(len(os.listdir(f"/proc/{pid}/task")) for pid in pids + [d.p.pid for d in daemons])
    sample = [mapping_sharing(pid, snap_memory) for pid in pids[:DENSITY_SAMPLE]]
    return {"vms": len(pids), "total": total, "threads": threads,
            "multivm_pss": sum(smaps_rollup(d.p.pid)["Pss"] for d in daemons),
            "guest_shared": statistics.fmean(x[0] for x in sample),
            "guest_private": statistics.fmean(x[1] for x in sample)}


def bench_density(b):
    """Adds idle VMs restored (lazily) from one snapshot, a multivm daemon
    of at most DENSITY_SHARD of them at a time, until the firerunners' PSS
    sums to 4 GiB. After each daemon's VMs are all idle the PSS is measured;
    the marginal PSS of a VM sizes the next daemon. Stops short, and says
    so, where more VMs would take more than DENSITY_PID_SHARE of the pids.
    Besides PSS, the drop in MemAvailable counts what PSS cannot see: KVM's
    and the kernel's memory per VM (page tables, stacks, slab)."""
    mem = 128
    app = b.app("density-echo.img", ["fn=echo"])
    snap = b.path("density-snap")
    b.snapvm_snapshot(mem, app, snap)
    avail0 = meminfo("MemAvailable")
    pid_budget = int(open("/proc/sys/kernel/pid_max").read()) * DENSITY_PID_SHARE - threads_in_use()
    daemons, curve = [], []
    limit = None
    n_next = 16
    t0 = time.monotonic()
    try:
        while True:
            d = Multivm(b, {"idle": [f"runtimefs: {b.rootfs}", f"appfs: {app}", f"memory: {mem}",
                                     f"load_dir: {snap}", f"concurrency_limit: {n_next}", f"min_idle: {n_next}"]},
                        n_next * (mem + 8), "boot_timeout: 300s\n")
            daemons.append(d)
            d.wait_idle(n_next, 600)
            time.sleep(1)  # let the last restores settle before reading memory
            m = density_measure(daemons, os.path.join(snap, "memory"))
            m["host_used"] = avail0 - meminfo("MemAvailable")
            curve.append(m)
            pss = m["total"]["Pss"]
            log(f"density: {m['vms']} idle VMs, PSS {pss / MIB:.0f} MiB, "
                f"MemAvailable down {m['host_used'] / MIB:.0f} MiB, {m['threads']} threads")
            if pss >= DENSITY_TARGET:
                break
            per_vm_threads = m["threads"] / m["vms"]
            room = int(pid_budget // per_vm_threads) - m["vms"]
            if len(curve) == 1:
                want = 3 * m["vms"]  # a second point for the marginal PSS
            else:
                marginal = (pss - curve[-2]["total"]["Pss"]) / (m["vms"] - curve[-2]["vms"])
                if marginal <= 0:
                    raise BenchError(f"density: PSS did not grow from {curve[-2]['vms']} to {m['vms']} VMs")
                want = math.ceil((DENSITY_TARGET - pss) / marginal * 1.02)
            n_next = min(want, DENSITY_SHARD, room)
            if n_next < 1:
                limit = (f"pid limit: {per_vm_threads:.1f} threads per VM, {DENSITY_PID_SHARE:.0%} of pid_max "
                         f"allows {m['vms']} VMs")
                log(f"density: stopping short of 4 GiB: {limit}")
                break
    finally:
        stop_all(daemons)
    last = curve[-1]
    n, t = last["vms"], last["total"]
    p = {"mem_mib": mem, "target_mib": DENSITY_TARGET // MIB, "restore": "lazy",
         "reached_target": t["Pss"] >= DENSITY_TARGET, "limit": limit, "daemons": len(daemons)}
    add = b.results.add
    add("density", "snapvm", "idle_restored", "vms", "count", [n], **p)
    add("density", "snapvm", "idle_restored", "pss_sum", "MiB", [t["Pss"] / MIB], **p)
    add("density", "snapvm", "idle_restored", "pss_per_vm", "MiB", [t["Pss"] / n / MIB], **p)
    add("density", "snapvm", "idle_restored", "rss_per_vm", "MiB", [t["Rss"] / n / MIB], **p)
    add("density", "snapvm", "idle_restored", "shared_per_vm", "MiB",
        [(t["Shared_Clean"] + t["Shared_Dirty"]) / n / MIB], **p)
    add("density", "snapvm", "idle_restored", "private_per_vm", "MiB",
        [(t["Private_Clean"] + t["Private_Dirty"]) / n / MIB], **p)
    add("density", "snapvm", "idle_restored", "guest_shared_per_vm", "MiB", [last["guest_shared"] / MIB],
        sample=DENSITY_SAMPLE, **p)
    add("density", "snapvm", "idle_restored", "guest_private_per_vm", "MiB", [last["guest_private"] / MIB],
        sample=DENSITY_SAMPLE, **p)
    add("density", "snapvm", "idle_restored", "host_memory_per_vm", "MiB", [last["host_used"] / n / MIB], **p)
    add("density", "snapvm", "idle_restored", "threads_per_vm", "count", [last["threads"] / n], **p)
    add("density", "snapvm", "idle_restored", "multivm_pss", "MiB", [last["multivm_pss"] / MIB], **p)
    add("density", "snapvm", "idle_restored", "seconds", "s", [time.monotonic() - t0], **p)
    for z in curve:
        add("density", "snapvm", "step", "pss_sum", "MiB", [z["total"]["Pss"] / MIB], mem_mib=mem, vms=z["vms"])
        add("density", "snapvm", "step", "host_memory", "MiB", [z["host_used"] / MIB], mem_mib=mem, vms=z["vms"])


# ------------------------------------------------------------- jail


def singlevm_first_response(b, args, request):
    """exec of singlevm -> its first response line (ms)."""
    argv = [os.path.join(b.bindir, "singlevm"), "--kernel", b.tg, "--rootfs", b.rootfs, *args]
    t0 = time.monotonic_ns()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, TMPDIR=b.tmp), text=True)
    p.stdin.write(json.dumps(request) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    t = (time.monotonic_ns() - t0) / 1e6
    p.stdin.close()
    err = p.stderr.read()
    if p.wait(timeout=120) != 0 or not line or "error" in json.loads(line):
        raise BenchError(f"singlevm {args}: {line!r}, exit {p.returncode}: {err[-600:]}")
    return t


def jail_pss(b, app, snap, mem, n, jailed):
    """PSS per idle VM (MiB) of `n` lazily restored VMs under one multivm
    (firerunner is a VM's only process: a jailer that stayed is an error)."""
    d = Multivm(b, {"idle": [f"runtimefs: {b.rootfs}", f"appfs: {app}", f"memory: {mem}",
                             f"load_dir: {snap}", f"concurrency_limit: {n}", f"min_idle: {n}"]},
                n * (mem + 8), "boot_timeout: 300s\n" + ("" if jailed else "jail: false\n"))
    try:
        d.wait_idle(n, 300)
        time.sleep(1)  # let the last restores settle before reading memory
        frs, jailers = d.firerunners(), descendants_named(d.p.pid, "jailer")
        if len(frs) != n or jailers:
            raise BenchError(f"jail: {len(frs)} firerunners and {len(jailers)} jailers for {n} VMs")
        return sum(smaps_rollup(p)["Pss"] for p in frs) / n / MIB
    finally:
        stop_all([d])


def hello_snapshots(b, name, mem, extra=(), fn="hello"):
    """testguest `hello` (or `fn`) of `mem` MiB: its app image, a language
    snapshot and a diff layer over it, made with singlevm (the SnapFaaS
    workflow), which is also given `extra`."""
    app = b.app(f"{name}-{fn}.img", [f"fn={fn}"])
    base, diff = b.path(f"{name}-base"), b.path(f"{name}-diff")
    for d in (base, diff):
        shutil.rmtree(d, ignore_errors=True)
    vm = ["--mem_size", str(mem)]
    for args in (["--dump_dir", base], ["--appfs", app, "--load_dir", base, "--dump_dir", diff]):
        argv = [os.path.join(b.bindir, "singlevm"), "--kernel", b.tg, "--rootfs", b.rootfs, *vm, *args,
                *extra, "--force_exit"]
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           env=dict(os.environ, TMPDIR=b.tmp), timeout=300)
        if r.returncode != 0:
            raise BenchError(f"singlevm {args}: exit {r.returncode}: {r.stderr[-600:]}")
    return app, base, diff


def bench_jail(b):
    """What the jail costs: singlevm exec -> first response, boot and lazy
    restore (language snapshot + diff layer), jailed and --no_jail in
    alternating order; then PSS per idle VM, alternating too."""
    mem = 128
    app, base, diff = hello_snapshots(b, "jail", mem)
    vm = ["--mem_size", str(mem)]
    modes = {"boot": vm + ["--appfs", app], "restore": vm + ["--appfs", app, "--load_dir", f"{base},{diff}"]}
    sides = {"jailed": [], "unjailed": ["--no_jail"]}
    samples = {(m, j): [] for m in modes for j in sides}
    for i in range(b.n):
        for m, args in modes.items():
            for j in (("jailed", "unjailed") if i % 2 == 0 else ("unjailed", "jailed")):
                samples[(m, j)].append(singlevm_first_response(b, args + sides[j], {"name": "jail"}))
    for (m, j), v in samples.items():
        b.results.add("jail", "snapvm", j, f"{m}_first_response", "ms", v, mem_mib=mem)
        log(f"jail: {m} {j}: median {statistics.median(v):.2f} ms")
    n = 8
    pss = {j: [] for j in sides}
    for i in range(max(2, min(b.n, 4))):
        for j in (("jailed", "unjailed") if i % 2 == 0 else ("unjailed", "jailed")):
            pss[j].append(jail_pss(b, app, base, mem, n, j == "jailed"))
    for j, v in pss.items():
        b.results.add("jail", "snapvm", j, "pss_per_vm", "MiB", v, mem_mib=mem, vms=n)
        log(f"jail: PSS per idle VM {j}: median {statistics.median(v):.3f} MiB")


def bench_net(b):
    """What a network costs a VM's start: singlevm exec -> first response,
    boot and lazy restore (snapshots made with and without --net), with
    and without a network, jailed, alternating."""
    mem = 128
    plain = hello_snapshots(b, "net-plain", mem)
    net = hello_snapshots(b, "net-net", mem, ["--net"])
    vm = ["--mem_size", str(mem)]
    runs = {}
    for side, (app, base, diff), extra in (("plain", plain, []), ("net", net, ["--net"])):
        runs[("boot", side)] = vm + ["--appfs", app] + extra
        runs[("restore", side)] = vm + ["--appfs", app, "--load_dir", f"{base},{diff}"] + extra
    samples = {k: [] for k in runs}
    for i in range(b.n):
        for m in ("boot", "restore"):
            for side in (("plain", "net") if i % 2 == 0 else ("net", "plain")):
                samples[(m, side)].append(singlevm_first_response(b, runs[(m, side)], {"name": "net"}))
    for (m, side), v in samples.items():
        b.results.add("net", "snapvm", side, f"{m}_first_response", "ms", v, mem_mib=mem)
        log(f"net: {m} {side}: median {statistics.median(v):.2f} ms")


def bench_shells(b):
    """multivm request -> first response for a cold function, three ways,
    interleaved across three daemons of the same budget for one VM:
    booted, restored by a fresh firerunner, and restored into a ready
    shell of the daemon's pool (`shells:`). Two situations: with room
    (the function's VM stopped by its idle_timeout before each request)
    and under eviction (two functions called in turn, each request
    evicting the other's VM)."""
    mem = 128
    app, base, diff = hello_snapshots(b, "shells", mem)
    boot = [f"runtimefs: {b.rootfs}", f"appfs: {app}", f"memory: {mem}"]
    restore = boot + [f"load_dir: {base},{diff}"]
    one_vm = mem + 8
    ready = f'multivm_shells_ready{{memory_mib="{mem}",vcpus="1"}}'
    want = {"boot": "cold-boot", "restore": "cold-restore", "shell": "cold-shell"}

    def wait(d, what, cond):
        end = time.monotonic() + 20
        while not cond(d.get("/metrics")):
            if time.monotonic() > end:
                raise BenchError(f"shells: {what} within 20 s")
            time.sleep(0.005)

    for situation in ("room", "eviction"):
        fns = "a" if situation == "room" else "ab"
        # With room, a VM stops 50 ms after its request; under eviction,
        # only to make room.
        stop = ["idle_timeout: 50ms"] if situation == "room" else []
        daemons = {}
        try:
            daemons["boot"] = Multivm(b, {f: boot + stop for f in fns}, one_vm)
            daemons["restore"] = Multivm(b, {f: restore + stop for f in fns}, one_vm)
            daemons["shell"] = Multivm(b, {f: restore + stop for f in fns}, one_vm + 2 * 8,
                                       f"shells:\n  - memory: {mem}\n    count: 2\n")
            samples = {k: [] for k in daemons}
            kinds = list(daemons)
            for i in range(3 * b.n + 2):  # the first two rounds warm the page cache
                for k in kinds[i % 3:] + kinds[:i % 3]:
                    d = daemons[k]
                    f = fns[i % len(fns)]
                    if situation == "room":
                        for o in daemons.values():
                            wait(o, "the idle VMs stopped",
                                 lambda m: sum(metric(m, f'multivm_vms{{function="{g}",state="idle"}}') for g in fns) == 0)
                    # No shell is being started during any sample.
                    wait(daemons["shell"], "the pool refilled", lambda m: metric(m, ready) >= 2)
                    req = urllib.request.Request(f"http://{d.addr}/function/{f}", data=b'{"name": "c"}',
                                                 method="POST", headers={"Content-Type": "application/json"})
                    t0 = time.monotonic()
                    with urllib.request.urlopen(req, timeout=60) as r:
                        body, start = r.read(), r.headers.get("X-Start")
                    t = (time.monotonic() - t0) * 1e3
                    if json.loads(body) != {"message": "hello, c"} or start != want[k]:
                        raise BenchError(f"shells {situation} {k}: {start} {body[:200]!r}")
                    if i >= 2:
                        samples[k].append(t)
        finally:
            stop_all(list(daemons.values()))
        for k, v in samples.items():
            b.results.add("shells", "snapvm", k, f"cold_first_response_{situation}", "ms", v, mem_mib=mem)
        med = {k: statistics.median(v) for k, v in samples.items()}
        log(f"shells ({situation}): multivm cold request -> first response, median: " +
            ", ".join(f"{k} {m:.2f} ms" for k, m in med.items()) +
            f"; shell/restore x{med['shell'] / med['restore']:.2f}, shell/boot x{med['shell'] / med['boot']:.2f}")


def bench_hibernate(b):
    """A keep_state function's VM hibernated at its idle timeout and woken
    by the next request, against the same function without keep_state,
    whose VM is stopped and restored afresh (language snapshot + diff
    layer, lazily): multivm request -> first response, two daemons
    interleaved, 128 MiB and 1 GiB. Each request of testguest's `touch`
    rewrites 16 MiB, which the hibernated layer then holds. Also the
    hibernation itself (idle VM -> layer written, VM exited, layer
    adopted), from multivm's histogram, one sample per hibernation."""
    mib = 16
    for mem in (128, 1024):
        app, base, diff = hello_snapshots(b, f"hibernate{mem}", mem, fn="touch")
        fn = [f"runtimefs: {b.rootfs}", f"appfs: {app}", f"memory: {mem}", f"load_dir: {base},{diff}",
              "idle_timeout: 50ms"]
        hib = b.path(f"hibernate{mem}-layers")
        daemons = {}
        try:
            daemons["restore"] = Multivm(b, {"f": fn}, mem + 8)
            daemons["wake"] = Multivm(b, {"f": fn + ["keep_state: true"]}, mem + 8,
                                      f"hibernate:\n  dir: {hib}\n")
            samples = {(k, warm): [] for k in daemons for warm in (False, True)}
            hibernate_ms = []
            want = {"restore": "cold-restore", "wake": "cold-wake"}
            hibernated = 'multivm_hibernations_total{function="f",result="ok"}'
            took = 'multivm_hibernate_duration_seconds_sum{function="f"}'
            expected, before = None, 0.0
            for i in range(b.n + 2):  # the first two rounds warm the page cache
                for k in (("restore", "wake") if i % 2 == 0 else ("wake", "restore")):
                    d = daemons[k]
                    if k == "wake":
                        end = time.monotonic() + 60
                        while metric(page := d.get("/metrics"), hibernated) < i:
                            if time.monotonic() > end:
                                raise BenchError("hibernate: no hibernation within 60 s")
                            time.sleep(0.005)
                        if i > 0:
                            hibernate_ms.append((metric(page, took) - before) * 1e3)
                        before = metric(page, took)
                    end = time.monotonic() + 60
                    while metric(d.get("/metrics"), 'multivm_vms{function="f",state="idle"}') > 0:
                        if time.monotonic() > end:
                            raise BenchError(f"hibernate: {k}'s idle VM did not stop within 60 s")
                        time.sleep(0.005)
                    # The cold request, then one on the same VM (warm: what
                    # the dirty log of a keep_state VM costs a request).
                    for warm in (False, True):
                        req = urllib.request.Request(f"http://{d.addr}/function/f",
                                                     data=json.dumps({"mib": mib}).encode(), method="POST",
                                                     headers={"Content-Type": "application/json"})
                        t0 = time.monotonic()
                        with urllib.request.urlopen(req, timeout=120) as r:
                            body, start = json.loads(r.read()), r.headers.get("X-Start")
                        t = (time.monotonic() - t0) * 1e3
                        expected = expected or body
                        first_wake = k == "wake" and i == 0
                        if body != expected or (start != ("warm" if warm else want[k]) and not first_wake):
                            raise BenchError(f"hibernate {mem} MiB {k}: {start} {body}")
                        if i >= 2:
                            samples[(k, warm)].append(t)
        finally:
            stop_all(list(daemons.values()))
        for (k, warm), v in samples.items():
            metric_name = "warm_response" if warm else "cold_first_response"
            b.results.add("hibernate", "snapvm", k, metric_name, "ms", v, mem_mib=mem, touched_mib=mib)
        b.results.add("hibernate", "snapvm", "hibernate", "hibernate", "ms", hibernate_ms[2:], mem_mib=mem,
                      touched_mib=mib)
        migrate_ms, moved_wake_ms = bench_migrate(b, fn, mem, mib)
        b.results.add("hibernate", "snapvm", "migrate", "migrate", "ms", migrate_ms, mem_mib=mem, touched_mib=mib)
        b.results.add("hibernate", "snapvm", "migrate", "wake_after_move", "ms", moved_wake_ms, mem_mib=mem,
                      touched_mib=mib)
        log(f"hibernate {mem} MiB: POST /system/migrate on loopback, median {statistics.median(migrate_ms):.2f} ms; "
            f"then the target's request -> first response {statistics.median(moved_wake_ms):.2f} ms")
        med = {k: statistics.median(v) for k, v in samples.items()}
        cold = {k: med[(k, False)] for k in daemons}
        warm = {k: med[(k, True)] for k in daemons}
        log(f"hibernate {mem} MiB: multivm request -> first response, median: wake {cold['wake']:.2f} ms, "
            f"fresh restore {cold['restore']:.2f} ms (x{cold['wake'] / cold['restore']:.2f}); warm request "
            f"{warm['wake']:.2f} ms with the dirty log, {warm['restore']:.2f} ms without "
            f"(x{warm['wake'] / warm['restore']:.2f}); hibernation median {statistics.median(hibernate_ms[2:]):.2f} ms")


def bench_migrate(b, fn, mem, mib):
    """Two multivm daemons on loopback with the same keep_state function
    (`fn` without its idle timeout): its VM served a request, then moved
    by POST /system/migrate (hibernation, transfer of its layers, the
    target's checks) to the other daemon, whose next request wakes it;
    then back. Returns the migrate wall times and the wake times (ms)."""
    fn = [line for line in fn if not line.startswith("idle_timeout")] + ["keep_state: true"]
    creds = b.path("migrate-creds")
    os.makedirs(creds, exist_ok=True)
    for name, value in (("basic-auth-user", "bench"), ("basic-auth-password", "bench")):
        with open(os.path.join(creds, name), "w") as f:
            f.write(value + "\n")
    auth = {"Authorization": "Basic YmVuY2g6YmVuY2g="}  # bench:bench
    nodes = []
    try:
        for i in range(2):
            nodes.append(Multivm(b, {"f": fn}, mem + 8, f"hibernate:\n  dir: {b.path(f'migrate{mem}-{i}')}\n",
                                 ("--basic_auth_dir", creds)))
        migrate_ms, wake_ms = [], []
        body = json.dumps({"mib": mib}).encode()
        status, _, out = http(nodes[0].addr, "POST", "/function/f", body)
        if status != 200:
            raise BenchError(f"migrate: the first request answered {status}: {out!r}")
        for i in range(b.n + 1):
            src, dst = nodes[i % 2], nodes[(i + 1) % 2]
            req = json.dumps({"function": "f", "target": dst.addr}).encode()
            t0 = time.monotonic()
            status, _, out = http(src.addr, "POST", "/system/migrate", req, headers=auth)
            t1 = time.monotonic()
            if status != 200:
                raise BenchError(f"migrate: {status}: {out!r}")
            req = urllib.request.Request(f"http://{dst.addr}/function/f", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            t2 = time.monotonic()
            with urllib.request.urlopen(req, timeout=120) as r:
                start = r.headers.get("X-Start")
                r.read()
            t3 = time.monotonic()
            if start != "cold-wake":
                raise BenchError(f"migrate: the target started the moved VM by {start}")
            if i >= 1:  # the first round warms the page cache
                migrate_ms.append((t1 - t0) * 1e3)
                wake_ms.append((t3 - t2) * 1e3)
    finally:
        stop_all(nodes)
    return migrate_ms, wake_ms


def metric(page, sample):
    """The value of `sample` in a Prometheus text page (0 when absent)."""
    for line in page.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------- plots


def plots(results, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]

    def find(**kw):
        params = kw.pop("params", {})
        for r in rows:
            if all(r[k] == v for k, v in kw.items()) and all(r["params"].get(k) == v for k, v in params.items()):
                return r
        return None

    def label_of(v):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"

    def bars(ax, groups, series, title, unit, log_scale=False):
        """groups: x labels; series: [(label, [row or None per group])]."""
        width = 0.8 / len(series)
        for i, (label, rs) in enumerate(series):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            med = [r["median"] if r else 0 for r in rs]
            lo = [r["median"] - r["p10"] if r else 0 for r in rs]
            hi = [r["p90"] - r["median"] if r else 0 for r in rs]
            bs = ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=label)
            ax.bar_label(bs, labels=[label_of(m) if r else "n/a" for m, r in zip(med, rs)], fontsize=7, padding=2)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        if log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize=8)

    written = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(outdir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    caption = "median, whiskers p10..p90"
    if find(bench="boot"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        metrics = [("exec_to_first_output", "exec → first guest output"), ("exec_to_boot_done", "exec → boot done")]
        bars(axes[0], [t for _, t in metrics],
             [(v, [find(bench="boot", system=v, metric=m) for m, _ in metrics]) for v in ("snapvm", "qemu")],
             f"Boot, testguest, 128 MiB ({caption})", "ms")
        kinds = [("overhead_rss", "RSS − guest RAM"), ("overhead_anon", "anonymous − guest RAM")]
        bars(axes[1], [t for _, t in kinds],
             [(v, [find(bench="memory", system=v, metric=k) for k, _ in kinds]) for v in ("snapvm", "qemu")],
             "VMM memory overhead per VM, booted idle guest", "MiB")
        save(fig, "boot.png")
    if find(bench="snapshot"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        sizes = [128, 1024]
        labels = [f"{m} MiB" for m in sizes]
        bars(axes[0], labels, [
            ("snapvm full", [find(bench="snapshot", system="snapvm", metric="create", params={"mem_mib": m}) for m in sizes]),
            ("qemu migrate", [find(bench="snapshot", system="qemu", metric="create", params={"mem_mib": m}) for m in sizes]),
        ] + [(f"snapvm {r['variant']}", [find(bench="snapshot", system="snapvm", variant=r["variant"], metric="create",
                                             params={"mem_mib": m}) for m in sizes])
             for r in rows if r["bench"] == "snapshot" and r["system"] == "snapvm" and r["metric"] == "create"
             and r["variant"] != "full" and r["params"].get("mem_mib") == sizes[0]],
            f"Snapshot create ({caption})", "ms", log_scale=True)
        variants = [("snapvm", "full_lazy"), ("snapvm", "full_eager"), ("qemu", "incoming")] + [
            (r["system"], r["variant"]) for r in rows if r["bench"] == "snapshot" and r["metric"] == "restore_to_running"
            and r["variant"] not in ("full_lazy", "full_eager", "incoming") and r["params"].get("mem_mib") == sizes[0]]
        bars(axes[1], labels, [(f"{s} {v}", [find(bench="snapshot", system=s, variant=v, metric="restore_to_running",
                                                  params={"mem_mib": m}) for m in sizes]) for s, v in variants],
             "Restore: exec → vCPU running", "ms", log_scale=True)
        save(fig, "snapshot.png")
    if find(bench="ladder"):
        sizes = sorted({r["params"]["ws_mib"] for r in rows if r["bench"] == "ladder"})
        rung_names = list(dict.fromkeys(r["variant"] for r in rows if r["bench"] == "ladder"))
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for col, cache in enumerate(("cold", "warm")):
            bars(axes[0][col], [f"{s} MiB" for s in sizes],
                 [(n, [find(bench="ladder", variant=n, metric="exec_to_first_response",
                            params={"ws_mib": s, "cache": cache}) for s in sizes]) for n in rung_names],
                 f"touch: exec → first response, {cache} page cache", "ms")
            bars(axes[1][col], [f"{s} MiB" for s in sizes],
                 [(n, [find(bench="ladder", variant=n, metric="minor_faults",
                            params={"ws_mib": s, "cache": cache}) for s in sizes]) for n in rung_names],
                 f"firerunner minor page faults, {cache}", "faults")
        save(fig, "ladder.png")
    if find(bench="multivm"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        levels = sorted({r["params"]["clients"] for r in rows if r["bench"] == "multivm"})
        labels = [f"{c} client{'s' if c > 1 else ''}" for c in levels]
        bars(axes[0], labels, [("echo", [find(bench="multivm", metric="throughput", params={"clients": c})
                                         for c in levels])], f"multivm warm throughput ({caption})", "req/s")
        bars(axes[1], labels, [(m, [find(bench="multivm", metric=m, params={"clients": c}) for c in levels])
                               for m in ("p50", "p99")], "multivm warm latency", "µs")
        save(fig, "multivm.png")
    if find(bench="density"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        per = {m: find(bench="density", variant="idle_restored", metric=m)["median"]
               for m in ("vms", "pss_per_vm", "shared_per_vm", "private_per_vm", "guest_shared_per_vm",
                         "guest_private_per_vm", "host_memory_per_vm")}
        cols = ["RSS", "of it: guest RAM\nfrom the snapshot", "PSS", "host memory\n(MemAvailable)"]
        axes[0].bar(cols[:2], [per["private_per_vm"], per["guest_private_per_vm"]], color="C0", label="private")
        axes[0].bar(cols[:2], [per["shared_per_vm"], per["guest_shared_per_vm"]], color="C1", label="shared",
                    bottom=[per["private_per_vm"], per["guest_private_per_vm"]])
        axes[0].bar(cols[2:], [per["pss_per_vm"], per["host_memory_per_vm"]], color="C2")
        axes[0].tick_params(axis="x", labelsize=8)
        axes[0].set_ylabel("MiB per VM")
        head = find(bench="density", variant="idle_restored", metric="vms")["params"]
        axes[0].set_title(f"{per['vms']:.0f} idle restored VMs" + ("" if head["reached_target"]
                          else " (4 GiB not reached)"), fontsize=10)
        axes[0].legend(fontsize=8)
        for metric, label in (("pss_sum", "sum of firerunner PSS"), ("host_memory", "drop in MemAvailable")):
            rs = sorted((r for r in rows if r["bench"] == "density" and r["variant"] == "step"
                         and r["metric"] == metric), key=lambda r: r["params"]["vms"])
            axes[1].plot([r["params"]["vms"] for r in rs], [r["median"] / 1024 for r in rs], "o-", label=label)
        axes[1].axhline(DENSITY_TARGET / 2**30, ls="--", color="grey", label="4 GiB target")
        axes[1].set_xlabel("idle VMs")
        axes[1].set_ylabel("GiB")
        axes[1].set_title("Memory as idle VMs are added", fontsize=10)
        axes[1].legend(fontsize=8)
        save(fig, "density.png")
    return written


# -------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bindir", help="directory of firerunner and multivm (release)")
    ap.add_argument("--testguest", help="the testguest ELF")
    ap.add_argument("--loadgen", help="the compiled scripts/loadgen.rs")
    ap.add_argument("--out", default="bench", help="where results.json and the PNGs go")
    ap.add_argument("--iterations", type=int, default=10, help="runs per measurement (at least 10 for the README)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}")
    ap.add_argument("--plots-only", action="store_true", help="redraw the PNGs from results.json, measure nothing")
    args = ap.parse_args()
    out_json = os.path.join(args.out, "results.json")
    if args.plots_only:
        with open(out_json) as f:
            for p in plots(json.load(f), args.out):
                log(f"wrote {p}")
        return
    missing = [f"--{k}" for k in ("bindir", "testguest", "loadgen") if getattr(args, k) is None]
    if missing:
        ap.error(f"measuring needs {', '.join(missing)}")
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.iterations < 1:
        ap.error("--iterations must be at least 1")
    os.makedirs(args.out, exist_ok=True)

    b = Bench(args)
    funcs = {"boot": bench_boot, "snapshot": bench_snapshot, "ladder": bench_ladder,
             "multivm": bench_multivm, "provider": bench_provider, "density": bench_density, "isolation": bench_isolation,
             "jail": bench_jail, "shells": bench_shells, "net": bench_net, "hibernate": bench_hibernate}
    started = time.monotonic()
    try:
        for s in sections:
            t = time.monotonic()
            log(f"== {s}")
            funcs[s](b)
            log(f"== {s} took {time.monotonic() - t:.0f} s")
    except BenchError as e:
        sys.exit(f"bench: error: {e}")
    finally:
        b.close()

    # Rows of sections not run this time are kept from the previous file.
    previous = []
    if os.path.exists(out_json):
        with open(out_json) as f:
            previous = [r for r in json.load(f)["rows"] if r["bench"] not in sections and
                        not (r["bench"] == "memory" and "boot" in sections)]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for r in b.results.rows:
        r["run"] = stamp
    results = {
        "schema": 1,
        "generated": stamp,
        "machine": machine(),
        "iterations": args.iterations,
        "qemu_machine": QEMU_MACHINE,
        "last_run_seconds": round(time.monotonic() - started),  # of this invocation (its --only sections)
        "rows": previous + b.results.rows,
    }
    with open(out_json + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out_json + ".tmp", out_json)
    for p in plots(results, args.out):
        log(f"wrote {p}")
    log(f"wrote {out_json}")


if __name__ == "__main__":
    main()
