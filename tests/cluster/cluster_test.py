"""The cluster tests (issue 24), run by scripts/cluster-test.sh against a
3-node cluster it started with scripts/cluster.sh: real multivm nodes in
their own network namespaces, Debian's HAProxy in front, Debian's
Prometheus scraping them. Each test prints one line; the first failing
assertion stops the run with the reason (the shell script then stops the
cluster and removes everything).

Usage: cluster_test.py --script scripts/cluster.sh --port P --prom_port P
       --nodes n1=ADDR:PORT,... --haproxy_sock PATH --check_interval S
       --deploy FILE.json
"""

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter

A = None  # the arguments
# Every answered (200) invocation the client saw: (node, function) -> count.
ANSWERED = Counter()
# Every invocation the client sent: function -> count (phases without failures).
SENT = Counter()
LOCK = threading.Lock()


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


def request(host, port, method, path, body=b"", headers=None, timeout=60):
    """One HTTP request on a fresh connection: (status, headers, body)."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def invoke(fn, body=b"{}", count=True):
    """POST /function/FN through HAProxy; records a 200 by node."""
    status, h, b = request("127.0.0.1", A.port, "POST", f"/function/{fn}", body,
                           {"Content-Type": "application/json"})
    if status == 200 and count:
        with LOCK:
            ANSWERED[(h.get("x-snapvm-node"), fn)] += 1
    return status, h, b


def node_get(node, path):
    host, port = A.nodes[node].rsplit(":", 1)
    status, _, b = request(host, int(port), "GET", path, timeout=5)
    check(status == 200, f"{node} GET {path}: {status} {b[:200]!r}")
    return b.decode()


def metric(node, sample):
    for line in node_get(node, "/metrics").splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def gw(fn, code):
    return f'gateway_function_invocation_total{{function_name="{fn}.openfaas-fn",code="{code}"}}'


def prom(query):
    q = urllib.parse.urlencode({"query": query})
    status, _, b = request("127.0.0.1", A.prom_port, "GET", f"/api/v1/query?{q}", timeout=5)
    check(status == 200, f"Prometheus {query}: {status} {b[:300]!r}")
    doc = json.loads(b)
    return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]


def haproxy_states():
    s = socket.socket(socket.AF_UNIX)
    s.connect(A.haproxy_sock)
    s.sendall(b"show stat\n")
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    s.close()
    lines = raw.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(head, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r["status"] for r in rows
            if r.get("pxname") == "nodes" and r["svname"] not in ("BACKEND", "FRONTEND")}


def wait_prom_equal(query, want, key, what, limit=30):
    """Polls Prometheus until `query` grouped by `key` equals `want`."""
    deadline = time.monotonic() + limit
    got = None
    while time.monotonic() < deadline:
        got = {key(m): v for m, v in prom(query)}
        got = {k: v for k, v in got.items() if k in want or v}
        if got == want:
            return got
        time.sleep(0.5)
    raise Failed(f"{what}: Prometheus has {got}, the client counted {want}")


# --- the tests ------------------------------------------------------------

HELLO = [f"hello-{c}" for c in "abcdef"]
NAPS = ["nap-a", "nap-b", "nap-c"]


def test_every_function_answers_warm_on_one_node():
    homes = {}
    for fn in HELLO + NAPS:
        seen = set()
        for i in range(3):
            body = b'{"name": "c"}' if fn in HELLO else b'{"ms": 1}'
            status, h, b = invoke(fn, body)
            SENT[fn] += 1
            check(status == 200, f"{fn}: {status} {b[:200]!r}")
            if fn in HELLO:
                check(json.loads(b) == {"message": "hello, c"}, f"{fn}: {b!r}")
            if i > 0:
                check(h.get("x-start") == "warm", f"{fn} request {i + 1}: {h.get('x-start')}, not warm")
            seen.add(h.get("x-snapvm-node"))
        check(len(seen) == 1, f"{fn} answered by {seen}: hashing should keep it on one node")
        homes[fn] = seen.pop()
    used = Counter(homes.values())
    check(len(used) >= 2, f"all functions on one node: {homes}")
    return f"{len(homes)} functions x 3, each warm on its node ({dict(used)})"


def test_deploy_reaches_every_node():
    r = subprocess.run([A.script, "deploy", A.deploy], capture_output=True, text=True, timeout=150)
    check(r.returncode == 0, f"cluster.sh deploy failed: {r.stderr}")
    fn = json.load(open(A.deploy))["service"]
    for node in A.nodes:
        st = json.loads(node_get(node, f"/system/function/{fn}"))
        check(st["annotations"].get("com.snapvm.state") == "ready", f"{node}: {st}")
    status, h, b = invoke(fn, b'{"name": "d"}')
    SENT[fn] += 1
    check(status == 200 and json.loads(b) == {"message": "hello, d"}, f"{fn}: {status} {b!r}")
    st = subprocess.run([A.script, "status"], capture_output=True, text=True, timeout=30)
    check(st.returncode == 0 and st.stdout.count(fn) == len(A.nodes),
          f"status should list {fn} on every node:\n{st.stdout}{st.stderr}")
    return f"{fn} ready on {len(A.nodes)} nodes, answered through HAProxy by {h.get('x-snapvm-node')}"


def test_full_node_offloads_and_nothing_runs_twice():
    fn = "nap-a"
    _, h, _ = invoke(fn, b'{"ms": 1}')
    SENT[fn] += 1
    home = h["x-snapvm-node"]
    budget = metric(home, "multivm_memory_budget_mib")
    vm_mib = 40  # 32 guest + 8 overhead (scripts/cluster-test.sh)
    fit = int(budget // vm_mib)
    n = fit + 2  # nap-a has max_queue 0: two more than fit are refused at home
    before = {node: (metric(node, gw(fn, 200)), metric(node, gw(fn, 503))) for node in A.nodes}
    results = [None] * n

    def one(i):
        results[i] = invoke(fn, b'{"ms": 2500}')

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    SENT[fn] += n
    bad = [(s, b[:200]) for s, _, b in results if s != 200]
    check(not bad, f"{len(bad)} of {n} requests lost: {bad}")
    by = Counter(h["x-snapvm-node"] for _, h, _ in results)
    check(by[home] == fit, f"the home node {home} ran {by[home]}, its budget fits {fit}: {dict(by)}")
    check(len(by) >= 2, f"nothing was offloaded: {dict(by)}")
    hw = metric(home, "multivm_memory_high_water_mib")
    check(hw == budget, f"{home} never reached its budget: high water {hw} of {budget} MiB")
    after = {node: (metric(node, gw(fn, 200)), metric(node, gw(fn, 503))) for node in A.nodes}
    ran = sum(after[x][0] - before[x][0] for x in A.nodes)
    refused = after[home][1] - before[home][1]
    check(ran == n, f"the nodes ran {ran} invocations for {n} requests")
    check(refused >= n - fit, f"{home} refused {refused} (503) for {n - fit} over its budget")
    return (f"{n} concurrent on {home} (budget {budget:.0f} MiB = {fit} VMs): "
            f"{dict(by)}, {refused:.0f} refused at home and re-dispatched, {ran:.0f} runs")


def test_prometheus_sums_equal_what_the_client_sent():
    want = {f"{fn}.openfaas-fn": float(n) for fn, n in SENT.items()}
    wait_prom_equal("snapvm:function_invocations:sum", want, lambda m: m.get("function_name"),
                    "invocations per function over the cluster")
    return f"snapvm:function_invocations:sum = the client's counts for {len(want)} functions"


def wait_refused(addr, limit=5.0):
    """Connects to HOST:PORT until the connection is refused; returns when."""
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
        except ConnectionRefusedError:
            return time.monotonic()
        except OSError:
            pass
        time.sleep(0.005)
    check(False, f"{addr} still takes connections {limit} s after its kill")


def test_kill_9_mid_load():
    victim = None
    _, h, _ = invoke("nap-b", b'{"ms": 1}')
    victim = h["x-snapvm-node"]
    fns = HELLO + NAPS
    stop = threading.Event()
    log = []  # (start, end, fn, status or None, node, error, client)

    def worker(k):
        i = k
        while not stop.is_set():
            fn = fns[i % len(fns)]
            i += 1
            body = b'{"ms": 300}' if fn in NAPS else b"{}"
            t0 = time.monotonic()
            try:
                status, hd, _ = invoke(fn, body)
                rec = (t0, time.monotonic(), fn, status, hd.get("x-snapvm-node"), None, k)
            except OSError as e:
                rec = (t0, time.monotonic(), fn, None, None, repr(e), k)
            with LOCK:
                log.append(rec)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    # Wait until the victim has a request in flight, so that the kill is mid-load.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and metric(victim, "multivm_vms{function=\"nap-b\",state=\"busy\"}") < 1:
        time.sleep(0.01)
    # The kill spans from the SIGKILL until the node's listening socket is
    # gone: connections its kernel queued meanwhile die with the process.
    t_kill = time.monotonic()
    subprocess.run([A.script, "kill", victim], check=True, capture_output=True, timeout=10)
    t_gone = wait_refused(A.nodes[victim])
    down_after = None
    while time.monotonic() < t_kill + 10:
        if haproxy_states().get(victim, "").startswith("DOWN"):
            down_after = time.monotonic() - t_kill
            break
        time.sleep(0.05)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()

    silent = [r for r in log if r[3] is None]
    check(not silent, f"requests without an HTTP answer: {silent[:5]}")
    failed = [r for r in log if r[3] != 200]
    for t0, t1, fn, status, node, _, _ in failed:
        check(t0 < t_gone and t_kill < t1 + 0.05,
              f"{fn} failed with {status} but was not in flight during the kill "
              f"({t0 - t_kill:+.3f}..{t1 - t_kill:+.3f} s, the node was gone at {t_gone - t_kill:+.3f} s)")
        check(status in (502, 503, 504), f"{fn}: {status}")
        check(node == victim, f"{fn} failed with {status} on {node}, not on the killed {victim}")
    # A client has one request in flight at a time: of those it sent
    # before the kill, at most one can fail.
    sent_before = Counter(r[6] for r in failed if r[0] < t_kill)
    check(all(n == 1 for n in sent_before.values()),
          f"clients with more than one failure sent before the kill: {dict(sent_before)}")
    after = [r for r in log if r[0] > t_gone]
    check(after and all(r[3] == 200 for r in after), "a request sent after the kill failed")
    check(not any(r[4] == victim for r in after), "a request sent after the kill went to the dead node")
    late = [r for r in log if r[4] == victim and r[3] == 200 and r[1] > t_gone + 0.05]
    check(not late, f"answers from {victim} after its kill: {late[:3]}")
    limit = 2 * A.check_interval + 1.5  # fall 2, plus one check's timeout
    check(down_after is not None and down_after <= limit,
          f"HAProxy took {down_after} s to take {victim} out (limit {limit} s)")

    # Prometheus: the live nodes' counts equal what the client got from them.
    live = {n for n in A.nodes if n != victim}
    want = {(n, f"{fn}.openfaas-fn"): float(c) for (n, fn), c in ANSWERED.items() if n in live}
    wait_prom_equal("snapvm:node_function_invocations:sum", want,
                    lambda m: (m.get("node"), m.get("function_name")),
                    "per-node invocations of the live nodes")
    return (f"{victim} killed -9 under 6 clients, its socket gone {1e3 * (t_gone - t_kill):.0f} ms later: "
            f"{len(log)} requests, {len(failed)} failed "
            f"(all in flight on it, {sorted({r[3] for r in failed})}), {len(after)} sent after the kill "
            f"all answered by {sorted({r[4] for r in after})}; DOWN in HAProxy after {down_after:.2f} s; "
            f"Prometheus matches the live nodes")


def main():
    global A
    p = argparse.ArgumentParser()
    p.add_argument("--script", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prom_port", type=int, required=True)
    p.add_argument("--nodes", required=True)
    p.add_argument("--haproxy_sock", required=True)
    p.add_argument("--check_interval", type=float, required=True)
    p.add_argument("--deploy", required=True)
    A = p.parse_args()
    A.nodes = dict(kv.split("=", 1) for kv in A.nodes.split(","))
    tests = [test_every_function_answers_warm_on_one_node, test_deploy_reaches_every_node,
             test_full_node_offloads_and_nothing_runs_twice,
             test_prometheus_sums_equal_what_the_client_sent, test_kill_9_mid_load]
    for t in tests:
        t0 = time.monotonic()
        try:
            what = t()
        except Failed as e:
            print(f"FAIL {t.__name__}: {e}", flush=True)
            return 1
        print(f"ok   {t.__name__} ({time.monotonic() - t0:.1f} s): {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
