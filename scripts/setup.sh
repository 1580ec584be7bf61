#!/usr/bin/env bash
# Installs what building and testing snapvm needs on a fresh Debian host of
# our kind. Idempotent: packages already present are not touched.
set -euo pipefail

packages=(binutils util-linux python3)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
if [[ ! -e /dev/kvm ]]; then
    echo "setup: /dev/kvm is missing: snapvm needs a host with KVM" >&2
    exit 1
fi
