#!/usr/bin/env bash
# Runs snapvm's cargo-fuzz targets (fuzz/, see fuzz/README.md) for a while
# each, starting from the committed seed corpora, and fails on any crash,
# hang (an input running > 10 s), out-of-memory or sanitizer report.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 60, or $FUZZ_SECONDS); all targets unless
# some are named. Environment:
#   FUZZ_JOBS        targets fuzzed at once (default: number of cores, at most 2)
#   FUZZ_SANITIZER   address (default) or none
#   FUZZ_TARGET_DIR  cargo target dir (default: the snapvm cache dir, so a
#                    second run only rebuilds snapvm itself)
#   SNAPVM_CACHE     the snapvm cache dir (default ~/.cache/snapvm)
#
# Works on a stable toolchain: cargo-fuzz passes rustc flags that are
# unstable (-Zsanitizer=address, and -Cpasses=sancov-module on some
# versions), so this script sets RUSTC_BOOTSTRAP=1 for its own builds. It
# installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when missing.
# If fuzzing cannot run at all it fails loudly; it never skips.
#
# New inputs found during a run go to a temporary directory, never into
# fuzz/corpus/; a crashing input is kept under fuzz/artifacts/<target>/.
# The last lines of stdout are a summary: executions and corpus size per
# target.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

all_targets=(block_chain net_chains vsock_packets mmio_registers snapshot_state deployment)
seconds="${FUZZ_SECONDS:-60}"
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    seconds="$1"
    shift
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
    if [[ ! -f "fuzz/fuzz_targets/$t.rs" ]]; then
        echo "fuzz: error: unknown target $t (have: ${all_targets[*]})" >&2
        exit 2
    fi
done
cores="$(nproc 2>/dev/null || echo 1)"
jobs="${FUZZ_JOBS:-$((cores < 2 ? cores : 2))}"
sanitizer="${FUZZ_SANITIZER:-address}"
cache="${SNAPVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/snapvm}"
target_dir="${FUZZ_TARGET_DIR:-$cache/fuzz-target}"

fail() {
    echo "fuzz: error: $*" >&2
    echo "fuzz: FAILED: fuzzing could not run (see above); this is an error, not a skip" >&2
    exit 1
}

# Flags meant for the main workspace must not leak into the fuzz build.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR || true
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing; installing it (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked </dev/null >&2 || fail "cannot install cargo-fuzz"
    cargo fuzz --version >/dev/null 2>&1 || fail "cargo-fuzz installed but 'cargo fuzz' does not run"
fi

build_flags=(-O -a -s "$sanitizer" --target-dir "$target_dir")
start=$SECONDS
echo "fuzz: building ${targets[*]} ($(cargo fuzz --version), sanitizer $sanitizer, target dir $target_dir)" >&2
if [[ ${#targets[@]} -eq ${#all_targets[@]} ]]; then
    # One cargo run builds and links every target in parallel.
    cargo fuzz build "${build_flags[@]}" </dev/null >&2 || fail "building the fuzz targets failed"
else
    for t in "${targets[@]}"; do
        cargo fuzz build "${build_flags[@]}" "$t" </dev/null >&2 || fail "building fuzz target $t failed"
    done
fi
bin_dir="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release"
for t in "${targets[@]}"; do
    [[ -x "$bin_dir/$t" ]] || fail "cargo fuzz build did not produce $bin_dir/$t"
done
echo "fuzz: built in $((SECONDS - start)) s; fuzzing each target for $seconds s, $jobs at a time" >&2

work="$(mktemp -d "${TMPDIR:-/tmp}/snapvm-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

run_target() {
    local t="$1"
    mkdir -p "$work/$t/corpus" "$work/$t/tmp" "fuzz/artifacts/$t"
    # The binary itself (as `cargo fuzz run` would, minus its rebuild
    # check). TMPDIR: the targets' scratch files (disk images, sockets).
    TMPDIR="$work/$t/tmp" ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" \
        "$bin_dir/$t" "$work/$t/corpus" "fuzz/corpus/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -close_fd_mask=1 \
        -artifact_prefix="fuzz/artifacts/$t/" \
        </dev/null >"$work/$t.log" 2>&1
    echo $? >"$work/$t.rc"
}

pending=("${targets[@]}")
while [[ ${#pending[@]} -gt 0 ]]; do
    batch=("${pending[@]:0:$jobs}")
    pending=("${pending[@]:$jobs}")
    for t in "${batch[@]}"; do
        run_target "$t" &
    done
    wait
done

status=0
summary=()
for t in "${targets[@]}"; do
    rc="$(cat "$work/$t.rc" 2>/dev/null || echo 1)"
    log="$work/$t.log"
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    seeds="$(find "fuzz/corpus/$t" -type f | wc -l)"
    found="$(find "$work/$t/corpus" -type f | wc -l)"
    if [[ "$rc" != 0 || -z "$execs" ]]; then
        status=1
        echo "fuzz: $t FAILED (exit $rc); the end of its log:" >&2
        tail -n 60 "$log" >&2 || true
        crash="$(ls -t "fuzz/artifacts/$t" 2>/dev/null | head -1)"
        if [[ -n "$crash" ]]; then
            echo "fuzz: $t: reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a -s $sanitizer $t fuzz/artifacts/$t/$crash" >&2
        fi
        summary+=("$t: FAILED (exit $rc) after ${execs:-0} executions")
    else
        summary+=("$t: ok, $execs executions ($rate/s), corpus $seeds seeds + $found new inputs")
    fi
done
echo "fuzz: ${seconds} s per target, $((SECONDS - start)) s in all"
printf 'fuzz: %s\n' "${summary[@]}"
exit $status
