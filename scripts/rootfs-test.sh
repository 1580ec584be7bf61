#!/usr/bin/env bash
# Host-side tests of the guest side of the root images (rootfs/tests): both
# agents over a Unix-socket stand-in for vsock and a log-file stand-in for
# the control port, mount, RNG and clock; init and the helper likewise.
#
#   scripts/rootfs-test.sh            agents on the host's python3 and node
#   scripts/rootfs-test.sh --images   also build both root images (cached
#                                     under $SNAPVM_CACHE/rootfs) and run
#                                     every agent test again inside each
#                                     (chroot into an unpacked copy: the
#                                     image's own runtime, helper, addon)
#
# Installs what it needs (Debian packages: gcc, libc6-dev, nodejs and its
# headers, e2fsprogs). The last line is "rootfs: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "$0")/.."

images=0
case ${1:-} in
"") ;;
--images) images=1 ;;
-h | --help)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "rootfs-test.sh: unknown argument '$1' (see -h)" >&2
    exit 2
    ;;
esac

install=()
command -v python3 >/dev/null || install+=(python3)
command -v gcc >/dev/null || install+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || install+=(libc6-dev)
command -v node >/dev/null || install+=(nodejs)
command -v debugfs >/dev/null || install+=(e2fsprogs)
if ((${#install[@]})); then
    echo "rootfs-test: installing ${install[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${install[@]}" >&2
fi

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

# node_api.h for the addon: node's own headers when it ships them (as
# upstream builds do), else those of Debian's libnode-dev, unpacked here
# rather than installed (it conflicts with other node builds).
if [[ ! -e /usr/include/node/node_api.h && ! -e /usr/local/include/node/node_api.h ]]; then
    (cd "$work" && apt-get -o APT::Sandbox::User=root download -qq libnode-dev >&2) || {
        apt-get update -qq >&2
        (cd "$work" && apt-get -o APT::Sandbox::User=root download -qq libnode-dev >&2)
    }
    dpkg-deb -x "$work"/libnode-dev_*.deb "$work/libnode-dev"
    export SNAPVM_NODE_INCLUDE=$work/libnode-dev/usr/include/node
fi

export SNAPVM_ROOTFS_TEST_BUILD=$work/native
export SNAPVM_REQUIRE_NODE=1
if ((images)); then
    echo "rootfs-test: building the root images (cached)" >&2
    SNAPVM_TEST_IMAGE_PYTHON3=$(rootfs/mk_rtimage.sh python3 | tail -1)
    SNAPVM_TEST_IMAGE_NODEJS=$(rootfs/mk_rtimage.sh nodejs | tail -1)
    export SNAPVM_TEST_IMAGE_PYTHON3 SNAPVM_TEST_IMAGE_NODEJS
fi
PYTHONDONTWRITEBYTECODE=1 python3 rootfs/tests/run.py
