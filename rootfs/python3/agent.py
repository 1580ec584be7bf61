"""snapvm guest agent for the python3 runtime (pure standard library).

Follows the guest protocol of DESIGN.md, the same sequence as testguest:

1. runtime ready (this module imported) -> control port 124, the language
   snapshot point;
2. mount the appfs (/dev/vdb) read-only on /srv and import
   /srv/workload.py, which defines ``handle(request) -> dict``; if that
   fails, control port 125 and every request is answered
   ``{"error": "app load failed: ..."}``;
3. control port 124, the diff snapshot point;
4. connect AF_VSOCK to CID 2 port 1234 (retrying 10 ms .. 500 ms apart) and
   serve frames (4-byte big-endian length, UTF-8 JSON, at most 4 MiB): the
   init frame ``{"init": {"seed": <64 hex>, "realtime_ns": <u64>}}`` seeds
   the kernel RNG and sets the clock and is answered ``{"ready": true}``;
   every other frame is a request, answered with one JSON object. When the
   connection drops (a snapshot restore resets it) the agent reconnects
   and expects a new init frame.

HTTP (multivm's envelope, README "Invocations as OpenFaaS makes them"): a
request ``{"snapvm.http": {method, path, query, headers, body: base64}}``
goes to ``handle_http(req)`` when workload.py defines it, with ``req`` a
dict whose ``body`` is bytes; it returns a dict with ``status`` (default
200), ``headers`` (dict of str) and ``body`` (bytes, str, or anything
JSON-serialisable, sent as JSON), which becomes the response envelope.
``handle_http`` also takes plain JSON requests (as POST with that JSON as
the body). Without it, ``handle(request)`` gets the envelope's body parsed
as JSON, else as text (``None`` when empty), and answers as always; a
body that is not UTF-8 is an error then.

The control port (through /dev/port) and the mount go through the static
helper snapvm-guest (the standard library has no mount(2));
the init frame is applied in-process (``fcntl.ioctl``,
``time.clock_settime_ns``) because it is on the restore path.

Test overrides (environment; unset in the image): SNAPVM_VSOCK
(``vsock:CID:PORT`` or ``unix:PATH``), SNAPVM_HELPER, SNAPVM_APPFS,
SNAPVM_APPDIR, and SNAPVM_GUEST_FAKE=FILE, which makes every privileged
operation append one line to FILE instead of happening (see
rootfs/guest/guestops.h; the helper honours it too).
"""

import base64
import binascii
import fcntl
import gc
import importlib.util
import inspect
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import traceback

MAX_FRAME = 4 << 20
HOST_CID = 2
AGENT_PORT = 1234
CONTROL_SNAPSHOT = 124
CONTROL_APP_FAILED = 125
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
ENODATA = 61
EINVAL = 22
BACKOFF_MIN = 0.01
BACKOFF_MAX = 0.5
HEADER = struct.Struct(">I")
POOL_INFO = struct.Struct("ii")  # struct rand_pool_info without buf


def log(msg):
    print(f"snapvm-agent: {msg}", file=sys.stderr, flush=True)


class AppLoadError(Exception):
    """The function could not be loaded; the message says why."""


class InitError(Exception):
    """An init frame that cannot be applied."""


class ConnectionClosed(Exception):
    """The host closed the connection (possibly mid-frame)."""


class Config:
    def __init__(self, env):
        self.helper = env.get("SNAPVM_HELPER", "/usr/lib/snapvm/snapvm-guest")
        self.vsock = env.get("SNAPVM_VSOCK", f"vsock:{HOST_CID}:{AGENT_PORT}")
        self.appfs = env.get("SNAPVM_APPFS", "/dev/vdb")
        self.appdir = env.get("SNAPVM_APPDIR", "/srv")
        self.fake = env.get("SNAPVM_GUEST_FAKE") or None


class KernelOps:
    """The init frame's system calls."""

    def ioctl(self, request, arg, name):
        with open("/dev/random", "wb", buffering=0) as dev:
            if arg is None:
                fcntl.ioctl(dev, request)
            else:
                fcntl.ioctl(dev, request, arg)

    def settime(self, ns):
        time.clock_settime_ns(time.CLOCK_REALTIME, ns)


class FakeOps:
    """Test mode: logs the system calls in guestops.c's format instead."""

    def __init__(self, path):
        self.path = path

    def _log(self, line):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def ioctl(self, request, arg, name):
        if arg is None:
            self._log(f"ioctl /dev/random {name} {request:#x}")
            return
        # Decode what the kernel would read, so tests see the real layout.
        count, size = POOL_INFO.unpack_from(arg)
        buf = bytes(arg[POOL_INFO.size:POOL_INFO.size + size])
        self._log(f"ioctl /dev/random {name} {request:#x} "
                  f"entropy_count={count} buf_size={size} buf={buf.hex()}")

    def settime(self, ns):
        self._log(f"clock_settime CLOCK_REALTIME {ns // 10**9}.{ns % 10**9:09d}")


def seed_rng(ops, seed):
    """RNDADDENTROPY (seed credited at 8 bits a byte), then RNDRESEEDCRNG so
    clones restored from one snapshot diverge from their next read on."""
    req = POOL_INFO.pack(8 * len(seed), len(seed)) + seed
    ops.ioctl(RNDADDENTROPY, req, "RNDADDENTROPY")
    try:
        ops.ioctl(RNDRESEEDCRNG, None, "RNDRESEEDCRNG")
    except OSError as e:
        # ENODATA: CRNG not ready yet (nothing handed out to share);
        # EINVAL: a kernel before 4.17.
        if e.errno not in (ENODATA, EINVAL):
            raise
    # Python's own generators: `random` was seeded at start-up and is in
    # the snapshot; reseed it from the now fresh kernel RNG. OpenSSL keeps
    # its own DRBG, if the function loaded it.
    random.seed()
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        ssl.RAND_add(seed, float(len(seed)))


def parse_init(init):
    """Validates an init frame's body; returns (seed bytes, realtime_ns)."""
    if not isinstance(init, dict):
        raise InitError("init is not an object")
    seed = init.get("seed")
    ns = init.get("realtime_ns")
    if not isinstance(seed, str) or len(seed) != 64:
        raise InitError("seed must be 64 hex characters")
    try:
        seed = bytes.fromhex(seed)
    except ValueError:
        raise InitError("seed must be 64 hex characters") from None
    if not isinstance(ns, int) or isinstance(ns, bool) or not 0 <= ns < 2**64:
        raise InitError("realtime_ns must be an integer 0..2^64-1")
    return seed, ns


def apply_init(ops, init):
    seed, ns = parse_init(init)
    try:
        seed_rng(ops, seed)
        ops.settime(ns)
    except OSError as e:
        raise InitError(str(e)) from None


def run_helper(cfg, *args):
    """Runs snapvm-guest; returns its stderr, raises OSError on failure."""
    proc = subprocess.run([cfg.helper, *args], stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise OSError(err or f"{cfg.helper} {' '.join(args)}: exit status {proc.returncode}")
    return err


def control(cfg, value):
    """Writes the control port; returns whether the write happened."""
    # A snapshot taken here holds the helper mid-outb; a restore finishes it.
    try:
        run_helper(cfg, "outb", str(value))
        return True
    except OSError as e:
        log(f"control port {value}: {e}")
        return False


def load_app(cfg):
    """Mounts the appfs and imports workload.py; returns its handle and
    handle_http functions (either may be None, not both)."""
    try:
        run_helper(cfg, "mount-ro", cfg.appfs, cfg.appdir)
    except OSError as e:
        raise AppLoadError(str(e)) from None
    path = os.path.join(cfg.appdir, "workload.py")
    if not os.path.isfile(path):
        raise AppLoadError(f"no workload.py in the appfs ({cfg.appfs})")
    os.chdir(cfg.appdir)
    sys.path.insert(0, cfg.appdir)
    try:
        spec = importlib.util.spec_from_file_location("workload", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["workload"] = module
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: B036 - SystemExit from an app is a failed load too
        traceback.print_exc()
        raise AppLoadError(f"importing workload.py raised {type(e).__name__}: {e}") from None
    handle = getattr(module, "handle", None)
    handle_http = getattr(module, "handle_http", None)
    handle = handle if callable(handle) else None
    handle_http = handle_http if callable(handle_http) else None
    if handle is None and handle_http is None:
        raise AppLoadError("workload.py defines no handle(request) function")
    return handle, handle_http


def http_request(env):
    """The request of an envelope, for handle_http; raises ValueError."""
    if not isinstance(env, dict):
        raise ValueError("the envelope is not an object")
    headers = env.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError("the envelope's headers are not an object of strings")
    try:
        body = base64.b64decode(env.get("body", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("the envelope's body is not base64") from None
    return {
        "method": str(env.get("method", "POST")),
        "path": str(env.get("path", "")),
        "query": str(env.get("query", "")),
        "headers": headers,
        "body": body,
    }


def body_value(body):
    """An envelope body as handle(request) sees it: JSON, else text."""
    if not body.strip():
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("a body that is not UTF-8 needs handle_http(request)") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def http_response(result):
    """handle_http's result as a response envelope; raises ValueError."""
    if not isinstance(result, dict):
        raise ValueError(f"handle_http returned {type(result).__name__}, not a dict")
    status = result.get("status", 200)
    if not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError("handle_http's status must be an int from 200 to 599")
    headers = dict(result.get("headers") or {})
    body = result.get("body", b"")
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body, allow_nan=False, ensure_ascii=False).encode()
        headers.setdefault("content-type", "application/json")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValueError("handle_http's headers must be a dict of str")
    return {"snapvm.http": {"status": status, "headers": headers,
                            "body": base64.b64encode(body).decode()}}


class Agent:
    def __init__(self, cfg, ops):
        self.cfg = cfg
        self.ops = ops
        self.handle = None
        self.handle_http = None
        self.failure = None
        self._loop = None

    # --- requests -------------------------------------------------------

    def call(self, request):
        """Runs the function; returns the response as JSON bytes."""
        envelope = None
        if isinstance(request, dict) and len(request) == 1 and "snapvm.http" in request:
            envelope = request["snapvm.http"]
        try:
            if self.handle_http is not None:
                if envelope is None:
                    envelope = {"method": "POST", "headers": {"content-type": "application/json"},
                                "body": base64.b64encode(json.dumps(request).encode()).decode()}
                request = http_request(envelope)
            elif envelope is not None:
                request = body_value(http_request(envelope)["body"])
        except ValueError as e:
            return error(f"bad HTTP request: {e}")
        try:
            result = (self.handle_http or self.handle)(request)
            if inspect.isawaitable(result):
                result = self._await(result)
            if self.handle_http is not None:
                result = http_response(result)
        except BaseException as e:  # noqa: B036 - a function error is a response, never a dead VM
            traceback.print_exc()
            return error(f"{type(e).__name__}: {e}")
        if not isinstance(result, dict):
            return error(f"handle returned {type(result).__name__}, not a dict (JSON object)")
        try:
            body = json.dumps(result, allow_nan=False, ensure_ascii=False,
                              separators=(",", ":")).encode()
        except (TypeError, ValueError, RecursionError) as e:
            return error(f"handle returned a value that is not JSON-serialisable: {e}")
        if len(body) > MAX_FRAME:
            return error(f"response of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
        return body

    def _await(self, awaitable):
        import asyncio

        if self._loop is None:
            self._loop = asyncio.new_event_loop()

        async def wait():
            return await awaitable

        return self._loop.run_until_complete(wait())

    def answer(self, body):
        try:
            msg = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return error("invalid json")
        if isinstance(msg, dict) and isinstance(msg.get("init"), dict):
            try:
                apply_init(self.ops, msg["init"])
            except InitError as e:
                return error(f"bad init frame: {e}")
            return b'{"ready":true}'
        if self.failure is not None:
            return error(f"app load failed: {self.failure}")
        return self.call(msg)

    # --- connection -----------------------------------------------------

    def connect(self):
        kind, _, where = self.cfg.vsock.partition(":")
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = where
        elif kind == "vsock":
            cid, _, port = where.partition(":")
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            addr = (int(cid), int(port))
        else:
            raise SystemExit(f"snapvm-agent: bad SNAPVM_VSOCK {self.cfg.vsock!r}")
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def serve(self, sock):
        while True:
            n = HEADER.unpack(recv_exact(sock, HEADER.size))[0]
            if n > MAX_FRAME:
                drain(sock, n)
                send_frame(sock, error("request too large"))
                continue
            send_frame(sock, self.answer(bytes(recv_exact(sock, n))))

    def run_forever(self):
        backoff = BACKOFF_MIN
        quiet = False
        while True:
            try:
                sock = self.connect()
            except OSError as e:
                if not quiet:
                    log(f"connecting to the host ({self.cfg.vsock}): {e}; retrying")
                    quiet = True
                time.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            quiet = False
            try:
                self.serve(sock)
            except (ConnectionClosed, OSError) as e:
                log(f"connection to the host lost ({e or type(e).__name__}); reconnecting")
            finally:
                sock.close()


def error(msg):
    return json.dumps({"error": msg}, ensure_ascii=False).encode()


def recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionClosed("the host closed the connection")
        got += k
    return buf


def drain(sock, n):
    chunk = bytearray(min(n, 1 << 16))
    while n:
        k = sock.recv_into(chunk, min(n, len(chunk)))
        if k == 0:
            raise ConnectionClosed("the host closed the connection")
        n -= k


def send_frame(sock, body):
    if len(body) <= 1 << 16:
        sock.sendall(HEADER.pack(len(body)) + body)
    else:
        sock.sendall(HEADER.pack(len(body)))
        sock.sendall(body)


def snapshot_point(cfg):
    # Leave the heap settled: collected, and frozen so later collections do
    # not walk (and dirty) the pages a snapshot shares between clones.
    gc.collect()
    gc.freeze()
    if not control(cfg, CONTROL_SNAPSHOT):
        # The VMM never saw this point, so a snapshot the host waits for
        # would never come: stop (init resets the machine) so the host
        # learns it at once, from the exit, instead of by a timeout.
        log("stopping: the snapshot point did not reach the VMM")
        sys.exit(1)


def main():
    cfg = Config(os.environ)
    agent = Agent(cfg, FakeOps(cfg.fake) if cfg.fake else KernelOps())
    snapshot_point(cfg)  # language snapshot
    try:
        agent.handle, agent.handle_http = load_app(cfg)
    except AppLoadError as e:
        agent.failure = str(e)
        log(f"app load failed: {e}")
        control(cfg, CONTROL_APP_FAILED)
    snapshot_point(cfg)  # diff snapshot
    agent.run_forever()


if __name__ == "__main__":
    main()
