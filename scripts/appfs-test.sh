#!/usr/bin/env bash
# Host-side tests of the example functions and the appfs builder
# (appfs/tests): every function's handle on its request file, its answers
# and its errors (python3 ones also through the guest agent's own response
# encoding, nodejs ones through node), appfs/mkappfs's images, and the
# consistency of the examples, request files and resources/multivm-example.yaml.
#
#   scripts/appfs-test.sh [-v] [PATTERN]
#
# Runs on Debian's python3 with Debian's Pillow — the interpreter and
# library the language images carry — and installs what is missing
# (python3, python3-pil, python3-yaml, e2fsprogs, nodejs). A few seconds;
# no KVM needed. The last line is "appfs: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

case ${1:-} in
-h | --help)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac

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
if ((${#install[@]})); then
    echo "appfs-test: installing ${install[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${install[@]}" >&2
fi

PYTHONDONTWRITEBYTECODE=1 exec "$python" appfs/tests/run.py "$@"
