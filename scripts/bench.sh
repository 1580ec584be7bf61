#!/usr/bin/env bash
# The benchmarks of the README's Performance section, in one command:
# installs what they need (scripts/setup.sh --bench: QEMU, matplotlib), builds the
# release binaries, testguest and the load generator, then runs
# scripts/bench.py: snapvm vs QEMU microvm on the same testguest ELF (boot,
# memory overhead, snapshot create/restore), snapvm's cold-start ladder,
# multivm warm throughput, the OpenFaaS invocation path against the JSON
# path and deploy -> first answer (provider), VM density, and what the
# seccomp filters cost
# (isolation: first responses with and without). Writes bench/results.json and
# bench/*.png. About 4 minutes on 2 cores once built (half of it density).
# Usage: scripts/bench.sh [--iterations N] [--only boot,snapshot,...]
# Honours CARGO_TARGET_DIR, and SNAPVM_CACHE (where the load generator goes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --bench
cargo build --release -q --bins
bin=$(realpath "${CARGO_TARGET_DIR:-target}")/release
tg=$(scripts/build-testguest.sh | tail -1)
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}
mkdir -p "$cache"
loadgen="$cache/multivm-loadgen-$(sha256sum scripts/loadgen.rs | cut -c1-16)"
[[ -x $loadgen ]] || rustc -O --edition 2021 --crate-name loadgen -o "$loadgen" scripts/loadgen.rs
# Debian's python3, for which setup.sh installed python3-matplotlib (another
# python3 may come first on PATH).
exec /usr/bin/python3 scripts/bench.py --bindir "$bin" --testguest "$tg" --loadgen "$loadgen" --out bench "$@"
