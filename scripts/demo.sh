#!/usr/bin/env bash
# The main job: build everything, then answer a request with a function
# running in its own KVM microVM (testguest's `hello`, via singlevm).
# Built images go to the cache dir ($SNAPVM_CACHE, default ~/.cache/snapvm).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "demo: building snapvm (cargo build --release)" >&2
cargo build --release -q
echo "demo: building testguest" >&2
kernel=$(scripts/build-testguest.sh | tail -1)

cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}/demo
mkdir -p "$cache"
# testguest reads any root image; a small one with a label will do.
if [[ ! -s $cache/rootfs.img ]]; then
    printf 'snapvm demo root image\n' | dd of="$cache/rootfs.img.tmp" bs=1M count=1 conv=sync status=none
    mv "$cache/rootfs.img.tmp" "$cache/rootfs.img"
fi
appfs/mk_testguest_app.sh "$cache/hello.img" fn=hello

request=${1:-'{"name": "snapvm"}'}
echo "demo: request  $request" >&2
printf '%s\n' "$request" | RUST_LOG=${RUST_LOG:-info} target/release/singlevm \
    --kernel "$kernel" --rootfs "$cache/rootfs.img" --appfs "$cache/hello.img"
