#!/usr/bin/env bash
# Host-side tests of the example functions and the appfs builder
# (appfs/tests): every function's handle on its request file, its answers
# and its errors (python3 ones also through the guest agent's response
# encoding, nodejs ones through node); every function served by the real
# agent process over a Unix-socket stand-in for vsock; appfs/mkappfs's
# images; and the consistency of the examples, the request files and
# resources/multivm-example.yaml.
#
#   scripts/appfs-test.sh [-v] [PATTERN]    on the host: a few seconds
#   scripts/appfs-test.sh --images [-v]     also serve every function in a
#                                           chroot of its own language image
#                                           (rootfs/mk_rtimage.sh, cached;
#                                           needs root)
#
# Runs on Debian's python3 and Pillow (what the language images carry) and
# installs what is missing: python3, python3-pil, python3-yaml, e2fsprogs,
# nodejs and its headers, gcc, libc6-dev. No KVM needed. The last line is
# "appfs: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

images=0
args=()
for a in "$@"; do
    case $a in
    -h | --help)
        sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    --images) images=1 ;;
    *) args+=("$a") ;;
    esac
done

python=/usr/bin/python3
install=()
[[ -x $python ]] || install+=(python3)
if [[ -x $python ]]; then
    $python -c 'import PIL' 2>/dev/null || install+=(python3-pil)
    $python -c 'import yaml' 2>/dev/null || install+=(python3-yaml)
else
    install+=(python3-pil python3-yaml)
fi
for tool in mkfs.ext2 debugfs e2fsck; do
    command -v "$tool" >/dev/null || { install+=(e2fsprogs); break; }
done
command -v node >/dev/null || command -v nodejs >/dev/null || install+=(nodejs)
command -v gcc >/dev/null || install+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || install+=(libc6-dev)
if ((${#install[@]})); then
    echo "appfs-test: installing ${install[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${install[@]}" >&2
fi

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
# The agents' helper and node addon are built once, here (rootfs/tests/
# harness.py); the addon needs node_api.h: node's own headers when it
# ships them, else Debian's libnode-dev, unpacked rather than installed.
export SNAPVM_ROOTFS_TEST_BUILD=$work/native
if [[ ! -e /usr/include/node/node_api.h && ! -e /usr/local/include/node/node_api.h ]]; then
    (cd "$work" && apt-get -o APT::Sandbox::User=root download -qq libnode-dev >&2) || {
        apt-get update -qq >&2
        (cd "$work" && apt-get -o APT::Sandbox::User=root download -qq libnode-dev >&2)
    }
    dpkg-deb -x "$work"/libnode-dev_*.deb "$work/libnode-dev"
    export SNAPVM_NODE_INCLUDE=$work/libnode-dev/usr/include/node
fi

if ((images)); then
    # Each function's language image: its runtime plus its debian-packages
    # (the labels scripts/mk-snapshots.sh uses).
    declare -A built
    spec=
    for dir in appfs/*-*/; do
        dir=${dir%/}
        runtime=${dir##*-}
        label=$runtime
        with=()
        if [[ -f $dir/debian-packages ]]; then
            while read -r pkg; do
                label+=+$pkg
                with+=(--with "$pkg")
            done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/[[:space:]]//g' "$dir/debian-packages" | sort -u)
        fi
        [[ -z ${built[$label]:-} ]] || continue
        echo "appfs-test: language image $label (rootfs/mk_rtimage.sh, cached)" >&2
        built[$label]=$(rootfs/mk_rtimage.sh "${with[@]}" "$runtime" | tail -n1)
        spec+=${spec:+,}$label=${built[$label]}
    done
    export SNAPVM_APPFS_TEST_IMAGES=$spec
fi

PYTHONDONTWRITEBYTECODE=1 "$python" appfs/tests/run.py "${args[@]}"
