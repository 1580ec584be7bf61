#!/usr/bin/env bash
# A snapvm cluster: several multivm nodes behind HAProxy, scraped by
# Prometheus (both Debian's), from the configs in deploy/.
#
#   scripts/cluster.sh start --config NODE.yaml [--nodes 3] [--mem 1024] ...
#       On this machine: one network namespace per node (veth into a bridge
#       of its own, private addresses SUBNET.11, .12, ...; nothing is
#       routed or forwarded), a multivm --cluster in each, HAProxy and
#       Prometheus on loopback. @NODE@ in NODE.yaml becomes the node's name
#       (n1, n2, ...), e.g. for deploy.state_dir; paths in it must be
#       absolute (each node's copy lives in the cluster directory).
#   scripts/cluster.sh status        per node: HAProxy's view, functions, VMs, memory
#   scripts/cluster.sh deploy FILE   a FunctionDeployment (JSON, `-` = stdin) to
#                                    every node, as faas-cli does (PUT, then POST
#                                    on 404); waits until it is ready on all
#   scripts/cluster.sh remove NAME   removes a deployed function from every node
#   scripts/cluster.sh kill NODE     SIGKILLs a node's multivm (tests, drills)
#   scripts/cluster.sh stop          stops everything and removes the namespaces,
#                                    links, bridge and the cluster directory
#   scripts/cluster.sh config --nodes HOST:PORT,... --out DIR
#       Production: renders deploy/haproxy.cfg, deploy/prometheus.yml and
#       the rules for real hosts; `status`, `deploy` and `remove` then take
#       --nodes HOST:PORT,... instead of a local cluster.
#
# Options of start (defaults): --nodes 3, --mem 1024 (MiB per node),
# --port 8080 (HAProxy, 127.0.0.1), --stats_port 8404, --prom_port 9090,
# --scrape_interval 1s, --check_interval 1s, --name snapc (prefix of the
# namespaces and links, at most 8 characters), --subnet 10.77.0 (a /24),
# --basic_auth_dir DIR (given to every node; deploy/status use it),
# --bindir DIR (multivm's, default target/release), --balance roundrobin
# (instead of hashing the function name; for comparisons); after `--`, more
# multivm arguments. SNAPVM_CLUSTER_DIR (default /tmp/snapvm-cluster) is
# where a local cluster keeps its state; every subcommand reads it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${SNAPVM_CLUSTER_DIR:-/tmp/snapvm-cluster}
state=$dir/cluster.env

die() {
    echo "cluster: error: $*" >&2
    exit 1
}
say() { echo "cluster: $*" >&2; }

need_root() {
    [[ $(id -u) == 0 ]] || die "$1 needs root (network namespaces, KVM jails)"
}

# --- rendering the committed configs -------------------------------------

# render_haproxy LISTEN STATS_LISTEN STATE_DIR CHECK_INTERVAL NAME=HOST:PORT...
render_haproxy() {
    local listen=$1 stats=$2 sdir=$3 inter=$4
    shift 4
    local servers="" n=0 kv
    for kv in "$@"; do
        servers+="    server ${kv%%=*} ${kv#*=}"$'\n'
        n=$((n + 1))
    done
    # One try per other node at most (see deploy/haproxy.cfg on which).
    local retries=$((n > 1 ? n - 1 : 1))
    python3 - "$repo/deploy/haproxy.cfg" "$listen" "$stats" "$sdir" "$inter" "$retries" "$servers" "${BALANCE:-hash}" <<'EOF'
import re, sys
text, listen, stats, sdir, inter, retries, servers, balance = open(sys.argv[1]).read(), *sys.argv[2:]
if balance == "roundrobin":  # for comparisons only (scripts/bench-cluster.sh)
    hashed = "    balance hash path,field(3,/)\n"
    assert hashed in text, "no hash balance line in haproxy.cfg"
    text = text.replace(hashed, "    balance roundrobin\n")
for k, v in [("LISTEN", listen), ("STATS_LISTEN", stats), ("STATE_DIR", sdir),
             ("CHECK_INTERVAL", inter), ("RETRIES", retries), ("SERVERS", servers.rstrip("\n"))]:
    text = text.replace("@%s@" % k, v)
assert not re.search("@[A-Z_]+@", text), "unrendered word left in haproxy.cfg"
sys.stdout.write(text)
EOF
}

# render_prometheus RULES HAPROXY_STATS SCRAPE_INTERVAL NAME=HOST:PORT...
render_prometheus() {
    local rules=$1 hstats=$2 every=$3
    shift 3
    local targets="" kv
    for kv in "$@"; do
        targets+="      - targets: [\"${kv#*=}\"]"$'\n'"        labels: {node: ${kv%%=*}}"$'\n'
    done
    python3 - "$repo/deploy/prometheus.yml" "$rules" "$hstats" "$every" "$targets" <<'EOF'
import re, sys
text, rules, hstats, every, targets = open(sys.argv[1]).read(), *sys.argv[2:]
for k, v in [("RULES", rules), ("HAPROXY_STATS", hstats), ("SCRAPE_INTERVAL", every),
             ("TARGETS", targets.rstrip("\n"))]:
    text = text.replace("@%s@" % k, v)
assert not re.search("@[A-Z_]+@", text), "unrendered word left in prometheus.yml"
sys.stdout.write(text)
EOF
}

# NAME=HOST:PORT words from --nodes HOST:PORT,... (named n1, n2, ...).
nodes_from_list() {
    local i=0 h
    IFS=, read -ra hosts <<<"$1"
    ((${#hosts[@]})) || die "--nodes: no HOST:PORT given"
    for h in "${hosts[@]}"; do
        [[ $h == *:* ]] || die "--nodes: $h is not HOST:PORT"
        i=$((i + 1))
        echo "n$i=$h"
    done
}

cmd_config() {
    local list="" out="" listen=":8080" stats="127.0.0.1:8404" every=5s inter=2s
    while (($#)); do
        case $1 in
        --nodes) list=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --listen) listen=$2; shift 2 ;;
        --stats_listen) stats=$2; shift 2 ;;
        --scrape_interval) every=$2; shift 2 ;;
        --check_interval) inter=$2; shift 2 ;;
        *) die "config: unknown argument $1" ;;
        esac
    done
    [[ -n $list && -n $out ]] || die "config needs --nodes HOST:PORT,... and --out DIR"
    mapfile -t nodes < <(nodes_from_list "$list")
    mkdir -p "$out"
    local hstats=$stats
    [[ $hstats == :* ]] && hstats=127.0.0.1$hstats
    # Debian's haproxy service runs with /run/haproxy as its state directory.
    render_haproxy "$listen" "$stats" /run/haproxy "$inter" "${nodes[@]}" >"$out/haproxy.cfg"
    render_prometheus /etc/prometheus/snapvm-rules.yml "$hstats" "$every" "${nodes[@]}" >"$out/prometheus.yml"
    cp "$repo/deploy/snapvm-rules.yml" "$out/snapvm-rules.yml"
    # Checked here too, though it is meant for another host: HAProxy
    # resolves the node names and needs /run/haproxy when it checks.
    local why
    if ! why=$(haproxy -c -f "$out/haproxy.cfg" 2>&1); then
        say "warning: HAProxy's check of $out/haproxy.cfg fails on this host (run \`haproxy -c -f\` where it will run):"
        grep -E 'ALERT|WARNING' <<<"$why" >&2 || echo "$why" >&2
    fi
    say "wrote $out/haproxy.cfg, $out/prometheus.yml, $out/snapvm-rules.yml"
}

# --- a local cluster ------------------------------------------------------

load_state() {
    [[ -f $state ]] || die "no cluster at $dir (start one, or give --nodes HOST:PORT,...)"
    # shellcheck source=/dev/null
    source "$state"
}

# Stops what a cluster at $dir started, whatever state it reached; quiet
# about what is already gone. Used by `stop` and when `start` fails.
teardown() {
    local name=${NAME:-} n=${N:-0} i pid f pids=() files=()
    # SIGTERM to all at once (a node drains its requests and stops its VMs),
    # SIGKILL to whatever still runs 35 s later.
    for f in "$dir/prometheus.pid" "$dir/haproxy.pid" "$dir"/n*/multivm.pid; do
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        files+=("$f")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for ((t = 0; t < 350 && ${#pids[@]}; t++)); do
        local alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        pids=("${alive[@]}")
        ((${#pids[@]})) && sleep 0.1
    done
    for pid in "${pids[@]}"; do
        say "pid $pid ignored SIGTERM for 35 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "${files[@]}"
    [[ -n $name ]] || return 0
    for ((i = 1; i <= n; i++)); do
        local ns=$name-n$i
        # The host end first: deleting a veth takes its peer with it at once,
        # while a deleted namespace frees its links later, in the kernel's
        # own time (a host end may then vanish between `show` and `delete`).
        ip link show "$name-v$i" >/dev/null 2>&1 && ip link delete "$name-v$i"
        if ip netns list | grep -qw -- "$ns"; then
            # Whatever still runs in the namespace (a killed node's VMs).
            for pid in $(ip netns pids "$ns"); do
                kill -KILL "$pid" 2>/dev/null || true
            done
            for ((t = 0; t < 50; t++)); do
                [[ -z $(ip netns pids "$ns") ]] && break
                sleep 0.1
            done
            ip netns delete "$ns"
        fi
    done
    ip link show "$name-br" >/dev/null 2>&1 && ip link delete "$name-br"
    rm -rf "$dir"
}

cmd_stop() {
    [[ -f $state ]] || { say "no cluster at $dir"; return 0; }
    need_root stop
    load_state
    say "stopping $N nodes, HAProxy and Prometheus of $dir"
    teardown
    say "stopped; namespaces, links and $dir removed"
}

# wait_http URL SECONDS [PID]: until URL answers 200; fails at once if
# PID (the server) has exited.
wait_http() {
    local url=$1 limit=$2 pid=${3:-}
    for ((t = 0; t < limit * 10; t++)); do
        curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
        [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null && return 1
        sleep 0.1
    done
    return 1
}

cmd_start() {
    local n=3 mem=1024 port=8080 sport=8404 pport=9090 every=1s inter=1s
    local name=snapc subnet=10.77.0 cfg="" auth="" bindir=$repo/target/release
    local extra=()
    while (($#)); do
        case $1 in
        --nodes) n=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --config) cfg=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --stats_port) sport=$2; shift 2 ;;
        --prom_port) pport=$2; shift 2 ;;
        --scrape_interval) every=$2; shift 2 ;;
        --check_interval) inter=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --subnet) subnet=$2; shift 2 ;;
        --basic_auth_dir) auth=$(realpath "$2"); shift 2 ;;
        --balance) BALANCE=$2; shift 2 ;;
        --bindir) bindir=$(realpath "$2"); shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) die "start: unknown argument $1" ;;
        esac
    done
    need_root start
    [[ ${BALANCE:=hash} == hash || $BALANCE == roundrobin ]] || die "--balance: hash or roundrobin"
    [[ -n $cfg ]] || die "start needs --config NODE.yaml (a multivm config; see the README)"
    [[ -f $cfg ]] || die "--config $cfg: no such file"
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 200)) || die "--nodes must be 1..200"
    [[ $name =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "--name: 1-8 lower-case letters and digits"
    [[ $subnet =~ ^(10|192\.168|172\.(1[6-9]|2[0-9]|3[01]))\.[0-9]+(\.[0-9]+)?$ ]] &&
        [[ $(tr -cd . <<<"$subnet") == .. ]] || die "--subnet must be the first three numbers of a private /24 (10.77.0)"
    [[ -x $bindir/multivm ]] || die "no multivm in $bindir (cargo build --release, or --bindir)"
    [[ -f $state ]] && die "a cluster is already running at $dir (scripts/cluster.sh stop)"
    [[ -n $(ip -4 route show "$subnet.0/24") ]] && die "$subnet.0/24 is already routed on this host; pick another --subnet"
    ip link show "$name-br" >/dev/null 2>&1 && die "a link $name-br exists already; pick another --name"
    "$repo/scripts/setup.sh" # installs haproxy and prometheus if missing

    mkdir -p "$dir"
    cat >"$state" <<EOF
NAME=$name
N=$n
SUBNET=$subnet
PORT=$port
STATS_PORT=$sport
PROM_PORT=$pport
AUTH_DIR=$auth
EOF
    NAME=$name N=$n
    # From here on a failure undoes everything.
    trap 'rc=$?; if ((rc)); then say "start failed; undoing it"; teardown; fi; exit $rc' EXIT
    trap 'exit 130' INT TERM

    say "network: bridge $name-br $subnet.1/24, $n namespaces $name-n1..n$n"
    ip link add "$name-br" type bridge
    ip addr add "$subnet.1/24" dev "$name-br"
    ip link set "$name-br" up
    local i nodes=()
    for ((i = 1; i <= n; i++)); do
        local ns=$name-n$i addr=$subnet.$((10 + i))
        ip netns add "$ns"
        ip link add "$name-v$i" type veth peer name "$name-p$i"
        ip link set "$name-p$i" netns "$ns"
        ip -n "$ns" link set "$name-p$i" name eth0
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip link set "$name-v$i" master "$name-br"
        ip link set "$name-v$i" up
        nodes+=("n$i=$addr:8080")
    done

    local auth_args=()
    [[ -n $auth ]] && auth_args=(--basic_auth_dir "$auth")
    for ((i = 1; i <= n; i++)); do
        local nd=$dir/n$i addr=$subnet.$((10 + i))
        mkdir -p "$nd/run"
        sed "s/@NODE@/n$i/g" "$cfg" >"$nd/multivm.yaml"
        # nsenter --net, not `ip netns exec`: that also remounts /sys, which
        # hides the cgroup hierarchies the VMs' jails need. setsid: a node
        # outlives this script and is stopped by `stop`.
        nsenter --net="/run/netns/$name-n$i" env XDG_RUNTIME_DIR="$nd/run" RUST_LOG="${RUST_LOG:-info}" \
            setsid "$bindir/multivm" --config "$nd/multivm.yaml" --mem "$mem" \
            --listen "$addr:8080" --cluster "${auth_args[@]}" "${extra[@]}" \
            </dev/null >"$nd/multivm.out" 2>"$nd/multivm.log" &
        echo $! >"$nd/multivm.pid"
    done
    for ((i = 1; i <= n; i++)); do
        if ! wait_http "http://$subnet.$((10 + i)):8080/healthz" 60 "$(cat "$dir/n$i/multivm.pid")"; then
            tail -n 20 "$dir/n$i/multivm.log" >&2 || true
            die "node n$i did not answer /healthz (it exited, or 60 s passed; its log: above)"
        fi
    done
    for ((i = 1; i <= n; i++)); do
        # `stop` signals these pids: make sure they are the nodes themselves.
        [[ $(cat "/proc/$(cat "$dir/n$i/multivm.pid")/comm" 2>/dev/null) == multivm ]] ||
            die "node n$i: $dir/n$i/multivm.pid does not name its multivm"
    done
    say "nodes up: ${nodes[*]}"

    render_haproxy "127.0.0.1:$port" "127.0.0.1:$sport" "$dir" "$inter" "${nodes[@]}" >"$dir/haproxy.cfg"
    haproxy -c -q -f "$dir/haproxy.cfg" >&2 || die "HAProxy refuses $dir/haproxy.cfg (its reasons: above)"
    haproxy -D -p "$dir/haproxy.pid" -f "$dir/haproxy.cfg" || die "HAProxy did not start"
    wait_http "http://127.0.0.1:$sport/stats" 10 || die "HAProxy does not answer on 127.0.0.1:$sport"

    cp "$repo/deploy/snapvm-rules.yml" "$dir/snapvm-rules.yml"
    render_prometheus "$dir/snapvm-rules.yml" "127.0.0.1:$sport" "$every" "${nodes[@]}" >"$dir/prometheus.yml"
    promtool check config "$dir/prometheus.yml" >/dev/null || die "promtool refuses $dir/prometheus.yml"
    setsid prometheus --config.file "$dir/prometheus.yml" --storage.tsdb.path "$dir/prometheus" \
        --web.listen-address "127.0.0.1:$pport" --log.level warn \
        </dev/null >"$dir/prometheus.log" 2>&1 &
    echo $! >"$dir/prometheus.pid"
    if ! wait_http "http://127.0.0.1:$pport/-/ready" 30 "$(cat "$dir/prometheus.pid")"; then
        tail -n 20 "$dir/prometheus.log" >&2 || true
        die "Prometheus did not get ready on 127.0.0.1:$pport (it exited, or 30 s passed; its log: above)"
    fi
    trap - EXIT INT TERM
    say "HAProxy http://127.0.0.1:$port (stats http://127.0.0.1:$sport/stats), Prometheus http://127.0.0.1:$pport"
}

cmd_kill() {
    need_root kill
    load_state
    local node=${1:-}
    [[ $node =~ ^n[0-9]+$ && -f $dir/$node/multivm.pid ]] || die "kill: no node ${node:-?} (n1..n$N)"
    kill -KILL "$(cat "$dir/$node/multivm.pid")"
    # Its VMs end on their own; `stop` clears whatever is left in its namespace.
    rm -f "$dir/$node/multivm.pid"
    say "SIGKILLed the multivm of $node"
}

# --- talking to nodes -----------------------------------------------------

# Sets NODES (NAME=HOST:PORT words) and CURL_AUTH from --nodes/--basic_auth_dir
# or from the local cluster's state.
select_nodes() {
    local list=$1 auth=$2
    if [[ -n $list ]]; then
        mapfile -t NODES < <(nodes_from_list "$list")
    else
        load_state
        NODES=()
        for ((i = 1; i <= N; i++)); do NODES+=("n$i=$SUBNET.$((10 + i)):8080"); done
        auth=${auth:-$AUTH_DIR}
    fi
    CURL_AUTH=()
    if [[ -n $auth ]]; then
        CURL_AUTH=(-u "$(head -n1 "$auth/basic-auth-user"):$(head -n1 "$auth/basic-auth-password")")
    fi
}

cmd_deploy() {
    local list="" auth="" file="" wait=120
    while (($#)); do
        case $1 in
        --nodes) list=$2; shift 2 ;;
        --basic_auth_dir) auth=$2; shift 2 ;;
        --wait) wait=$2; shift 2 ;;
        *) file=$1; shift ;;
        esac
    done
    [[ -n $file ]] || die "deploy needs a FunctionDeployment JSON file (or - for stdin)"
    select_nodes "$list" "$auth"
    local body fn
    body=$(cat -- "$file")
    fn=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["service"])' "$body" 2>/dev/null) ||
        die "deploy: $file is not a FunctionDeployment (JSON with a \"service\")"
    local kv code out
    out=$(mktemp)
    trap 'rm -f "$out"' RETURN
    for kv in "${NODES[@]}"; do
        # faas-cli's sequence: PUT (update); on 404, POST (create).
        code=$(curl -sS -o "$out" -w '%{http_code}' "${CURL_AUTH[@]}" -X PUT \
            -H 'Content-Type: application/json' --data-binary "$body" "http://${kv#*=}/system/functions") ||
            die "deploy: ${kv%%=*} (${kv#*=}) does not answer"
        if [[ $code == 404 ]]; then
            code=$(curl -sS -o "$out" -w '%{http_code}' "${CURL_AUTH[@]}" -X POST \
                -H 'Content-Type: application/json' --data-binary "$body" "http://${kv#*=}/system/functions")
        fi
        [[ $code == 202 ]] || die "deploy: ${kv%%=*} answered $code: $(cat "$out")"
        say "deploy $fn: ${kv%%=*} accepted it"
    done
    # Ready everywhere, or the reason it is not.
    local deadline=$((SECONDS + wait)) pending
    while :; do
        pending=()
        for kv in "${NODES[@]}"; do
            curl -sS -o "$out" "${CURL_AUTH[@]}" "http://${kv#*=}/system/function/$fn" || true
            local st
            st=$(python3 -c 'import json,sys
a=json.load(open(sys.argv[1])).get("annotations") or {}
print(a.get("com.snapvm.state","?"), a.get("com.snapvm.error",""))' "$out" 2>/dev/null || echo "?")
            case $st in
            ready*) ;;
            failed*) die "deploy $fn: failed on ${kv%%=*}: ${st#failed }" ;;
            *) pending+=("${kv%%=*}") ;;
            esac
        done
        ((${#pending[@]} == 0)) && break
        ((SECONDS < deadline)) || die "deploy $fn: not ready within $wait s on ${pending[*]}"
        sleep 0.2
    done
    say "deploy $fn: ready on ${#NODES[@]} nodes"
}

cmd_remove() {
    local list="" auth="" fn=""
    while (($#)); do
        case $1 in
        --nodes) list=$2; shift 2 ;;
        --basic_auth_dir) auth=$2; shift 2 ;;
        *) fn=$1; shift ;;
        esac
    done
    [[ -n $fn ]] || die "remove needs a function name"
    select_nodes "$list" "$auth"
    local kv code
    for kv in "${NODES[@]}"; do
        code=$(curl -sS -o /dev/null -w '%{http_code}' "${CURL_AUTH[@]}" -X DELETE \
            -H 'Content-Type: application/json' --data-binary "{\"functionName\": \"$fn\"}" \
            "http://${kv#*=}/system/functions") || code=000
        say "remove $fn: ${kv%%=*} answered $code"
    done
}

cmd_status() {
    local list="" auth="" sock=""
    while (($#)); do
        case $1 in
        --nodes) list=$2; shift 2 ;;
        --basic_auth_dir) auth=$2; shift 2 ;;
        *) die "status: unknown argument $1" ;;
        esac
    done
    select_nodes "$list" "$auth"
    [[ -z $list ]] && sock=$dir/haproxy.sock
    python3 - "$sock" "${CURL_AUTH[1]:-}" "${NODES[@]}" <<'EOF'
import base64, json, re, socket, sys, urllib.request

sock, cred, nodes = sys.argv[1], sys.argv[2], sys.argv[3:]

def get(url, auth=False):
    req = urllib.request.Request(url)
    if auth and cred:
        req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
    with urllib.request.urlopen(req, timeout=3) as r:
        return r.read().decode()

# HAProxy's view of each node (UP, DOWN, ...), from its stats socket.
seen = {}
if sock:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        s.sendall(b"show stat\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        lines = raw.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("pxname") == "nodes" and row.get("svname") not in ("BACKEND", "FRONTEND"):
                seen[row["svname"]] = row["status"]
    except OSError as e:
        print(f"(HAProxy's stats socket {sock}: {e})")

for kv in nodes:
    name, addr = kv.split("=", 1)
    try:
        metrics = get(f"http://{addr}/metrics")
        fns = json.loads(get(f"http://{addr}/system/functions", auth=True))
    except Exception as e:  # a dead node is a line of the report, not a crash
        print(f"{name} {addr}  haproxy={seen.get(name, '-')}  DOWN: {e}")
        continue
    val = {}
    for line in metrics.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            val[(m[1], m[2] or "")] = float(m[3])
    vms = {}
    for (k, labels), v in val.items():
        if k == "multivm_vms":
            f = re.search(r'function="([^"]*)"', labels)[1]
            st = re.search(r'state="([^"]*)"', labels)[1]
            vms.setdefault(f, {})[st] = int(v)
    used = int(val.get(("multivm_memory_used_mib", ""), 0))
    budget = int(val.get(("multivm_memory_budget_mib", ""), 0))
    total = sum(sum(d.values()) for d in vms.values())
    print(f"{name} {addr}  haproxy={seen.get(name, '-')}  functions={len(fns)}  "
          f"vms={total}  memory={used}/{budget} MiB")
    for f in sorted(fns, key=lambda f: f["name"]):
        ann = f.get("annotations") or {}
        d = vms.get(f["name"], {})
        states = " ".join(f"{k}={v}" for k, v in sorted(d.items()) if v) or "none"
        q = int(val.get(("multivm_queue_depth", f'{{function="{f["name"]}"}}'), 0))
        print(f"    {f['name']:<20} {ann.get('com.snapvm.state', 'ready'):<9} "
              f"invocations={f.get('invocationCount', 0):<7} queued={q:<3} vms: {states}")
EOF
}

sub=${1:-}
(($#)) && shift
case $sub in
start) cmd_start "$@" ;;
stop) cmd_stop ;;
status) cmd_status "$@" ;;
deploy) cmd_deploy "$@" ;;
remove) cmd_remove "$@" ;;
kill) cmd_kill "$@" ;;
config) cmd_config "$@" ;;
*) die "usage: scripts/cluster.sh start|status|deploy|remove|kill|stop|config ... (see the top of the script)" ;;
esac
