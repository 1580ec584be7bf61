#!/usr/bin/env bash
# What a pooled VM shell saves a Linux function's cold start where a KVM
# runs Linux guests: multivm request -> first response of hello-python3
# (the python3 language snapshot with the function's diff on top, 128 MiB),
# its VM stopped by its idle_timeout before every request, from four
# daemons of the same budget:
#   restore   a fresh firerunner restores the snapshots
#   shell     a ready shell of the daemon's pool (`shells:`, count 1)
#             restores them
# each lazily (MAP_PRIVATE) and with the recorded working set (--load_ws).
# Before every request no daemon has a VM left and every pool is full, so
# no VM teardown or shell start competes with it.
# RUNS rounds (default 5), interleaved; every answer is checked, and so is
# the X-Start header saying how the VM started. Prints every sample, then
# median, min and max per cell and the shell/restore ratios.
#
#   scripts/linux-test.sh --bench-shells [RUNS]   (stages everything and
#                                                 runs this inside the
#                                                 emulated KVM host)
#
# Runs from a payload as linux-test.sh stages it; uses busybox wget
# (bounded by coreutils' timeout: busybox 1.35's wget -T crashes). Inside
# the emulated KVM host everything, the VMM's work and the guest's, runs
# under TCG and the samples are noisy: read the ratios, over several runs.
set -euo pipefail
runs=${1:-5}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench-shells-linux: RUNS must be a positive number" >&2; exit 2; }
payload=$(pwd)
bin=$payload/target/release
tree=/tmp/bench-snapshots
work=/tmp/bench-shells
fn=hello-python3
mem=128
say() { printf 'bench-shells-linux [%4ds] %s\n' "$SECONDS" "$*" >&2; }

say "snapshots of $fn (scripts/mk-snapshots.sh)"
CARGO_TARGET_DIR=$payload/target SNAPVM_CACHE=/tmp/cache \
    "$payload/repo/scripts/mk-snapshots.sh" --no-build --kernel "$payload/vmlinux" \
    --images "$payload/images" --out "$tree" --timeout 300 "$fn" >/dev/null
request=$(head -n1 "$payload/repo/resources/requests/$fn.json")
who=$(sed -n 's/^{"name": *"\([a-z0-9]*\)"}$/\1/p' <<<"$request")
[[ -n $who ]] || { say "unexpected fixture request: $request"; exit 1; }

rm -rf "$work"
mkdir -p "$work"
declare -A addr pid
pids=()
cleanup() {
    local p t
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        t=0
        while kill -0 "$p" 2>/dev/null && ((t++ < 300)); do sleep 0.1; done
        kill -0 "$p" 2>/dev/null && { say "multivm $p ignored SIGTERM for 30 s: SIGKILL"; kill -KILL "$p"; }
        wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

# daemon NAME LOAD_WS SHELLS: starts multivm; sets addr[NAME].
daemon() {
    local name=$1 ws=$2 shells=$3 cfg=$work/$1.yaml
    {
        echo "kernel_path: $tree/vmlinux"
        echo "boot_timeout: 300s"
        echo "vm_overhead: 8"
        ((shells)) && printf 'shells:\n  - memory: %s\n    count: %s\n' "$mem" "$shells"
        echo "functions:"
        echo "  $fn:"
        echo "    runtimefs: $tree/images/python3.ext4"
        echo "    appfs: $tree/images/$fn.ext2"
        echo "    load_dir: $tree/python3,$tree/diff/$fn"
        echo "    load_ws: $ws"
        echo "    memory: $mem"
        echo "    idle_timeout: 100ms"
        echo "    request_timeout: 300s"
    } >"$cfg"
    mkdir -p "$work/$name.run"
    XDG_RUNTIME_DIR=$work/$name.run RUST_LOG=warn "$bin/multivm" --config "$cfg" \
        --mem $(((mem + 8) * 2)) --listen 127.0.0.1:0 >"$work/$name.out" 2>"$work/$name.log" &
    pid[$name]=$!
    pids+=($!)
    local line
    for ((t = 0; t < 600; t++)); do
        line=$(head -n1 "$work/$name.out" 2>/dev/null || true)
        [[ $line == "listening on http://"* ]] && break
        kill -0 "${pid[$name]}" 2>/dev/null || { say "multivm $name died:"; cat "$work/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ $line == "listening on http://"* ]] || { say "multivm $name did not start"; exit 1; }
    addr[$name]=${line#listening on http://}
}

metric() { # NAME PATTERN -> the sum of the matching samples
    timeout 60 busybox wget -q -O - "http://${addr[$1]}/metrics" |
        awk -v p="$2" 'index($0, p) == 1 { s += $NF } END { print s + 0 }'
}

# wait_for NAME PATTERN VALUE: until the metric equals VALUE (60 s at most).
wait_for() {
    for ((t = 0; t < 1200; t++)); do
        [[ $(metric "$1" "$2") == "$3" ]] && return 0
        sleep 0.05
    done
    say "$1: $2 never became $3"
    tail -n 20 "$work/$1.log" >&2
    exit 1
}

modes=(restore-lazy shell-lazy restore-ws shell-ws)
for m in "${modes[@]}"; do
    ws=false shells=0
    [[ $m == *-ws ]] && ws=true
    [[ $m == shell-* ]] && shells=1
    daemon "$m" "$ws" "$shells"
done
say "4 daemons up: ${modes[*]}"

# sample MODE: one cold request; sets s_ms.
sample() {
    local m=$1 start body kind
    # No VM is stopping and no shell is being started during any sample.
    local d
    for d in "${modes[@]}"; do wait_for "$d" "multivm_vms{function=\"$fn\",state=\"idle\"}" 0; done
    for d in shell-lazy shell-ws; do wait_for "$d" "multivm_shells_ready{memory_mib=\"$mem\"" 1; done
    start=$(date +%s%N)
    body=$(timeout 300 busybox wget -S -O - --header 'Content-Type: application/json' \
        --post-data "$request" "http://${addr[$m]}/function/$fn" 2>"$work/headers") || true
    s_ms=$((($(date +%s%N) - start) / 1000000))
    kind=$(sed -n 's/^ *X-Start: *\([a-z-]*\).*/\1/Ip' "$work/headers" | tr -d '\r')
    [[ $body =~ ^\{\"message\":\ *\"hello,\ $who\"\}$ ]] || { say "$m answered: $body"; cat "$work/headers" >&2; exit 1; }
    local expect=cold-restore
    [[ $m == shell-* ]] && expect=cold-shell
    [[ $kind == "$expect" ]] || { say "$m started as '$kind', not $expect:"; tail -n 20 "$work/$m.log" >&2; exit 1; }
}

# The first round warms the page cache and is not counted.
declare -A ms
for ((r = 0; r <= runs; r++)); do
    for ((k = 0; k < ${#modes[@]}; k++)); do
        m=${modes[(k + r) % ${#modes[@]}]}
        sample "$m"
        ((r)) || continue
        ms[$m]+=" $s_ms"
        echo "sample round=$r mode=$m ms=$s_ms"
    done
done

median() { # -> median min max of the words read
    tr ' ' '\n' | grep . | sort -n |
        awk '{ v[NR] = $1 } END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'
}
echo "hello-python3 multivm cold request -> first response, ms (median min max), $runs rounds:"
declare -A med
for m in "${modes[@]}"; do
    read -r md lo hi < <(median <<<"${ms[$m]}")
    med[$m]=$md
    printf '  %-13s %6s %6s %6s\n' "$m" "$md" "$lo" "$hi"
done
for w in lazy ws; do
    awk -v s="${med[shell-$w]}" -v r="${med[restore-$w]}" -v w="$w" \
        'BEGIN { printf "  %s: shell/restore x%.2f (%d ms saved)\n", w, s / r, r - s }'
done
