#!/usr/bin/env bash
# Linux boot conformance test (tests/linux_boot.rs, #[ignore]d in plain
# `cargo test`): builds the `test` kernel variant if it is not cached, then
# boots it under firerunner on an ext4 root and an app disk until Linux has
# probed our virtio devices, mounted the root and printed `Run /init`.
#
#   scripts/linux-boot-test.sh
#
# Minutes long on an emulating KVM host. Environment:
#   SNAPVM_LINUX_BOOT_TIMEOUT  seconds for the boot itself (default 1200)
#   SNAPVM_LINUX_BOOT_LOGDIR   where the guest console goes (default
#                              target/linux-boot); kept when the test fails
#   SNAPVM_CACHE               kernel cache root (see build-kernel.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

boot_timeout="${SNAPVM_LINUX_BOOT_TIMEOUT:-1200}"
logdir="${SNAPVM_LINUX_BOOT_LOGDIR:-target/linux-boot}"
mkdir -p "$logdir"
console="$(cd "$logdir" && pwd)/console.log"
rm -f "$console"

echo "== linux boot: kernel (test variant)" >&2
kernel="$(scripts/build-kernel.sh --variant test | tail -n1)"
echo "== linux boot: booting $kernel (timeout ${boot_timeout}s)" >&2
status=0
SNAPVM_LINUX_KERNEL="$kernel" \
SNAPVM_LINUX_BOOT_CONSOLE="$console" \
SNAPVM_LINUX_BOOT_TIMEOUT="$boot_timeout" \
    timeout --kill-after=30 "$((boot_timeout + 900))" \
    cargo test --release --test linux_boot -- --ignored --nocapture || status=$?
if ((status)); then
    echo "linux boot: FAILED (status $status); guest console kept at $console" >&2
    exit "$status"
fi
rm -f "$console"
echo "linux boot: passed" >&2
