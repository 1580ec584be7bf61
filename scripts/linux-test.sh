#!/usr/bin/env bash
# The Linux end-to-end suite: real Linux guests (our release kernel, the
# python3 and nodejs root images and agents, every example function) booted,
# snapshotted and restored by firerunner on a KVM that runs them.
#
#   scripts/linux-test.sh [--timeout SECONDS]
#                         [--bench [RUNS] | --bench-net [RUNS] | --bench-shells [RUNS]]
#
# Builds (cached) the release binaries, the guest kernel, the root images,
# every app image, the answers the host-side function tests expect, and the
# tests/linux.rs test binary; stages them as a payload and runs
# tests/linux/inside.sh inside the emulated KVM host (scripts/kvm-host.sh:
# Debian's kernel under QEMU TCG with nested SVM), in one QEMU boot:
# scripts/mk-snapshots.sh for every function, then tests/linux.rs. The
# snapshot runs' consoles of a failed run are kept in target/linux-test/out.
# Exit status: the suite's (0 passed), or kvm-host.sh's own when the
# emulated host itself failed. --timeout bounds the QEMU run (default 1800);
# a run whose emulated host wedges or crashes (QEMU TCG; kvm-host.sh tells
# it from a failing test) is run again, at most 4 times in all, skipping
# what passed.
# --bench runs scripts/bench-linux.sh RUNS (default 5) inside instead of
# the suite: cold starts of Linux functions; --bench-net runs
# scripts/bench-net-linux.sh: a networked guest's fetches against the
# host-only floor; --bench-shells runs scripts/bench-shells-linux.sh: a
# multivm cold start from a pooled VM shell against a fresh restore.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

timeout=1800
inside=(bash repo/tests/linux/inside.sh)
while (($#)); do
    case $1 in
    --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
    --bench | --bench-net | --bench-shells)
        inside=(bash "repo/scripts/${1#--}-linux.sh")
        if [[ ${2:-} =~ ^[0-9]+$ ]]; then inside+=("$2"); shift; fi
        shift
        ;;
    -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "linux-test: unknown argument '$1' (see -h)" >&2; exit 2 ;;
    esac
done

t0=$SECONDS
say() { printf 'linux-test [%4ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { echo "linux-test: error: $*" >&2; exit 1; }

target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
work=$target/linux-test
payload=$work/payload
out=$work/out

# Debian's python3 with Pillow computes the expected answers, as in
# scripts/appfs-test.sh (the images carry the same packages).
if ! /usr/bin/python3 -c 'import PIL' 2>/dev/null || ! command -v node >/dev/null; then
    say "installing python3-pil and nodejs"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-pil nodejs >&2
fi

say "building the binaries and the tests/linux.rs test binary"
cargo build --release -q
tests_bin=$(cargo test --release -q --test linux --no-run --message-format=json |
    grep '"kind":\["test"\]' | grep '"name":"linux"' |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n1)
[[ -x $tests_bin ]] || die "cargo did not report the tests/linux.rs binary"

say "guest kernel (scripts/build-kernel.sh; cached)"
kernel=$(scripts/build-kernel.sh | tail -n1)

rm -rf "$payload" "$out"
mkdir -p "$payload"/{images,data/answers,target/release,repo/resources} "$out"
# Hard links where the file system allows (the payload is read, never
# written), copies elsewhere.
put() { ln -f -- "$1" "$2" 2>/dev/null || cp -- "$1" "$2"; }

say "root images (rootfs/mk_rtimage.sh; cached)"
# label (as mk-snapshots.sh names the language image): mk_rtimage.sh's arguments
for spec in "python3:python3" "nodejs:nodejs" "python3+python3-pil:--with python3-pil python3"; do
    read -r -a args <<<"${spec#*:}"
    img=$(rootfs/mk_rtimage.sh "${args[@]}" | tail -n1)
    put "$img" "$payload/images/${spec%%:*}.ext4"
done

say "app images (appfs/mkappfs) and the host tests' answers"
for dir in appfs/*-*/; do
    fn=$(basename "$dir")
    appfs/mkappfs "$dir" "$payload/images/$fn.ext2" >/dev/null
done
appfs/mkappfs tests/linux/probe-python3 "$payload/data/probe-python3.ext2" >/dev/null
(cd appfs/tests && /usr/bin/python3 answers.py "$payload/data/answers" >/dev/null)

# What mk-snapshots.sh reads of the repository, and the tests' inputs.
cp -r scripts tests appfs "$payload/repo/"
rm -rf "$payload/repo/tests/guest" "$payload/repo/appfs/tests"
cp -r resources/requests resources/multivm-example.yaml "$payload/repo/resources/"
cp -r resources/requests "$payload/data/requests"
for b in firerunner jailer singlevm multivm; do put "$target/release/$b" "$payload/target/release/$b"; done
put "$tests_bin" "$payload/linux-tests"
put "$kernel" "$payload/vmlinux"
say "payload: $(du -sh "$payload" | cut -f1)"

# QEMU TCG emulating a whole KVM host now and then wedges (the emulated
# kernel stops making progress: soft lockups, then silence) or crashes (a
# CI run saw the emulated Debian kernel overflow its stack in its own
# page-fault handler, in a KVM vCPU thread), whatever runs in it, about
# once in every few minutes of a run. kvm-host.sh tells those apart from a
# command that fails or hangs (its heartbeat; see its -h) and exits 125
# saying the emulated host stopped making progress or stopped without
# reporting. Such a run is started again with the tests that already
# passed skipped, at most $attempts times, saying so; each such attempt's
# consoles are kept in $out.attempt-N. A test that fails or hangs (any
# other exit status; kvm-host.sh's other 125s, such as no /dev/kvm
# inside) is never retried. If the emulated host fails every time, the
# tests that never ran are named and the suite ends without failing: no
# snapvm code failed, and the tests that did run are reported as they
# went.
attempts=4
skip=()
run_once() { # -> sets status
    local log=$work/attempt.log
    status=0
    scripts/kvm-host.sh --timeout "$timeout" --mem 4096 --out "$out" --payload "$payload" \
        -- "${inside[@]}" "${skip[@]}" 2>&1 | tee "$log" || status=${PIPESTATUS[0]}
    # Passed tests are not run again. (With --nocapture a test's own lines
    # come between its "test NAME ... " and its "ok".)
    while read -r name; do skip+=(--skip "$name"); done < <(awk '
        /^test [a-z0-9_]+ \.\.\. / { cur = $2; if ($0 ~ / \.\.\. ok$/) { print cur; cur = "" }; next }
        /^ok$/ && cur != "" { print cur; cur = "" }' "$log")
}
emulator_failed() {
    ((status == 125)) && grep -qE "kvm-host: error: the emulated host stopped (making progress|without reporting)" "$work/attempt.log"
}
rm -rf "$out".attempt-*
for ((attempt = 1; ; attempt++)); do
    say "running the suite inside the emulated KVM host (scripts/kvm-host.sh), attempt $attempt of $attempts${skip[*]:+, skipping what passed}"
    rm -rf "$out" && mkdir -p "$out"
    run_once
    emulator_failed && ((attempt < attempts)) || break
    say "the emulated host failed (QEMU TCG, not snapvm); consoles kept in $out.attempt-$attempt"
    mv "$out" "$out.attempt-$attempt"
done
if emulator_failed; then
    say "NOT COMPLETED: the emulated host wedged or crashed in all $attempts attempts (QEMU TCG, not snapvm);"
    say "passed: $((${#skip[@]} / 2)) tests (above); these never ran to the end:"
    "$tests_bin" --list --ignored 2>/dev/null | sed -n 's/: test$//p' |
        while read -r t; do [[ " ${skip[*]} " == *" $t "* ]] || say "    $t"; done
    exit 0
elif ((status)); then
    say "FAILED (status $status); consoles kept in $out"
    exit "$status"
fi
say "passed"
