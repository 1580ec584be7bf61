"""Host side stand-ins for testing the guest agents outside a VM.

The agent under test runs as an ordinary process with the test overrides of
its environment (see rootfs/python3/agent.py): its "vsock" is a Unix socket
this harness listens on, and SNAPVM_GUEST_FAKE makes it and the helper log
every privileged operation (control port, mount, RNG ioctls, clock) to a
file instead of performing it, so a test sees the exact sequence.
"""

import atexit
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

ROOTFS = Path(__file__).resolve().parent.parent
MAX_FRAME = 4 << 20
TIMEOUT = 15.0


def find_node():
    return shutil.which("node") or shutil.which("nodejs")


def build_native(out_dir):
    """Builds the helper (static, as in the image) and, when node's headers
    are there, the node addon into out_dir; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    guest = ROOTFS / "guest"
    helper = out / "snapvm-guest"
    if not helper.exists():
        subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-o", str(helper),
                        str(guest / "snapvm-guest.c"), str(guest / "guestops.c")], check=True)
    addon = out / "snapvm_vsock.node"
    include = node_include_dir()
    if not addon.exists() and include:
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                        f"-I{include}", f"-I{guest}", "-o", str(addon),
                        str(ROOTFS / "nodejs" / "snapvm_vsock.c"), str(guest / "guestops.c")],
                       check=True)
    return out


def node_include_dir():
    for d in (os.environ.get("SNAPVM_NODE_INCLUDE"), "/usr/include/node",
              "/usr/local/include/node"):
        if d and (Path(d) / "node_api.h").exists():
            return d
    return None


_native_dir = None


def native_dir():
    """The directory with the built helper and addon (built once per run)."""
    global _native_dir
    if _native_dir is None:
        given = os.environ.get("SNAPVM_ROOTFS_TEST_BUILD")
        if not given:
            given = tempfile.mkdtemp(prefix="snapvm-native-")
            atexit.register(shutil.rmtree, given, True)
        _native_dir = build_native(given)
    return _native_dir


def frame(body):
    return struct.pack(">I", len(body)) + body


class Conn:
    """The host's end of one agent connection."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(TIMEOUT)

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, value):
        self.send_raw(frame(json.dumps(value).encode()))

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("agent closed the connection")
            buf += chunk
        return bytes(buf)

    def recv_bytes(self):
        (n,) = struct.unpack(">I", self.recv_exact(4))
        assert n <= MAX_FRAME, f"agent sent a {n}-byte frame"
        return self.recv_exact(n)

    def recv(self):
        return json.loads(self.recv_bytes())

    def call(self, value):
        self.send(value)
        return self.recv()

    def init(self, seed_hex="ab" * 32, realtime_ns=1_700_000_000_123_456_789):
        return self.call({"init": {"seed": seed_hex, "realtime_ns": realtime_ns}})

    def close(self):
        self.sock.close()


def unpack_image(image, into):
    """Copies a root image's files into the directory `into` (no mount)."""
    subprocess.run(["debugfs", "-R", f"rdump / {into}", str(image)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not (Path(into) / "etc/snapvm/agent.argv").exists():
        raise RuntimeError(f"{image} has no /etc/snapvm/agent.argv")
    # What init's devtmpfs provides in the guest.
    for name, minor in (("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)):
        os.mknod(Path(into) / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    return Path(into)


def read_conf(path):
    return [line for line in Path(path).read_text().splitlines()
            if line and not line.startswith("#")]


class Host:
    """One agent process and the stand-ins around it.

    With `root` (an unpacked root image) the agent runs in a chroot of it,
    started as the image's init would (its agent.argv and agent.env), with
    the image's own runtime, helper and addon; tmp must lie inside root.
    """

    def __init__(self, runtime, tmp, root=None):
        self.runtime = runtime
        self.root = Path(root) if root else None
        self.tmp = Path(tmp)
        self.sock_path = self.tmp / "vsock_1234"
        self.fake_log = self.tmp / "ops.log"
        self.app = self.tmp / "app"
        self.stderr_path = self.tmp / "agent.stderr"
        self.listener = None
        self.proc = None

    def listen(self):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock_path))
        self.listener.listen(4)
        self.listener.settimeout(TIMEOUT)

    def write_app(self, files):
        self.app.mkdir(exist_ok=True)
        for name, text in files.items():
            (self.app / name).write_text(text)

    def inner(self, path):
        """`path` as the agent sees it."""
        if self.root is None:
            return str(path)
        return "/" + str(Path(path).relative_to(self.root))

    def start(self, appdir=None, listen=True, fake_log=None):
        """Starts the agent; `fake_log` replaces the test-mode log (a path
        that cannot be written makes every privileged operation fail)."""
        if listen:
            self.listen()
        env = {
            "SNAPVM_VSOCK": f"unix:{self.inner(self.sock_path)}",
            "SNAPVM_GUEST_FAKE": fake_log or self.inner(self.fake_log),
            "SNAPVM_APPFS": "/dev/vdb",
            "SNAPVM_APPDIR": self.inner(appdir or self.app),
        }
        self.stderr = open(self.stderr_path, "wb")
        if self.root is not None:
            conf = self.root / "etc/snapvm"
            env.update(line.split("=", 1) for line in read_conf(conf / "agent.env"))
            argv = ["chroot", str(self.root), *read_conf(conf / "agent.argv")]
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=self.stderr, stderr=self.stderr, cwd="/")
            return
        native = native_dir()
        env.update({
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SNAPVM_HELPER": str(native / "snapvm-guest"),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        if self.runtime == "python3":
            argv = [os.environ.get("SNAPVM_TEST_PYTHON", "python3"), "-u",
                    str(ROOTFS / "python3" / "agent.py")]
        else:
            env["SNAPVM_NODE_ADDON"] = str(native / "snapvm_vsock.node")
            argv = [find_node(), "--expose-gc", str(ROOTFS / "nodejs" / "agent.js")]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=self.stderr, cwd=self.tmp)

    def accept(self):
        try:
            sock, _ = self.listener.accept()
        except socket.timeout:
            raise AssertionError(f"agent did not connect; its output:\n{self.output()}") from None
        return Conn(sock)

    def ops(self):
        try:
            return self.fake_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def output(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.listener:
            self.listener.close()
        if getattr(self, "stderr", None):
            self.stderr.close()

    def wait_alive(self, seconds=0.2):
        """Asserts the agent is still running after a short while."""
        time.sleep(seconds)
        assert self.proc.poll() is None, f"agent died:\n{self.output()}"
