#!/usr/bin/env bash
# The main job: build everything, then answer a request with a function
# running in its own KVM microVM, via singlevm.
#
#   scripts/demo.sh [REQUEST]             testguest's `hello` (every KVM host)
#   scripts/demo.sh --python3 [REQUEST]   the python3 `hello` on Linux
#                                         (hosts with VT-x/AMD-V)
#
# The python3 path builds the guest kernel (scripts/build-kernel.sh, tens of
# minutes the first time), the python3 root image (rootfs/mk_rtimage.sh) and
# the hello-python3 app image (appfs/mkappfs). On a host whose KVM cannot
# run a Linux guest to userspace, the guest never connects and singlevm
# ends with a clear error after --boot_timeout.
# Built images go to the cache dir ($SNAPVM_CACHE, default ~/.cache/snapvm).
set -euo pipefail
cd "$(dirname "$0")/.."

python3=0
if [[ ${1:-} == --python3 ]]; then
    python3=1
    shift
fi
request=${1:-'{"name": "snapvm"}'}

scripts/setup.sh
echo "demo: building snapvm (cargo build --release)" >&2
cargo build --release -q
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}/demo
mkdir -p "$cache"

if ((python3)); then
    echo "demo: building the guest kernel, the python3 root image and hello-python3 (cached)" >&2
    kernel=$(scripts/build-kernel.sh | tail -n1)
    rootfs=$(rootfs/mk_rtimage.sh python3 | tail -n1)
    appfs/mkappfs appfs/hello-python3 "$cache/hello-python3.ext2" >/dev/null
    vm=(--kernel "$kernel" --rootfs "$rootfs" --appfs "$cache/hello-python3.ext2"
        --kernel_args "console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro rootfstype=ext4"
        --console "$cache/python3-console.log" --boot_timeout 120)
else
    echo "demo: building testguest" >&2
    kernel=$(scripts/build-testguest.sh | tail -1)
    # testguest reads any root image; a small one with a label will do.
    if [[ ! -s $cache/rootfs.img ]]; then
        printf 'snapvm demo root image\n' | dd of="$cache/rootfs.img.tmp" bs=1M count=1 conv=sync status=none
        mv "$cache/rootfs.img.tmp" "$cache/rootfs.img"
    fi
    appfs/mk_testguest_app.sh "$cache/hello.img" fn=hello
    vm=(--kernel "$kernel" --rootfs "$cache/rootfs.img" --appfs "$cache/hello.img")
fi

echo "demo: request  $request" >&2
printf '%s\n' "$request" | RUST_LOG=${RUST_LOG:-info} target/release/singlevm "${vm[@]}"
