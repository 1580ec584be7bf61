#!/usr/bin/env bash
# Installs what building and testing snapvm needs on a fresh Debian host of
# our kind. Idempotent: packages already present are not touched.
set -euo pipefail

# Usage: scripts/setup.sh [--bench]
# python3-venv: scripts/api-fuzz.sh installs schemathesis into a venv.
# nftables: the VMs' networks (src/network.rs: NAT and isolation).
# haproxy, prometheus, iproute2: scripts/cluster.sh (several multivm nodes
# behind HAProxy, scraped by Prometheus; tested by scripts/cluster-test.sh).
packages=(binutils util-linux python3 python3-venv haproxy prometheus iproute2 nftables)
if [[ ${1:-} == --bench ]]; then
    # scripts/bench.sh compares with QEMU microvm and plots with Debian's
    # python3 (/usr/bin/python3).
    packages+=(qemu-system-x86 python3-matplotlib)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    # No recommends: they would add QEMU's GUI, firmware for other machines
    # and Tk, none of which a headless host uses.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if [[ ! -e /dev/kvm ]]; then
    echo "setup: /dev/kvm is missing: snapvm needs a host with KVM" >&2
    exit 1
fi
