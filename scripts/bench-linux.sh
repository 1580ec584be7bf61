#!/usr/bin/env bash
# Cold starts of real Linux functions: for the python3 and nodejs hello and
# thumbnail-python3 (Pillow: the heaviest example), exec of singlevm → first
# response and firerunner's page faults (minor + major) at that moment, for
#   boot       the kernel booted, the runtime and the app loaded
#   lazy       the language + diff snapshots restored (MAP_PRIVATE, lazy)
#   ws         the same with the recorded working set (--load_ws)
# RUNS rounds (default 5), interleaved (every function and mode once per
# round); prints every sample and then median, min and max per cell.
#
#   scripts/linux-test.sh --bench [RUNS]   (stages everything and runs this
#                                          inside the emulated KVM host)
#
# Runs where a KVM runs Linux guests, from a payload as linux-test.sh stages
# it (the snapshot tree is made first with scripts/mk-snapshots.sh). Inside
# the emulated KVM host guest execution is emulated, which slows a boot far
# more than a restore: the ratios there do not transfer to hardware hosts.
set -euo pipefail
runs=${1:-5}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench-linux: RUNS must be a positive number" >&2; exit 2; }
payload=$(pwd)
bin=$payload/target/release
tree=/tmp/bench-snapshots
functions=(hello-python3 hello-nodejs thumbnail-python3)
modes=(boot lazy ws)
kernel_args="console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro rootfstype=ext4"
say() { printf 'bench-linux [%4ds] %s\n' "$SECONDS" "$*" >&2; }

say "snapshots of ${functions[*]} (scripts/mk-snapshots.sh)"
CARGO_TARGET_DIR=$payload/target SNAPVM_CACHE=/tmp/cache \
    "$payload/repo/scripts/mk-snapshots.sh" --no-build --kernel "$payload/vmlinux" \
    --images "$payload/images" --out "$tree" --timeout 300 "${functions[@]}" >/dev/null

language() {
    case $1 in
    thumbnail-python3) echo python3+python3-pil ;;
    *-nodejs) echo nodejs ;;
    *) echo python3 ;;
    esac
}

# sample FUNCTION MODE: one cold start; sets s_ms and s_faults.
sample() {
    local fn=$1 mode=$2 lang start line ms pid faults
    lang=$(language "$fn")
    local args=(--kernel "$tree/vmlinux" --rootfs "$tree/images/$lang.ext4"
        --appfs "$tree/images/$fn.ext2" --boot_timeout 300)
    case $mode in
    boot) args+=(--kernel_args "$kernel_args") ;;
    lazy) args+=(--load_dir "$tree/$lang,$tree/diff/$fn") ;;
    ws) args+=(--load_dir "$tree/$lang,$tree/diff/$fn" --load_ws) ;;
    esac
    start=$(date +%s%N)
    coproc SV { exec "$bin/singlevm" "${args[@]}" 2>/tmp/bench-linux.err; }
    head -n1 "$payload/repo/resources/requests/$fn.json" >&"${SV[1]}"
    if ! read -r line <&"${SV[0]}"; then
        say "$fn $mode: no response"; cat /tmp/bench-linux.err >&2; exit 1
    fi
    ms=$((($(date +%s%N) - start) / 1000000))
    # firerunner is singlevm's child, jailed or not.
    pid=$(cat /proc/"$SV_PID"/task/*/children | tr ' ' '\n' | grep . | head -n1)
    # /proc/PID/stat: minflt is field 10, majflt field 12.
    faults=$(awk '{ print $10 + $12 }' "/proc/$pid/stat")
    [[ $line != *'"error"'* ]] || { say "$fn $mode answered an error: $line"; exit 1; }
    exec {SV[1]}>&-
    wait "$SV_PID" || true
    s_ms=$ms s_faults=$faults
}

declare -A ms faults
for ((r = 1; r <= runs; r++)); do
    for fn in "${functions[@]}"; do
        for mode in "${modes[@]}"; do
            sample "$fn" "$mode"
            ms[$fn.$mode]+=" $s_ms"
            faults[$fn.$mode]+=" $s_faults"
            echo "sample round=$r function=$fn mode=$mode ms=$s_ms faults=$s_faults"
        done
    done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%g (%g-%g)", m, v[1], v[NR] }'; }
echo
echo "exec -> first response, ms, and page faults at that moment; median (min-max) of $runs"
printf '%-18s %-7s %-22s %s\n' function mode ms faults
for fn in "${functions[@]}"; do
    for mode in "${modes[@]}"; do
        printf '%-18s %-7s %-22s %s\n' "$fn" "$mode" "$(median <<<"${ms[$fn.$mode]}")" \
            "$(median <<<"${faults[$fn.$mode]}")"
    done
done
