#!/usr/bin/env bash
# A Linux guest's network against the host-only floor: fetch-python3
# (restored with --net: virtio-net, the TAP, NAT in the VM's namespace and
# in the host's, src/network.rs) fetching from an HTTP server in an
# "upstream" namespace joined to the host by a veth pair, beside busybox
# wget fetching the same URLs from the host itself over that veth pair, in
# the same run, interleaved:
#   bulk    a 32 MiB body: MB/s
#   small   a 19-byte body (a new TCP connection each time): ms per fetch
# The guest's side is timed from the request line written to singlevm to
# its answer read back (the agent's round trip adds well under a
# millisecond); RUNS rounds (default 5).
#
#   scripts/linux-test.sh --bench-net [RUNS]   (stages everything and runs
#                                              this inside the emulated KVM host)
#
# Inside the emulated KVM host guest execution is emulated: the ratios say
# what the path costs there, not on a hardware host.
set -euo pipefail
runs=${1:-5}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench-net-linux: RUNS must be a positive number" >&2; exit 2; }
payload=$(pwd)
bin=$payload/target/release
tree=/tmp/bench-snapshots
fn=fetch-python3
say() { printf 'bench-net-linux [%4ds] %s\n' "$SECONDS" "$*" >&2; }

say "snapshots of $fn (scripts/mk-snapshots.sh)"
CARGO_TARGET_DIR=$payload/target SNAPVM_CACHE=/tmp/cache \
    "$payload/repo/scripts/mk-snapshots.sh" --no-build --kernel "$payload/vmlinux" \
    --images "$payload/images" --out "$tree" --timeout 300 "$fn" >/dev/null

say "upstream: namespace snapvm-upstream, busybox httpd on 10.99.0.2:8080"
www=/tmp/bench-www
mkdir -p "$www"
head -c $((32 << 20)) /dev/urandom >"$www/bulk"
printf 'hello from upstream' >"$www/small"
ip netns add snapvm-upstream
ip link add up0 type veth peer name eth0 netns snapvm-upstream
ip addr add 10.99.0.1/24 dev up0
ip link set up0 up
ip -n snapvm-upstream addr add 10.99.0.2/24 dev eth0
ip -n snapvm-upstream link set eth0 up
ip -n snapvm-upstream link set lo up
ip netns exec snapvm-upstream busybox httpd -f -p 10.99.0.2:8080 -h "$www" &
httpd=$!
cleanup() {
    kill "$httpd" 2>/dev/null || true
    ip link del up0 2>/dev/null || true
    ip netns del snapvm-upstream 2>/dev/null || true
}
trap cleanup EXIT
sleep 1

coproc SV {
    exec "$bin/singlevm" --net --kernel "$tree/vmlinux" --rootfs "$tree/images/python3.ext4" \
        --appfs "$tree/images/$fn.ext2" --load_dir "$tree/python3@net,$tree/diff/$fn" --load_ws \
        --boot_timeout 300 2>/tmp/bench-net-linux.err
}
now() { date +%s%N; }
# guest URL: one fetch by the function; sets g_ns.
guest() {
    local t0 line
    t0=$(now)
    printf '{"url": "http://10.99.0.2:8080/%s", "timeout": 60}\n' "$1" >&"${SV[1]}"
    read -r line <&"${SV[0]}" || { cat /tmp/bench-net-linux.err >&2; exit 1; }
    g_ns=$(($(now) - t0))
    [[ $line == *'"ok": true'* || $line == *'"ok":true'* ]] || { say "the guest's fetch failed: $line"; exit 1; }
}
# host URL: the same fetch by busybox wget in this namespace; sets h_ns.
host() {
    local t0
    t0=$(now)
    busybox wget -q -O /dev/null "http://10.99.0.2:8080/$1"
    h_ns=$(($(now) - t0))
}
guest small # the restore and the first connection are not measured
declare -A samples
for ((r = 1; r <= runs; r++)); do
    for what in bulk small; do
        for side in guest host; do
            ((r % 2)) || side=$([[ $side == guest ]] && echo host || echo guest)
            "$side" "$what"
            ns=$([[ $side == guest ]] && echo "$g_ns" || echo "$h_ns")
            if [[ $what == bulk ]]; then
                v=$(awk -v ns="$ns" 'BEGIN { printf "%.2f", (32 * 1048576 / 1e6) / (ns / 1e9) }')
            else
                v=$(awk -v ns="$ns" 'BEGIN { printf "%.2f", ns / 1e6 }')
            fi
            samples[$what.$side]+=" $v"
            echo "sample round=$r what=$what side=$side value=$v"
        done
    done
done
exec {SV[1]}>&-
wait "$SV_PID" || true

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%g (%g-%g)", m, v[1], v[NR] }'; }
echo
echo "fetches from the upstream namespace; median (min-max) of $runs"
printf '%-8s %-26s %-26s %s\n' what guest "host (veth floor)" unit
printf '%-8s %-26s %-26s %s\n' bulk "$(median <<<"${samples[bulk.guest]}")" "$(median <<<"${samples[bulk.host]}")" "MB/s"
printf '%-8s %-26s %-26s %s\n' small "$(median <<<"${samples[small.guest]}")" "$(median <<<"${samples[small.host]}")" "ms per fetch"
