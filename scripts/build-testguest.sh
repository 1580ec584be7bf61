#!/usr/bin/env bash
# Builds testguest (tests/guest), checks that its CPL0 core contains no
# instruction the development host's KVM emulator rejects at CPL0, and
# prints the absolute path of the ELF as the last line of stdout.
# Progress goes to stderr. Works from any cwd; incremental (cargo).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
guest="$root/tests/guest"
triple="x86_64-unknown-linux-gnu"
target_dir="$guest/target"
elf="$target_dir/$triple/release/testguest"

# Flags come from tests/guest/.cargo/config.toml and build.rs; environment
# overrides meant for the host workspace must not leak into this build.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR || true

echo "build-testguest: building $guest" >&2
(cd "$guest" && cargo build --release --quiet --target "$triple" --target-dir "$target_dir" </dev/null) >&2

if [[ ! -f "$elf" ]]; then
    echo "build-testguest: error: cargo did not produce $elf" >&2
    exit 1
fi

# The CPL0 sections and the mode to disassemble each in.
forbidden='%[xyz]mm[0-9]|\b(popcnt|cmpxchg16b|xsave[a-z0-9]*|xrstor[a-z0-9]*|fxsave[a-z0-9]*|fxrstor[a-z0-9]*|fwait|wait|clac|stac|int3)\b'
status=0
for spec in ".text.cpl0:x86-64" ".text.cpl0_32:i386" ".cpl0.ap16:i8086"; do
    section="${spec%%:*}"
    mode="${spec##*:}"
    if ! listing="$(objdump -d --no-show-raw-insn -M "$mode" -j "$section" "$elf" 2>&1)"; then
        echo "build-testguest: error: objdump failed on section $section:" >&2
        echo "$listing" >&2
        exit 1
    fi
    if ! grep -q '^ *[0-9a-f]\+:' <<<"$listing"; then
        echo "build-testguest: error: section $section is missing or empty in $elf" >&2
        exit 1
    fi
    # Instructions only (address: mnemonic ...), not symbol lines.
    if bad="$(grep -E '^ *[0-9a-f]+:' <<<"$listing" | grep -Ei "$forbidden")"; then
        echo "build-testguest: error: the CPL0 section $section contains instructions the KVM emulator on the development host rejects at CPL0:" >&2
        echo "$bad" >&2
        status=1
    fi
done
if [[ $status -ne 0 ]]; then
    echo "build-testguest: fix tests/guest/src/core.S (CPL0 code must be plain integer code)" >&2
    exit 1
fi

echo "build-testguest: ok, CPL0 core checked" >&2
echo "$elf"
