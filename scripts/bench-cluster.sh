#!/usr/bin/env bash
# Cluster benchmarks (issue 24), on clusters started by scripts/cluster.sh
# with 20 testguest `echo` functions (one VM each at most:
# concurrency_limit 1), load from scripts/loadgen.rs through HAProxy:
#  1. warm throughput and p50/p99: one node straight, one node behind
#     HAProxy, three nodes behind HAProxy (every VM pre-warmed; budget for
#     all of them on every node). On a 2-core machine the three nodes, their
#     VMs, HAProxy and the load generator share two cores: a functional
#     figure (what HAProxy and the hop cost), not a scaling one.
#  2. cold starts under load: 3 nodes with room for 8 VMs each (24 in all
#     for 20 functions), the same load routed by hashing the function name
#     (deploy/haproxy.cfg) and by round robin: VM launches, evictions,
#     throughput, p99.
# Usage: scripts/bench-cluster.sh [SECONDS_PER_RUN (default 10)] [CLIENTS (default 8)]
# Root and /dev/kvm needed; everything started is stopped on every way out.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
clients=${2:-8}
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}
mkdir -p "$cache"
[[ $(id -u) == 0 ]] || { echo "bench-cluster: needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh
cargo build --release -q --bins
tg=$(scripts/build-testguest.sh 2>/dev/null | tail -1)
loadgen="$cache/multivm-loadgen-$(sha256sum scripts/loadgen.rs | cut -c1-16)"
[[ -x $loadgen ]] || rustc -O --edition 2021 --crate-name loadgen -o "$loadgen" scripts/loadgen.rs

subnet=10.247.25
scratch=$(mktemp -d /tmp/snapvm-bench-cluster.XXXXXX)
export SNAPVM_CLUSTER_DIR=$scratch/cluster
cleanup() {
    [[ -f $SNAPVM_CLUSTER_DIR/cluster.env ]] && scripts/cluster.sh stop 2>/dev/null
    rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s 4096 "$scratch/rootfs.img"
printf 'fn=echo\n' | dd of="$scratch/echo.img" bs=4096 conv=sync status=none
fns=()
{
    echo "kernel_path: $tg"
    echo "vm_overhead: 8"
    echo "boot_timeout: 20s"
    echo "functions:"
    for i in $(seq -w 1 20); do
        printf '  fn-%s:\n    runtimefs: %s\n    appfs: %s\n    memory: 32\n    request_timeout: 20s\n    concurrency_limit: 1\n' \
            "$i" "$scratch/rootfs.img" "$scratch/echo.img"
        fns+=("fn-$i")
    done
} >"$scratch/node.yaml"
paths=$(printf '/function/%s,' "${fns[@]}")
paths=${paths%,}
read -r port sport pport < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')

start() { # NODES MEM_MIB BALANCE
    scripts/cluster.sh start --config "$scratch/node.yaml" --nodes "$1" --mem "$2" --balance "$3" \
        --name snapb --subnet "$subnet" --port "$port" --stats_port "$sport" --prom_port "$pport" 2>/dev/null
}
# sum of a metric over the nodes
node_sum() { # NODES METRIC_PREFIX
    local total=0 i
    for ((i = 1; i <= $1; i++)); do
        total=$(curl -fsS "http://$subnet.$((10 + i)):8080/metrics" |
            awk -v m="$2" -v t="$total" 'index($0, m) == 1 { t += $NF } END { print t }')
    done
    echo "$total"
}
per_node_fns() { # NODES: how many functions have VMs on each node
    local i out=""
    for ((i = 1; i <= $1; i++)); do
        out+="n$i=$(curl -fsS "http://$subnet.$((10 + i)):8080/metrics" |
            awk '/^multivm_vms\{/ && $NF > 0 { split($0, a, "\""); f[a[2]] = 1 } END { print length(f) }') "
    done
    echo "${out% }"
}
row() { # LABEL JSON
    python3 -c 'import json, sys
r = json.loads(sys.argv[2])
print("%-34s %8.0f req/s  p50 %6.2f ms  p99 %7.2f ms  errors %d"
      % (sys.argv[1], r["rps"], r["p50_us"] / 1000, r["p99_us"] / 1000, r["errors"]))' "$1" "$2"
}

echo "== warm: 20 echo functions, $clients clients, $secs s per run"
for n in 1 3; do
    start "$n" 1024 hash
    for f in "${fns[@]}"; do curl -fsS -o /dev/null -X POST -d '{}' "http://127.0.0.1:$port/function/$f"; done
    if ((n == 1)); then
        row "1 node, straight (no HAProxy)" "$("$loadgen" "$subnet.11:8080" "$paths" '{}' "$clients" "$secs")"
    fi
    row "$n node(s) behind HAProxy" "$("$loadgen" "127.0.0.1:$port" "$paths" '{}' "$clients" "$secs")"
    echo "   VMs per node: $(per_node_fns "$n")"
    scripts/cluster.sh stop 2>/dev/null
done

echo "== cold starts: 3 nodes x 8 VMs of room, 20 functions, $clients clients, $secs s per run"
for balance in hash roundrobin; do
    start 3 320 "$balance"
    r=$("$loadgen" "127.0.0.1:$port" "$paths" '{}' "$clients" "$secs")
    cold=$(node_sum 3 multivm_cold_starts_total)
    evict=$(node_sum 3 multivm_evictions_total)
    row "balance $balance" "$r"
    echo "   cold starts $cold, evictions $evict, functions with VMs per node: $(per_node_fns 3)"
    scripts/cluster.sh stop 2>/dev/null
done
