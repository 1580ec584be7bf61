"""Host-side tests of the python3 and nodejs guest agents.

Each test starts one agent process over the stand-ins of harness.py and
plays the host: the same tests run against both runtimes.
"""

import base64
import json
import os
import shutil
import socket
import struct
import tempfile
import time
import unittest

from harness import MAX_FRAME, Host, find_node, frame, native_dir, unpack_image

PY_WORKLOAD = r'''
import asyncio, os, sys

print("workload imported")
STATE = {"n": 0}

def handle(req):
    STATE["n"] += 1
    op = req.get("op") if isinstance(req, dict) else None
    if op == "raise":
        raise ValueError("boom")
    if op == "unserialisable":
        return {"s": {1, 2}}
    if op == "nan":
        return {"x": float("nan")}
    if op == "list":
        return [1, 2]
    if op == "big":
        return {"data": "x" * req["n"]}
    if op == "count":
        return {"n": STATE["n"]}
    if op == "print":
        print("noise on stdout " * 100)
        return {"ok": True}
    if op == "exit":
        sys.exit(3)
    if op == "async":
        async def later():
            await asyncio.sleep(0.01)
            return {"async": True}
        return later()
    if op == "cwd":
        return {"cwd": os.getcwd()}
    return {"request": req}
'''

JS_WORKLOAD = r'''
'use strict';
console.log('workload imported');
const STATE = { n: 0 };
exports.handle = function handle(req) {
  STATE.n += 1;
  const op = req !== null && typeof req === 'object' ? req.op : undefined;
  if (op === 'raise') throw new Error('boom');
  if (op === 'unserialisable') return { s: 10n };
  if (op === 'circular') { const o = {}; o.self = o; return o; }
  if (op === 'list') return [1, 2];
  if (op === 'big') return { data: 'x'.repeat(req.n) };
  if (op === 'count') return { n: STATE.n };
  if (op === 'print') { console.log('noise on stdout '.repeat(100)); return { ok: true }; }
  if (op === 'throw-string') throw 'just a string';
  if (op === 'async') return new Promise((r) => setTimeout(() => r({ async: true }), 10));
  if (op === 'stray') { setTimeout(() => { throw new Error('stray'); }, 1); return { ok: true }; }
  if (op === 'cwd') return { cwd: process.cwd() };
  return { request: req };
};
'''

PY_HTTP_WORKLOAD = r'''
def handle_http(req):
    if req["path"] == "/json":
        return {"status": 201, "body": {"method": req["method"], "query": req["query"],
                                        "ct": req["headers"].get("content-type")}}
    if req["path"] == "/bad":
        return {"status": 99}
    return {"headers": {"content-type": "application/octet-stream", "x-len": str(len(req["body"]))},
            "body": bytes(reversed(req["body"]))}
'''

JS_HTTP_WORKLOAD = r'''
exports.handleHttp = async function (req) {
  if (req.path === '/json') {
    return { status: 201, body: { method: req.method, query: req.query, ct: req.headers['content-type'] } };
  }
  if (req.path === '/bad') return { status: 99 };
  return { headers: { 'content-type': 'application/octet-stream', 'x-len': String(req.body.length) },
           body: Buffer.from(req.body).reverse() };
};
'''


def envelope(body, method="POST", path="", query="", headers=None):
    """multivm's request envelope (src/multivm/envelope.rs)."""
    return {"snapvm.http": {"method": method, "path": path, "query": query,
                            "headers": headers or {},
                            "body": base64.b64encode(body).decode()}}


SEED = "0123456789abcdef" * 4
SEED_OPS = [
    "ioctl /dev/random RNDADDENTROPY 0x40085203 entropy_count=256 buf_size=32 buf=" + SEED,
    "ioctl /dev/random RNDRESEEDCRNG 0x5207",
]


class AgentTests:
    runtime = None
    workload_name = None
    workload = None

    root = None  # an unpacked root image to run the agent in (chroot)

    def setUp(self):
        where = os.path.join(self.root, "tmp") if self.root else None
        self.tmp = tempfile.mkdtemp(prefix=f"snapvm-{self.runtime}-", dir=where)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.host = Host(self.runtime, self.tmp, self.root)
        self.addCleanup(self.host.stop)

    def start(self, files=None, **kw):
        self.host.write_app({self.workload_name: self.workload} if files is None else files)
        self.host.start(**kw)

    def connect(self):
        """Starts the agent with the test workload, accepts, sends init."""
        self.start()
        conn = self.host.accept()
        self.addCleanup(conn.close)
        self.assertEqual(conn.init(), {"ready": True})
        return conn

    def app_line(self):
        return f"mount /dev/vdb {self.host.inner(self.host.app)} ro"

    # --- the sequence ---------------------------------------------------

    def test_sequence_124_mount_124_then_connect(self):
        self.start()
        conn = self.host.accept()
        self.addCleanup(conn.close)
        # Both snapshot points come before the connection, the mount between.
        self.assertEqual(self.host.ops(), ["outb 0x3f0 124", self.app_line(), "outb 0x3f0 124"])
        self.assertEqual(conn.call({"op": "count"}), {"n": 1})
        self.assertEqual(len(self.host.ops()), 3, "nothing more happens without an init frame")

    def test_a_snapshot_point_that_fails_stops_the_agent(self):
        # The control port cannot be written (here: the test log cannot),
        # so no VMM would ever see the point: the agent must exit at once
        # rather than serve a VM whose snapshot never comes.
        self.host.write_app({self.workload_name: self.workload})
        self.host.start(fake_log="/nonexistent-dir/ops.log")
        status = self.host.proc.wait(timeout=30)
        self.assertNotEqual(status, 0)
        out = self.host.output()
        self.assertIn("control port 124", out)
        self.assertIn("stopping: the snapshot point did not reach the VMM", out)

    def test_init_frame_seeds_rng_and_sets_clock(self):
        self.start()
        conn = self.host.accept()
        self.addCleanup(conn.close)
        self.assertEqual(conn.init(SEED, 1_700_000_000_123_456_789), {"ready": True})
        self.assertEqual(self.host.ops()[3:], SEED_OPS + [
            "clock_settime CLOCK_REALTIME 1700000000.123456789"])
        # A second init frame (same connection) applies again.
        self.assertEqual(conn.init(SEED, 5), {"ready": True})
        self.assertEqual(self.host.ops()[-1], "clock_settime CLOCK_REALTIME 0.000000005")
        # The largest u64.
        self.assertEqual(conn.init(SEED, 2**64 - 1), {"ready": True})
        self.assertEqual(self.host.ops()[-1], "clock_settime CLOCK_REALTIME 18446744073.709551615")

    def test_bad_init_frames_are_errors_and_agent_keeps_serving(self):
        conn = self.connect()
        before = len(self.host.ops())
        for bad in [{"seed": "ab" * 31, "realtime_ns": 1},
                    {"seed": "zz" * 32, "realtime_ns": 1},
                    {"seed": SEED, "realtime_ns": -1},
                    {"seed": SEED, "realtime_ns": "1"},
                    {"seed": SEED, "realtime_ns": 1.5},
                    {"seed": SEED}]:
            r = conn.call({"init": bad})
            self.assertIn("bad init frame", r.get("error", ""), bad)
        self.assertEqual(len(self.host.ops()), before, "a bad init frame changes nothing")
        self.assertEqual(conn.call({"op": "count"}), {"n": 1})

    # --- requests -------------------------------------------------------

    def test_any_json_value_is_a_request(self):
        conn = self.connect()
        for value in [{"a": [1, 2, {"b": None}]}, [1, "two"], "text", 42, -1.5, None, True,
                      {"unicode": "héllo wörld ✓ 🙂"}, {}]:
            self.assertEqual(conn.call(value), {"request": value})

    def test_function_error_is_a_response_and_agent_keeps_serving(self):
        conn = self.connect()
        expected = "ValueError: boom" if self.runtime == "python3" else "Error: boom"
        self.assertEqual(conn.call({"op": "raise"}), {"error": expected})
        self.assertEqual(conn.call({"op": "count"}), {"n": 2})

    def test_unserialisable_result_is_an_error(self):
        conn = self.connect()
        ops = ["unserialisable"] + (["nan"] if self.runtime == "python3" else ["circular"])
        for op in ops:
            r = conn.call({"op": op})
            self.assertIn("not JSON-serialisable", r.get("error", ""), op)
        self.assertEqual(conn.call({"op": "count"}), {"n": len(ops) + 1})

    def test_non_object_result_is_an_error(self):
        conn = self.connect()
        r = conn.call({"op": "list"})
        self.assertIn("not", r["error"])
        self.assertEqual(set(r), {"error"})

    def test_async_handle(self):
        conn = self.connect()
        self.assertEqual(conn.call({"op": "async"}), {"async": True})

    def test_function_output_does_not_disturb_the_protocol(self):
        conn = self.connect()
        self.assertEqual(conn.call({"op": "print"}), {"ok": True})
        self.assertIn("workload imported", self.host.output())

    def test_envelope_bodies_reach_handle_as_json_or_text(self):
        conn = self.connect()
        ct = {"content-type": "text/plain"}
        self.assertEqual(conn.call(envelope(b'{"op": "count"}', "PUT", "/x", "a=1", ct)), {"n": 1})
        self.assertEqual(conn.call(envelope("héllo".encode(), "GET")), {"request": "héllo"})
        self.assertEqual(conn.call(envelope(b"")), {"request": None})
        r = conn.call(envelope(b"\xff\xfe"))
        self.assertIn("UTF-8", r["error"])
        r = conn.call({"snapvm.http": {"body": "%%%"}})
        self.assertIn("bad HTTP request", r["error"])
        # Only a lone "snapvm.http" key is an envelope.
        other = {"snapvm.http": {}, "x": 1}
        self.assertEqual(conn.call(other), {"request": other})

    def test_handle_http_gets_method_path_query_headers_and_bytes(self):
        http = PY_HTTP_WORKLOAD if self.runtime == "python3" else JS_HTTP_WORKLOAD
        self.start({self.workload_name: http})
        conn = self.host.accept()
        self.addCleanup(conn.close)
        self.assertEqual(conn.init(), {"ready": True})
        r = conn.call(envelope(b"\x00\xff\x10", "PUT", "/bin"))["snapvm.http"]
        self.assertEqual(r["status"], 200)
        self.assertEqual(r["headers"], {"content-type": "application/octet-stream", "x-len": "3"})
        self.assertEqual(base64.b64decode(r["body"]), b"\x10\xff\x00")
        r = conn.call(envelope(b"", "PATCH", "/json", "a=1", {"content-type": "text/plain"}))
        r = r["snapvm.http"]
        self.assertEqual(r["status"], 201)
        self.assertEqual(r["headers"], {"content-type": "application/json"})
        self.assertEqual(json.loads(base64.b64decode(r["body"])),
                         {"method": "PATCH", "query": "a=1", "ct": "text/plain"})
        # A plain JSON request is a POST with that JSON as its body.
        r = conn.call({"k": [1]})["snapvm.http"]
        self.assertEqual(json.loads(base64.b64decode(r["body"])[::-1]), {"k": [1]})
        self.assertIn("status", conn.call(envelope(b"", path="/bad"))["error"])

    def test_function_runs_in_the_app_directory(self):
        conn = self.connect()
        self.assertEqual(conn.call({"op": "cwd"}), {"cwd": self.host.inner(self.host.app)})

    def test_pipelined_requests_are_answered_in_order(self):
        conn = self.connect()
        conn.send_raw(b"".join(frame(json.dumps({"i": i}).encode()) for i in range(50)))
        for i in range(50):
            self.assertEqual(conn.recv(), {"request": {"i": i}})

    # --- framing --------------------------------------------------------

    def test_large_payloads_both_ways(self):
        conn = self.connect()
        for size in [1 << 20, (4 << 20) - 64]:
            data = "y" * (size - 40)
            req = {"blob": data}
            self.assertGreaterEqual(len(json.dumps(req)), size - 40)
            r = conn.call(req)
            self.assertEqual(len(r["request"]["blob"]), len(data))
        r = conn.call({"op": "big", "n": 2 << 20})
        self.assertEqual(len(r["data"]), 2 << 20)

    def test_response_over_the_limit_is_an_error(self):
        conn = self.connect()
        r = conn.call({"op": "big", "n": 5 << 20})
        self.assertIn("exceeds", r["error"])
        self.assertEqual(conn.call({"op": "count"}), {"n": 2})

    def test_request_over_the_limit_is_drained_and_answered(self):
        conn = self.connect()
        conn.send_raw(struct.pack(">I", MAX_FRAME + 1) + b" " * (MAX_FRAME + 1))
        self.assertEqual(conn.recv(), {"error": "request too large"})
        self.assertEqual(conn.call({"op": "count"}), {"n": 1})

    def test_invalid_json_and_utf8_are_errors(self):
        conn = self.connect()
        for body in [b"{nope", b"", b"\xff\xfe{}", b'"\xc3"']:
            conn.send_raw(frame(body))
            self.assertEqual(conn.recv(), {"error": "invalid json"}, body)
        self.assertEqual(conn.call({"op": "count"}), {"n": 1})

    # --- the connection -------------------------------------------------

    def test_reconnects_after_the_host_drops_the_connection(self):
        conn = self.connect()
        self.assertEqual(conn.call({"op": "count"}), {"n": 1})
        conn.close()  # as a snapshot restore's TRANSPORT_RESET does
        conn2 = self.host.accept()
        self.addCleanup(conn2.close)
        self.assertEqual(conn2.init(SEED, 7), {"ready": True})
        # Same process, same loaded app: state survives, nothing reloads.
        self.assertEqual(conn2.call({"op": "count"}), {"n": 2})
        ops = self.host.ops()
        self.assertEqual(ops[:3], ["outb 0x3f0 124", self.app_line(), "outb 0x3f0 124"])
        self.assertEqual(sum("RNDADDENTROPY" in op for op in ops), 2)
        self.assertEqual(ops[-1], "clock_settime CLOCK_REALTIME 0.000000007")

    def test_reconnects_after_a_drop_mid_frame(self):
        conn = self.connect()
        conn.send_raw(struct.pack(">I", 1000) + b'{"half":')
        conn.close()
        conn2 = self.host.accept()
        self.addCleanup(conn2.close)
        self.assertEqual(conn2.init(), {"ready": True})
        self.assertEqual(conn2.call({"op": "count"}), {"n": 1})

    def test_reconnects_when_the_answer_cannot_be_sent(self):
        conn = self.connect()
        conn.send({"op": "big", "n": 1 << 20})
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        conn2 = self.host.accept()
        self.addCleanup(conn2.close)
        self.assertEqual(conn2.init(), {"ready": True})
        self.assertEqual(conn2.call({"op": "count"}), {"n": 2})

    def test_connects_once_the_host_listens(self):
        self.start(listen=False)
        time.sleep(0.3)  # refused (no socket) a few times, backing off
        self.assertIsNone(self.host.proc.poll(), self.host.output())
        self.host.listen()
        conn = self.host.accept()
        self.addCleanup(conn.close)
        self.assertEqual(conn.init(), {"ready": True})

    # --- app load failures ----------------------------------------------

    def assert_app_failed(self, why, mounted=True):
        conn = self.host.accept()
        self.addCleanup(conn.close)
        expected = ["outb 0x3f0 124"] + ([self.app_line()] if mounted else []) + [
            "outb 0x3f0 125", "outb 0x3f0 124"]
        self.assertEqual(self.host.ops(), expected)
        # The host can still handshake; every request gets the reason.
        self.assertEqual(conn.init(), {"ready": True})
        r = conn.call({"op": "count"})
        self.assertTrue(r["error"].startswith("app load failed: "), r)
        self.assertIn(why, r["error"])
        self.assertIn(why, conn.call([1])["error"])

    def test_failed_import_reports_125(self):
        bad = ("raise RuntimeError('broken app')\n" if self.runtime == "python3"
               else "throw new RangeError('broken app');\n")
        self.start({self.workload_name: bad})
        self.assert_app_failed("broken app")

    def test_syntax_error_reports_125(self):
        self.start({self.workload_name: "def handle(:\n" if self.runtime == "python3"
                    else "exports.handle = (;\n"})
        self.assert_app_failed("SyntaxError")

    def test_missing_workload_reports_125(self):
        self.start({"other.txt": "x"})
        self.assert_app_failed(f"no {self.workload_name} in the appfs")

    def test_workload_without_handle_reports_125(self):
        self.start({self.workload_name: "x = 1\n" if self.runtime == "python3"
                    else "exports.other = 1;\n"})
        self.assert_app_failed("no handle(request) function")

    def test_mount_failure_reports_125(self):
        self.host.write_app({})
        self.host.start(appdir=os.path.join(self.tmp, "missing"))
        self.assert_app_failed("cannot mount /dev/vdb", mounted=False)


class Python3AgentTests(AgentTests, unittest.TestCase):
    runtime = "python3"
    workload_name = "workload.py"
    workload = PY_WORKLOAD

    def test_system_exit_in_handle_is_an_error(self):
        conn = self.connect()
        self.assertEqual(conn.call({"op": "exit"}), {"error": "SystemExit: 3"})
        self.host.wait_alive()
        self.assertEqual(conn.call({"op": "count"}), {"n": 2})

    def test_deeply_nested_request_is_an_error_not_a_crash(self):
        conn = self.connect()
        conn.send_raw(frame(b"[" * 200000 + b"]" * 200000))
        self.assertIn("error", conn.recv())
        self.assertEqual(conn.call({"op": "count"}), {"n": 1})


def node_skip():
    if find_node() is None:
        return "node is not installed"
    if not (native_dir() / "snapvm_vsock.node").exists():
        return "node's headers (node_api.h) are missing"
    return None


@unittest.skipIf(node_skip() and not os.environ.get("SNAPVM_REQUIRE_NODE"), node_skip() or "")
class NodejsAgentTests(AgentTests, unittest.TestCase):
    runtime = "nodejs"
    workload_name = "workload.js"
    workload = JS_WORKLOAD

    def test_thrown_non_error_is_an_error(self):
        conn = self.connect()
        self.assertEqual(conn.call({"op": "throw-string"}), {"error": "string: just a string"})

    def test_stray_async_error_does_not_kill_the_agent(self):
        conn = self.connect()
        self.assertEqual(conn.call({"op": "stray"}), {"ok": True})
        self.host.wait_alive()
        self.assertEqual(conn.call({"op": "count"}), {"n": 2})
        self.assertIn("uncaught exception", self.host.output())

    def test_esm_workload(self):
        self.host.write_app({"package.json": '{"type": "module"}'})
        self.start({"workload.js": "export async function handle(r) { return {esm: r}; }\n"})
        conn = self.host.accept()
        self.addCleanup(conn.close)
        self.assertEqual(conn.init(), {"ready": True})
        self.assertEqual(conn.call(5), {"esm": 5})


# --- the same tests in the built images -------------------------------------
# SNAPVM_TEST_IMAGE_PYTHON3 / SNAPVM_TEST_IMAGE_NODEJS name images built by
# rootfs/mk_rtimage.sh; each is unpacked (debugfs, no mount) and every test
# above runs its agent in a chroot of it: the image's runtime, agent
# configuration, helper and addon. Needs root.

_unpacked = {}


def image_root(runtime):
    image = os.environ.get(f"SNAPVM_TEST_IMAGE_{runtime.upper()}")
    if not image:
        return None
    if runtime not in _unpacked:
        _unpacked[runtime] = unpack_image(image, tempfile.mkdtemp(prefix=f"snapvm-root-{runtime}-"))
    return str(_unpacked[runtime])


def tearDownModule():
    for root in _unpacked.values():
        shutil.rmtree(root, True)


@unittest.skipUnless(os.environ.get("SNAPVM_TEST_IMAGE_PYTHON3"), "no python3 image given")
class Python3ImageTests(Python3AgentTests):
    @classmethod
    def setUpClass(cls):
        cls.root = image_root("python3")


@unittest.skipUnless(os.environ.get("SNAPVM_TEST_IMAGE_NODEJS"), "no nodejs image given")
class NodejsImageTests(NodejsAgentTests):
    @classmethod
    def setUpClass(cls):
        cls.root = image_root("nodejs")


if __name__ == "__main__":
    unittest.main()
