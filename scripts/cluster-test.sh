#!/usr/bin/env bash
# The cluster tests (issue 24): a 3-node snapvm cluster started by
# scripts/cluster.sh (multivm nodes with testguest functions, each in its
# own network namespace; Debian's HAProxy and Prometheus on loopback),
# exercised by tests/cluster/cluster_test.py: every function answers
# through HAProxy and stays warm on one node, a deploy reaches every node,
# a node at its memory budget offloads and nothing runs twice, Prometheus's
# sums equal what the client sent, and a node killed with -9 mid-load fails
# only the requests in flight on it. Everything started is stopped and
# removed at the end, also on failure, and the script checks that nothing
# is left (processes, namespaces, links, files). About a minute; root and
# /dev/kvm needed. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

[[ $(id -u) == 0 ]] || { echo "cluster-test: needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh
cargo build --release -q --bins
tg=$(scripts/build-testguest.sh | tail -1)

name=snapt
subnet=10.247.24
check_interval=1
scratch=$(mktemp -d /tmp/snapvm-cluster-test.XXXXXX)
export SNAPVM_CLUSTER_DIR=$scratch/cluster
t_start=$SECONDS

finish() {
    local rc=$? left=()
    trap - EXIT INT TERM
    if [[ -f $SNAPVM_CLUSTER_DIR/cluster.env ]]; then
        ((rc)) && { echo "cluster-test: node logs (last lines):" >&2; tail -n 5 "$SNAPVM_CLUSTER_DIR"/n*/multivm.log >&2 || true; }
        scripts/cluster.sh stop || rc=1
    fi
    # Nothing may be left behind.
    ip netns list | grep -q "^$name-" && left+=("namespaces: $(ip netns list | grep "^$name-" | tr '\n' ' ')")
    ip -o link show | grep -q " $name-" && left+=("links: $(ip -o link show | grep " $name-" | cut -d: -f2 | tr '\n' ' ')")
    pgrep -f "$scratch" >/dev/null && left+=("processes: $(pgrep -f "$scratch" | tr '\n' ' ')")
    [[ -e $SNAPVM_CLUSTER_DIR ]] && left+=("directory $SNAPVM_CLUSTER_DIR")
    if ((${#left[@]})); then
        echo "cluster-test: FAIL: left behind: ${left[*]}" >&2
        rc=1
    fi
    rm -rf "$scratch"
    echo "cluster-test: $( ((rc)) && echo FAILED || echo passed) in $((SECONDS - t_start)) s" >&2
    exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

# testguest functions: six `hello`s and three `sleep`s (nap-a refuses
# rather than queues: max_queue 0), and an image to deploy at run time.
mkdir -p "$scratch/apps"
truncate -s 4096 "$scratch/rootfs.img"
img() { printf 'fn=%s\n' "$1" | dd of="$2" bs=4096 conv=sync status=none; }
img hello "$scratch/hello.img"
img sleep "$scratch/sleep.img"
img hello "$scratch/apps/hello-deployed.img"
{
    echo "kernel_path: $tg"
    echo "vm_overhead: 8"
    echo "boot_timeout: 20s"
    echo "functions:"
    for f in a b c d e f; do
        printf '  hello-%s:\n    runtimefs: %s\n    appfs: %s\n    memory: 32\n' "$f" "$scratch/rootfs.img" "$scratch/hello.img"
    done
    for f in a b c; do
        printf '  nap-%s:\n    runtimefs: %s\n    appfs: %s\n    memory: 32\n    request_timeout: 10s\n' "$f" "$scratch/rootfs.img" "$scratch/sleep.img"
        [[ $f == a ]] && echo "    max_queue: 0"
    done
    echo "deploy:"
    echo "  state_dir: $scratch/state-@NODE@"
    echo "  image_dir: $scratch/apps"
    echo "  runtimes:"
    echo "    testguest:"
    printf '      runtimefs: %s\n      memory: 32\n' "$scratch/rootfs.img"
} >"$scratch/node.yaml"
cat >"$scratch/deploy.json" <<'EOF'
{"service": "hello-deployed", "image": "hello-deployed.img",
 "labels": {"com.snapvm.runtime": "testguest"}}
EOF

# Three free loopback ports (HAProxy, its stats, Prometheus).
read -r port sport pport < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')

# 160 MiB per node: four testguest VMs (32 MiB + 8 overhead).
scripts/cluster.sh start --config "$scratch/node.yaml" --nodes 3 --mem 160 \
    --name "$name" --subnet "$subnet" --port "$port" --stats_port "$sport" --prom_port "$pport" \
    --scrape_interval 1s --check_interval "${check_interval}s"
python3 tests/cluster/cluster_test.py --script "$repo/scripts/cluster.sh" \
    --port "$port" --prom_port "$pport" --haproxy_sock "$SNAPVM_CLUSTER_DIR/haproxy.sock" \
    --nodes "n1=$subnet.11:8080,n2=$subnet.12:8080,n3=$subnet.13:8080" \
    --check_interval "$check_interval" --deploy "$scratch/deploy.json"
