#!/usr/bin/env bash
# The SnapFaaS snapshot workflow for the example functions, with singlevm:
#
#   1. a language snapshot per language image: boot the kernel on the root
#      image with an empty appfs; the agent's first snapshot point (control
#      port 124, runtime ready) is dumped to TREE/<language>;
#   2. a diff snapshot per function: restore TREE/<language> with the
#      function's appfs; its second snapshot point (app loaded) is dumped
#      to TREE/diff/<function>, only the pages that changed;
#   3. a working set per function: restore language + diff and answer the
#      function's request file (resources/requests/<function>.json); the
#      pages the first request touches go into TREE/diff/<function>.
#
# Then resources/multivm-example.yaml is installed as TREE/multivm.yaml.
# Every step is cached by its inputs (kernel, images, binaries, request
# file, memory size), so a second run is instant. Where the host's KVM
# cannot run a Linux guest to userspace, step 1 never reaches its snapshot
# point (the guest dies or hangs): the script says so and exits 1, within
# --timeout seconds, leaving no VM behind.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prog=mk-snapshots
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}
tree=$cache/snapshots
mem=128
limit=60
kernel=
ws=1
build=1
images=
# firerunner's default command line plus the root disk (see rootfs/README.md).
kernel_args="console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro rootfstype=ext4"

usage() {
    cat <<EOF
usage: scripts/mk-snapshots.sh [options] [FUNCTION...]

Makes language snapshots, diff snapshots and working sets of the example
functions (all of appfs/<name>-<runtime>/, or the FUNCTIONs named) with
singlevm, in a snapshot tree that multivm restores from, and prints the
tree's path as the last line of stdout.

  --kernel PATH       guest kernel (default: scripts/build-kernel.sh)
  --kernel_args ARGS  kernel command line of the language snapshots
                      (default: "$kernel_args")
  --out DIR           the snapshot tree (default: \$SNAPVM_CACHE/snapshots,
                      now $tree)
  --mem MiB           guest memory of every snapshot (default $mem)
  --timeout SECONDS   how long one guest run may take to reach its snapshot
                      point or answer its requests (default $limit)
  --no-ws             skip the working sets (step 3)
  --no-build          use target/release (\$CARGO_TARGET_DIR/release) as
                      it is (default: cargo build --release first)
  --images DIR        take the root images (DIR/<language>.ext4) and app
                      images (DIR/<function>.ext2) from DIR instead of
                      building them: for hosts without the Debian archive

The tree:
  vmlinux, images/<language>.ext4, images/<function>.ext2   what the VMs use
  <language>/         language snapshot (python3, python3+python3-pil, nodejs;
                      python3@net, booted with a network card, for
                      functions with a \`network\` file: fetch-python3)
  diff/<function>/    diff snapshot and working set
  logs/               guest consoles and the working-set runs' responses
  multivm.yaml        resources/multivm-example.yaml

A function's language image is its runtime's, plus the Debian packages in
appfs/<function>/debian-packages (thumbnail-python3: python3-pil). Needs
root (rootfs/mk_rtimage.sh) and /dev/kvm. Exit status: 0 done, 1 a step
failed (the message says which and why), 2 bad usage.
EOF
}

say() { echo "$prog: $*" >&2; }
die() {
    say "$*"
    exit 2
}
fail() {
    say "$*"
    exit 1
}

need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see -h)"; }
wanted=()
while [[ $# -ge 1 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --kernel) need_arg "$@"; kernel=$2; shift 2 ;;
    --kernel=*) kernel=${1#*=}; shift ;;
    --kernel_args | --kernel-args) need_arg "$@"; kernel_args=$2; shift 2 ;;
    --kernel_args=* | --kernel-args=*) kernel_args=${1#*=}; shift ;;
    --out) need_arg "$@"; tree=$2; shift 2 ;;
    --out=*) tree=${1#*=}; shift ;;
    --mem) need_arg "$@"; mem=$2; shift 2 ;;
    --mem=*) mem=${1#*=}; shift ;;
    --timeout) need_arg "$@"; limit=$2; shift 2 ;;
    --timeout=*) limit=${1#*=}; shift ;;
    --no-ws) ws=0; shift ;;
    --no-build) build=0; shift ;;
    --images) need_arg "$@"; images=$2; shift 2 ;;
    --images=*) images=${1#*=}; shift ;;
    -*) die "unknown option '$1' (see -h)" ;;
    *) wanted+=("$1"); shift ;;
    esac
done
[[ $mem =~ ^[1-9][0-9]*$ ]] || die "--mem must be a number of MiB, got '$mem'"
[[ $limit =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a whole number of seconds, got '$limit'"
[[ -z $kernel || -f $kernel ]] || die "--kernel $kernel: no such file"
[[ -z $images || -d $images ]] || die "--images $images: no such directory"

# --- the functions and their language images -------------------------------
all=()
for d in "$repo"/appfs/*-*/; do
    d=${d%/}
    [[ $(basename "$d") == tests ]] || all+=("$(basename "$d")")
done
((${#wanted[@]})) || wanted=("${all[@]}")
declare -A language # function -> language label (runtime[+package...])
declare -A extras   # language label -> "--with P ..." arguments
for fn in "${wanted[@]}"; do
    [[ $fn =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad function name '$fn' (have: ${all[*]})"
    dir=$repo/appfs/$fn
    runtime=${fn##*-}
    case $runtime in
    python3) workload=workload.py ;;
    nodejs) workload=workload.js ;;
    *) die "'$fn' is not a function: appfs/<name>-<runtime>, runtime python3 or nodejs (have: ${all[*]})" ;;
    esac
    [[ -f $dir/$workload ]] || die "'$fn' is not a function: appfs/$fn/$workload is missing (have: ${all[*]})"
    [[ -f $repo/resources/requests/$fn.json ]] || die "resources/requests/$fn.json is missing"
    label=$runtime
    with=()
    if [[ -f $dir/debian-packages ]]; then
        while read -r pkg; do
            label+=+$pkg
            with+=(--with "$pkg")
        done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/[[:space:]]//g' "$dir/debian-packages" | sort -u)
    fi
    extras[$label]="${with[*]}"
    # A function that needs a network restores from a language snapshot
    # booted with a network card (singlevm --net): label@net, same image.
    [[ ! -f $dir/network ]] || label+=@net
    language[$fn]=$label
done
mapfile -t labels < <(printf '%s\n' "${language[@]}" | sort -u)
mapfile -t image_labels < <(printf '%s\n' "${labels[@]%@net}" | sort -u)
net_flag() { [[ $1 != *@net ]] || echo --net; } # LABEL: singlevm's flag

# --- tools, binaries, and whether they can make snapshots yet ---------------
[[ -r /dev/kvm && -w /dev/kvm ]] || fail "cannot open /dev/kvm: this needs a Linux host with KVM and access to /dev/kvm"
if ((build)); then
    say "building snapvm (cargo build --release)"
    (cd "$repo" && cargo build --release -q) || fail "cargo build --release failed"
fi
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/release
for b in firerunner singlevm; do
    [[ -x $bin/$b ]] || fail "$bin/$b is missing: run cargo build --release"
done

mkdir -p "$tree"
tree=$(cd "$tree" && pwd)
exec 9>"$tree/.lock"
flock -n 9 || fail "another mk-snapshots.sh is working on $tree"
scratch=$(mktemp -d)
vm_pid=
cleanup() {
    # A guest run still going (interrupted): stop it and its firerunner.
    if [[ -n $vm_pid ]]; then
        kill -TERM "$vm_pid" 2>/dev/null || true
        wait "$vm_pid" 2>/dev/null || true
    fi
    rm -rf -- "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A flag whose feature has not landed is refused by firerunner with "not
# supported yet" before it opens anything: ask it, rather than find out
# minutes into a boot.
probe() { # HINT FLAG...
    local answer hint=$1
    shift
    answer=$(timeout 10 "$bin/firerunner" --kernel "$scratch/none" --rootfs "$scratch/none" "$@" 2>&1 >/dev/null || true)
    if [[ $answer == *"not supported"* ]]; then
        fail "this firerunner cannot make these snapshots yet: it answers '$(head -n1 <<<"$answer")' (to $*)${hint:+; $hint}"
    fi
}
mkdir -p "$scratch/base" "$scratch/diff"
probe "" --dump_dir "$scratch/dump"
probe "" --load_dir "$scratch/base" --dump_dir "$scratch/dump"
if ((ws)); then
    probe "--no-ws makes the snapshots without working sets" \
        --load_dir "$scratch/base,$scratch/diff" --dump_ws "$scratch/diff"
fi

# --- inputs: kernel, root images, app images ----------------------------------
sha() { sha256sum -- "$1" | cut -c1-64; }
key_of() { printf '%s\n' "$@" | sha256sum | cut -c1-32; }
# Links SRC into the tree as DEST (a hard link when it can, else a copy):
# the tree keeps the exact files its snapshots were made with.
place() { # SRC DEST
    local tmp
    [[ -e $2 ]] && cmp -s -- "$1" "$2" && return 0
    tmp=$(mktemp -- "$2.tmp.XXXXXX")
    # (mktemp makes the file 0600 and cp keeps that: a jailed VM, whose
    # uid is not root, must be able to read the copy.)
    ln -f -- "$1" "$tmp" 2>/dev/null || { cp --sparse=always -- "$1" "$tmp" && chmod 0644 -- "$tmp"; }
    mv -f -- "$tmp" "$2"
}
copy_to() { # SRC DEST: an independent copy, written atomically
    local tmp
    tmp=$(mktemp -- "$2.tmp.XXXXXX")
    cp -- "$1" "$tmp"
    chmod 0644 -- "$tmp"
    mv -f -- "$tmp" "$2"
}
mkdir -p "$tree/images" "$tree/diff" "$tree/logs" "$tree/keys"
if [[ -z $kernel ]]; then
    say "building the guest kernel (scripts/build-kernel.sh; cached)"
    kernel=$("$repo/scripts/build-kernel.sh" | tail -n1) || fail "scripts/build-kernel.sh failed"
fi
place "$kernel" "$tree/vmlinux"
kernel=$tree/vmlinux
for label in "${image_labels[@]}"; do
    if [[ -n $images ]]; then
        [[ -f $images/$label.ext4 ]] || fail "--images: $images/$label.ext4 is missing"
        place "$images/$label.ext4" "$tree/images/$label.ext4"
        continue
    fi
    runtime=${label%%+*}
    read -r -a with <<<"${extras[$label]}"
    say "root image $label (rootfs/mk_rtimage.sh ${with[*]+${with[*]} }$runtime; cached)"
    img=$("$repo/rootfs/mk_rtimage.sh" "${with[@]}" "$runtime" | tail -n1) ||
        fail "rootfs/mk_rtimage.sh ${with[*]+${with[*]} }$runtime failed"
    place "$img" "$tree/images/$label.ext4"
done
for fn in "${wanted[@]}"; do
    if [[ -n $images ]]; then
        [[ -f $images/$fn.ext2 ]] || fail "--images: $images/$fn.ext2 is missing"
        place "$images/$fn.ext2" "$tree/images/$fn.ext2"
        continue
    fi
    "$repo/appfs/mkappfs" "$repo/appfs/$fn" "$tree/images/$fn.ext2" >/dev/null ||
        fail "appfs/mkappfs appfs/$fn failed"
done

common_key=$(key_of "firerunner $(sha "$bin/firerunner")" "singlevm $(sha "$bin/singlevm")" \
    "kernel $(sha "$kernel")" "mem $mem")

# --- running one guest, bounded -----------------------------------------------
# run_vm NAME STDIN STDOUT SINGLEVM-ARGS...: runs singlevm under timeout(1),
# which signals its whole process group (singlevm and its firerunner) when
# --timeout runs out; sets rc (124: timed out) and keeps singlevm's
# stderr in $scratch/NAME.err.
run_vm() {
    local name=$1 input=$2 output=$3
    shift 3
    rc=0
    # (9>&-: the guest does not inherit the tree's lock.)
    RUST_LOG=${RUST_LOG:-info} timeout --kill-after=10 "$limit" "$bin/singlevm" "$@" \
        <"$input" >"$output" 2>"$scratch/$name.err" 9>&- &
    vm_pid=$!
    wait "$vm_pid" || rc=$?
    vm_pid=
}

# singlevm's and firerunner's timings of the last run (RUST_LOG=info).
timings() { # NAME
    grep -oE '(guest boot done at|snapshot written to [^ ]+ in|VM ready in|request returned in): [0-9]+ us' \
        "$scratch/$1.err" 2>/dev/null | sed "s|$tree/||; s/^/    /" >&2 || true
}

tail_of() { # FILE: its last non-empty lines, indented
    [[ -s $1 ]] || { echo "    (empty)"; return; }
    tr -d '\r' <"$1" | grep -v '^[[:space:]]*$' | tail -n "${2:-6}" | cut -c1-160 | sed 's/^/    /'
}

# Why a run did not reach its snapshot point; $1 what was awaited, $2 the
# console, $3 singlevm's stderr.
explain() {
    local what=$1 console=$2 err=$3
    if ((rc == 124 || rc == 137)); then
        say "the guest did not reach $what within $limit s (stopped)."
    elif ((rc == 0)); then
        say "the guest stopped (reset the machine) before $what: no snapshot was written."
    else
        say "the run failed before $what (singlevm exit $rc):"
        # singlevm's own error and the VMM's (or jailer's) error lines;
        # singlevm's last lines are the console's, shown below.
        if grep -qE '^singlevm: error|ERROR' "$err" 2>/dev/null; then
            grep -E '^singlevm: error|ERROR' "$err" | tail -n 5 | cut -c1-200 | sed 's/^/    /' >&2
        else
            tail_of "$err" 3 >&2
        fi
    fi
    say "its console ($console) ends with:"
    tail_of "$console" >&2
}

# --- 1. language snapshots -------------------------------------------------
declare -A lang_key
first=1
for label in "${labels[@]}"; do
    snap=$tree/$label
    console=$tree/logs/$label.console
    key=$(key_of "$common_key" "rootfs $(sha "$tree/images/${label%@net}.ext4")" "args $kernel_args")
    lang_key[$label]=$key
    if [[ -s $snap/snapshot.json && $(cat "$tree/keys/$label" 2>/dev/null) == "$key" ]]; then
        say "language snapshot $label: cached"
        first=0
        continue
    fi
    rm -rf -- "$snap" "$tree/keys/$label"
    say "language snapshot $label: booting (up to $limit s)"
    start=$SECONDS
    # shellcheck disable=SC2046 # net_flag says nothing or one word
    run_vm "$label" /dev/null /dev/null --kernel "$kernel" --kernel_args "$kernel_args" \
        --rootfs "$tree/images/${label%@net}.ext4" --mem_size "$mem" $(net_flag "$label") \
        --dump_dir "$snap" --force_exit --console "$console"
    if ((rc != 0)) || [[ ! -s $snap/snapshot.json ]]; then
        explain "its language snapshot point (control port 124)" "$console" "$scratch/$label.err"
        if ((first)); then
            if grep -qE 'Run /(sbin/)?init' "$console" 2>/dev/null; then
                say "The kernel started /init, but the agent never reached its first"
                say "snapshot point: Linux userspace does not run in this guest."
            else
                say "The kernel never started /init: it did not get to userspace."
            fi
            say "A host whose KVM cannot run a Linux guest to userspace (for instance"
            say "a nested KVM that emulates guest kernel code) behaves exactly so:"
            say "Linux function snapshots need an x86_64 host with hardware"
            say "virtualisation (Intel VT-x or AMD-V). On such a host, check the"
            say "kernel (--kernel) and the console above. testguest's snapshots"
            say "(cargo test --test snapshot) run on any KVM host."
        fi
        exit 1
    fi
    echo "$key" >"$tree/keys/$label"
    first=0
    say "language snapshot $label: done in $((SECONDS - start)) s"
    timings "$label"
done

# --- 2. diff snapshots, 3. working sets -----------------------------------------
for fn in "${wanted[@]}"; do
    label=${language[$fn]}
    snap=$tree/diff/$fn
    console=$tree/logs/$fn.console
    app=$tree/images/$fn.ext2
    vm=(--kernel "$kernel" --rootfs "$tree/images/${label%@net}.ext4" --appfs "$app" --mem_size "$mem")
    [[ $label != *@net ]] || vm+=(--net)
    key=$(key_of "${lang_key[$label]}" "appfs $(sha "$app")")
    if [[ -s $snap/snapshot.json && $(cat "$tree/keys/$fn" 2>/dev/null) == "$key" ]]; then
        say "diff snapshot $fn: cached"
    else
        rm -rf -- "$snap" "$tree/keys/$fn" "$tree/keys/$fn.ws"
        say "diff snapshot $fn: restoring $label, loading the app"
        run_vm "$fn" /dev/null /dev/null "${vm[@]}" --load_dir "$tree/$label" \
            --dump_dir "$snap" --force_exit --console "$console"
        # A 125 (app failed to load) fails the step even if a snapshot of
        # the failed state got written.
        if grep -qE 'exit status: 4|app failed to load' "$scratch/$fn.err" ||
            grep -q 'app load failed' "$console" 2>/dev/null; then
            rm -rf -- "$snap"
            say "the guest reported that $fn failed to load (control port 125); its console ($console) ends with:"
            tail_of "$console" >&2
            exit 1
        fi
        if ((rc != 0)) || [[ ! -s $snap/snapshot.json ]]; then
            explain "its diff snapshot point (control port 124)" "$console" "$scratch/$fn.err"
            exit 1
        fi
        echo "$key" >"$tree/keys/$fn"
        timings "$fn"
    fi
    ((ws)) || continue

    requests=$repo/resources/requests/$fn.json
    wkey=$(key_of "$key" "requests $(sha "$requests")")
    responses=$tree/logs/$fn.responses
    if [[ -s $snap/ws.json && $(cat "$tree/keys/$fn.ws" 2>/dev/null) == "$wkey" ]]; then
        say "working set $fn: cached"
        continue
    fi
    rm -f -- "$tree/keys/$fn.ws"
    touch "$scratch/$fn.ws.start" # a working set older than this is stale
    say "working set $fn: restoring $label + diff, answering $(grep -c . "$requests") request(s)"
    run_vm "$fn.ws" "$requests" "$responses" "${vm[@]}" --load_dir "$tree/$label,$snap" \
        --dump_ws "$snap" --boot_timeout "$limit" --request_timeout "$limit" \
        --console "$tree/logs/$fn.ws.console"
    if ((rc != 0)) || [[ ! -s $snap/ws.json || ! $snap/ws.json -nt $scratch/$fn.ws.start ]]; then
        explain "the end of its requests (working set recorded)" "$tree/logs/$fn.ws.console" "$scratch/$fn.ws.err"
        exit 1
    fi
    # One answer per request line (singlevm's contract; it already refused
    # to record the working set of a first answer that is an error).
    nreq=$(grep -c "" "$requests") nresp=$(grep -c "" "$responses")
    ((nreq == nresp)) || fail "the working-set run of $fn gave $nresp answers to $nreq requests (see $responses)"
    echo "$wkey" >"$tree/keys/$fn.ws"
    timings "$fn.ws"
done

# --- the multivm configuration ---------------------------------------------------
copy_to "$repo/resources/multivm-example.yaml" "$tree/multivm.yaml"
if ((${#wanted[@]} < ${#all[@]})); then
    say "note: multivm.yaml configures every example function; run without FUNCTION"
    say "arguments to make them all before starting multivm with it."
fi
say "snapshots in $tree:"
for label in "${labels[@]}"; do
    printf '    %-34s %6s KiB on disk\n' "$label/" "$(du -sk -- "$tree/$label" | cut -f1)" >&2
done
for fn in "${wanted[@]}"; do
    printf '    %-34s %6s KiB on disk\n' "diff/$fn/" "$(du -sk -- "$tree/diff/$fn" | cut -f1)" >&2
done
say "serve them: $bin/multivm --config $tree/multivm.yaml --mem 2048 --listen 127.0.0.1:8080"
echo "$tree"
