#!/usr/bin/env bash
# The main job: build everything, then answer a request with the python3
# `hello` function in its own KVM microVM, restored from a snapshot.
#
#   scripts/demo.sh [REQUEST]               python3 hello, from a snapshot
#   scripts/demo.sh --testguest [REQUEST]   testguest's hello (instant, any KVM)
#
# The python3 path builds (cached) the binaries, the guest kernel, the
# python3 root image and the hello-python3 app image, then runs the
# SnapFaaS workflow: a language snapshot (runtime ready), a diff snapshot
# (app loaded), and the request answered twice, by a booted VM and by one
# restored from both layers, with the time each took to its first response.
# It prints the restored VM's answer on stdout, progress on stderr.
#
# Where: a probe, the language snapshot's boot cut short at
# $SNAPVM_PROBE_SECONDS (default 5), checks that the guest kernel runs
# python3 to its snapshot point, which a hardware KVM (VT-x/AMD-V) does in
# about a second. If this host's KVM does that, the demo runs here (and
# keeps that snapshot); if not (a nested KVM that emulates guest kernel
# code cannot), it runs inside the emulated KVM host (scripts/kvm-host.sh:
# Debian's kernel under QEMU with nested SVM, slow but a real KVM) and
# says so.
# Built files go to the cache dir ($SNAPVM_CACHE, default ~/.cache/snapvm).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd) # scripts/, or the top of a payload
repo=$(dirname "$here")

# firerunner's default command line plus the root disk (rootfs/README.md).
KERNEL_ARGS="console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro rootfstype=ext4"

t0=$SECONDS
say() { printf 'demo [%4ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { echo "demo: error: $*" >&2; exit 1; }

# singlevm_run NAME SINGLEVM-ARGS...: one singlevm run with its console in
# $dir/NAME.console, stdin from $input; its stdout in $answer, its wall
# time in $took_ms.
singlevm_run() {
    local name=$1 start
    shift
    start=$(date +%s%N)
    answer=$("$bin/singlevm" "${vm[@]}" "$@" --console "$dir/$name.console" <<<"$input") ||
        die "the $name run failed (console: $dir/$name.console)"
    took_ms=$((($(date +%s%N) - start) / 1000000))
}

# workflow BIN KERNEL ROOTFS APPFS DIR REQUEST [LIMIT]: the SnapFaaS
# workflow with the binaries in BIN; snapshots and consoles go to DIR.
workflow() {
    local bin=$1 rootfs=$3 appfs=$4 dir=$5 request=$6
    local vm=(--kernel "$2" --rootfs "$rootfs" --boot_timeout "${7:-600}")
    local input="" answer took_ms boot_ms
    rm -rf "$dir/diff"
    if [[ ! -s $dir/python3/snapshot.json ]]; then
        say "language snapshot: booting python3 with an empty appfs"
        singlevm_run language --kernel_args "$KERNEL_ARGS" --dump_dir "$dir/python3" --force_exit
    fi
    say "diff snapshot: restoring it with hello-python3, loading the app"
    singlevm_run diff --appfs "$appfs" --load_dir "$dir/python3" --dump_dir "$dir/diff" --force_exit

    input=$request
    say "request $request: a booted VM"
    singlevm_run boot --appfs "$appfs" --kernel_args "$KERNEL_ARGS"
    boot_ms=$took_ms
    say "  answered in $boot_ms ms: $answer"
    say "request $request: a VM restored from the language + diff snapshots"
    singlevm_run restore --appfs "$appfs" --load_dir "$dir/python3,$dir/diff"
    say "  answered in $took_ms ms"
    say "start to first response: boot $boot_ms ms, restore $took_ms ms"
    echo "$answer"
}

# Inside the emulated KVM host: the payload scripts/demo.sh staged.
if [[ ${1:-} == --payload-run ]]; then
    request=$2
    mkdir -p /tmp/demo
    workflow "$here/bin" "$here/vmlinux" "$here/python3.ext4" "$here/hello-python3.ext2" \
        /tmp/demo "$request"
    exit 0
fi

cd "$repo"
testguest=0
if [[ ${1:-} == --testguest ]]; then
    testguest=1
    shift
fi
request=${1:-'{"name": "snapvm"}'}

scripts/setup.sh
say "building snapvm (cargo build --release)"
cargo build --release -q
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}/demo
mkdir -p "$cache"

if ((testguest)); then
    say "building testguest"
    kernel=$(scripts/build-testguest.sh | tail -1)
    # testguest reads any root image; a small one with a label will do.
    if [[ ! -s $cache/rootfs.img ]]; then
        printf 'snapvm demo root image\n' | dd of="$cache/rootfs.img.tmp" bs=1M count=1 conv=sync status=none
        mv "$cache/rootfs.img.tmp" "$cache/rootfs.img"
    fi
    appfs/mk_testguest_app.sh "$cache/hello.img" fn=hello
    say "request $request"
    printf '%s\n' "$request" | target/release/singlevm --kernel "$kernel" \
        --rootfs "$cache/rootfs.img" --appfs "$cache/hello.img"
    exit
fi

say "guest kernel, python3 root image, hello-python3 app image (cached)"
kernel=$(scripts/build-kernel.sh | tail -n1)
rootfs=$(rootfs/mk_rtimage.sh python3 | tail -n1)
appfs/mkappfs appfs/hello-python3 "$cache/hello-python3.ext2" >/dev/null 2>&1
# Snapshots belong to one kernel, root image and firerunner.
key=$(cat "$kernel" "$rootfs" target/release/firerunner | sha256sum | cut -c1-16)
dir=$cache/python3-$key
mkdir -p "$dir"

probe=${SNAPVM_PROBE_SECONDS:-5}
say "probe: does this host's KVM run our Linux guest to python3 within $probe s?"
if [[ ! -s $dir/python3/snapshot.json ]]; then
    # The probe is the language snapshot's own boot, cut short: a host
    # that passes keeps the snapshot.
    if target/release/singlevm --kernel "$kernel" --rootfs "$rootfs" --kernel_args "$KERNEL_ARGS" \
        --dump_dir "$dir/python3" --force_exit --boot_timeout "$probe" \
        --console "$dir/language.console" </dev/null 2>"$dir/probe.err"; then
        native=1
    else
        native=0
        rm -rf "$dir/python3"
    fi
else
    native=1 # a language snapshot was made here before
fi

if ((native)); then
    say "yes: running the demo on this host"
    workflow "$repo/target/release" "$kernel" "$rootfs" "$cache/hello-python3.ext2" "$dir" "$request"
    exit
fi
say "no: $(grep -m1 -o 'error: .*' "$dir/probe.err" | cut -c1-120 || true)"
last=$(grep -v '^[[:space:]]*$' "$dir/language.console" 2>/dev/null | tail -n1 | cut -c1-100) || true
say "    its console ends with: ${last:-(nothing: the kernel printed no line yet)}"
say "this KVM cannot run a Linux guest at speed (a nested KVM that emulates guest"
say "kernel code behaves so): running the demo inside the emulated KVM host instead"
payload=$cache/payload
rm -rf "$payload"
mkdir -p "$payload/bin"
put() { ln -f -- "$1" "$2" 2>/dev/null || cp -- "$1" "$2"; }
for b in firerunner jailer singlevm; do put "target/release/$b" "$payload/bin/$b"; done
put "$kernel" "$payload/vmlinux"
put "$rootfs" "$payload/python3.ext4"
put "$cache/hello-python3.ext2" "$payload/hello-python3.ext2"
cp scripts/demo.sh "$payload/demo.sh"
scripts/kvm-host.sh --timeout 900 --payload "$payload" -- bash demo.sh --payload-run "$request"
