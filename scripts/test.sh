#!/usr/bin/env bash
# The test command of the README (and of CI): set-up, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== cargo fmt --check" >&2
cargo fmt --check
echo "== cargo clippy" >&2
cargo clippy --all-targets --release -- -D warnings
echo "== testguest" >&2
scripts/build-testguest.sh >/dev/null
echo "== cargo test" >&2
cargo test --release -- --test-threads=2
echo "== a 3-node cluster behind HAProxy, watched by Prometheus (about 20 s)" >&2
scripts/cluster-test.sh
echo "== multivm's HTTP API against docs/openapi.yaml (schemathesis, 90 s)" >&2
scripts/api-fuzz.sh
echo "== fuzz targets, 60 s each (fails on any crash)" >&2
scripts/fuzz.sh 60
echo "== rootfs images and guest agents" >&2
scripts/rootfs-test.sh --images
echo "== example functions and app images" >&2
scripts/appfs-test.sh --images
echo "== Linux guests end to end, inside the emulated KVM host" >&2
scripts/linux-test.sh
