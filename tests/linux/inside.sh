#!/usr/bin/env bash
# The Linux end-to-end suite as it runs inside the emulated KVM host
# (scripts/linux-test.sh stages this directory's payload and starts it
# through scripts/kvm-host.sh): the SnapFaaS workflow for every example
# function with scripts/mk-snapshots.sh, then the tests of tests/linux.rs
# against the snapshot tree it made. When something fails, the snapshot
# runs' consoles are copied to /out for the caller.
#
#   bash repo/tests/linux/inside.sh [TEST-ARGS]   (from the payload's root;
#                                    TEST-ARGS go to the test binary)
set -uo pipefail
payload=$(pwd)
tree=/tmp/snapshots
say() { printf 'linux-test [%4ds] %s\n' "$SECONDS" "$*" >&2; }
keep() { # the snapshot runs' consoles and logs, for the caller (a failed
    # test prints its own VM's console in its message)
    cp -r "$tree/logs" /out/ 2>/dev/null
}

say "SnapFaaS workflow for every example function (scripts/mk-snapshots.sh)"
if ! CARGO_TARGET_DIR=$payload/target SNAPVM_CACHE=/tmp/cache RUST_LOG=info \
    "$payload/repo/scripts/mk-snapshots.sh" --no-build --kernel "$payload/vmlinux" \
    --images "$payload/images" --out "$tree" --timeout 300; then
    say "mk-snapshots.sh failed"
    keep
    exit 1
fi

say "tests/linux.rs"
SNAPVM_BIN=$payload/target/release SNAPVM_LINUX_TREE=$tree SNAPVM_LINUX_DATA=$payload/data \
    "$payload/linux-tests" --ignored --test-threads=1 --nocapture "$@"
status=$?
((status == 0)) || keep
exit "$status"
