#!/usr/bin/env bash
# Builds the read-only ext4 root image of a snapvm guest runtime (python3 or
# nodejs) from Debian packages, without loop mounts or debootstrap: apt, in
# a private configuration, resolves the runtime's packages and their
# Depends; each is unpacked with dpkg-deb -x into a staging tree (no
# maintainer scripts, no dpkg/apt/shell in the image), trimmed, completed
# with our init, helper and agent, and written by mkfs.ext4 -d, shrunk to
# its content. Cached under $SNAPVM_CACHE/rootfs by a hash of the inputs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=$(basename "$0")

usage() {
    cat <<EOF
usage: $prog [--with PACKAGE]... RUNTIME [OUT.img]

Builds the root image of RUNTIME (python3 or nodejs) and prints its
absolute path as the last line of stdout: OUT.img when given (a copy),
else the cached image (which must not be modified).

  --with PACKAGE  a further Debian package for the image (and what it
                  depends on), e.g. --with python3-pil

The image: read-only ext4 (no journal), label snapvm-RUNTIME; /sbin/init
mounts /proc, /sys, /dev, /tmp and runs the agent of rootfs/RUNTIME/, which
follows the guest protocol of DESIGN.md. Needs root (chroot, file owners),
gcc with static glibc, e2fsprogs and the Debian archive.

Environment:
  SNAPVM_CACHE           cache root (default ~/.cache/snapvm); images go to
                         \$SNAPVM_CACHE/rootfs/RUNTIME-HASH.img
  SNAPVM_REBUILD=1       build even when the cached image exists
  SNAPVM_DEBIAN_SUITE    default bookworm
  SNAPVM_DEBIAN_MIRROR   default http://deb.debian.org/debian
  SNAPVM_DEBIAN_SECURITY default http://deb.debian.org/debian-security

example: $prog --with python3-pil python3 /tmp/python3.img
EOF
}

die() {
    echo "$prog: $*" >&2
    exit 2
}
fail() {
    echo "$prog: $*" >&2
    exit 1
}
note() { echo "$prog: $*" >&2; }

extras=()
while [[ $# -ge 1 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --with)
        [[ $# -ge 2 ]] || die "--with needs a package name"
        extras+=("$2")
        shift 2
        ;;
    --with=*)
        extras+=("${1#--with=}")
        shift
        ;;
    -*) die "unknown option '$1' (see -h)" ;;
    *) break ;;
    esac
done
[[ $# -ge 1 && $# -le 2 ]] || { usage >&2; exit 2; }
runtime=$1
out=${2:-}
case $runtime in
python3 | nodejs) ;;
*) die "unknown runtime '$runtime' (python3 or nodejs; see -h)" ;;
esac
if [[ -n $out ]]; then
    [[ $out != -* ]] || die "bad output path '$out' (see -h)"
    [[ ! -d $out ]] || die "'$out' is a directory; give the image file name"
    [[ -d $(dirname -- "$out") ]] || die "directory '$(dirname -- "$out")' does not exist"
fi
for p in "${extras[@]}"; do
    [[ $p =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || die "'$p' is not a Debian package name"
done

suite=${SNAPVM_DEBIAN_SUITE:-bookworm}
mirror=${SNAPVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${SNAPVM_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}/rootfs
# Unpacked but left out of the image: the packaging machinery, and perl,
# which only mailcap (through mime-support) pulls in.
exclude=" dpkg tar debconf perl perl-base perl-modules-5.36 libperl5.36 mailcap mime-support "

# --- the cache key: everything the image is made of -----------------------
inputs=("$here/mk_rtimage.sh" "$here"/guest/*.[ch] "$here/$runtime"/*)
hash=$(
    {
        printf '%s\n' "$suite" "$mirror" "$security" "${extras[@]}"
        for f in "${inputs[@]}"; do
            printf '== %s\n' "${f#"$here"/}"
            cat -- "$f"
        done
    } | sha256sum | cut -c1-16
)
label=$runtime
for p in "${extras[@]}"; do label+=+$p; done
img=$cache/$label-$hash.img

emit() {
    if [[ -z $out ]]; then
        echo "$img"
        return
    fi
    local tmp
    tmp=$(mktemp -- "$out.tmp.XXXXXX")
    cp --reflink=auto --sparse=always -- "$img" "$tmp"
    chmod 0644 -- "$tmp"
    mv -f -- "$tmp" "$out"
    realpath -- "$out"
}

mkdir -p "$cache"
exec 9>"$cache/.$label.lock"
flock 9
if [[ -s $img && -z ${SNAPVM_REBUILD:-} ]]; then
    note "cached: $img"
    emit
    exit 0
fi

# --- tools ---------------------------------------------------------------
[[ $(id -u) == 0 ]] || fail "run as root: the image's files must be root's, and the checks chroot"
missing=()
command -v gcc >/dev/null || missing+=(gcc)
[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || missing+=(libc6-dev)
command -v mkfs.ext4 >/dev/null && command -v resize2fs >/dev/null || missing+=(e2fsprogs)
[[ -e $keyring ]] || missing+=(debian-archive-keyring)
if ((${#missing[@]})); then
    note "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

start=$(date +%s)
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
staging=$work/root

# --- packages: a private apt (own lists, status and archive cache) --------
aptdir=$cache/apt
mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial" "$aptdir/empty"
apt_opts=(
    -o "Dir::State=$aptdir" -o "Dir::State::Lists=$aptdir/lists"
    -o "Dir::State::status=$aptdir/status"
    -o "Dir::State::extended_states=$aptdir/extended_states"
    -o "Dir::Cache=$aptdir" -o "Dir::Cache::Archives=$aptdir/archives"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
    -o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/empty"
    -o "Dir::Etc::Preferences=$aptdir/empty/none" -o "Dir::Etc::PreferencesParts=$aptdir/empty"
    -o "APT::Architecture=amd64" -o "APT::Architectures=amd64"
    -o "APT::Install-Recommends=false" -o "APT::Install-Suggests=false"
    -o "APT::Sandbox::User=root" -o "Acquire::Languages=none"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
)
mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/$runtime/packages")
wanted+=("${extras[@]}")
(
    flock 8
    cat >"$aptdir/sources.list" <<EOF
deb [signed-by=$keyring] $mirror $suite main
deb [signed-by=$keyring] $mirror $suite-updates main
deb [signed-by=$keyring] $security $suite-security main
EOF
    : >"$aptdir/status"
    note "resolving ${wanted[*]} in $suite"
    apt-get "${apt_opts[@]}" -qq update >&2 ||
        fail "apt-get update failed: is $mirror reachable?"
    apt-get "${apt_opts[@]}" -s install "${wanted[@]}" >"$work/plan" ||
        fail "apt cannot resolve ${wanted[*]} in $suite"
    apt-get "${apt_opts[@]}" -qq -y --download-only install "${wanted[@]}" >&2 ||
        fail "downloading the packages failed"
) 8>"$aptdir/.lock"
# "Inst NAME (VERSION SUITES [ARCH])"
sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) .*/\1 \2/p' "$work/plan" | sort >"$work/packages"
[[ -s $work/packages ]] || fail "apt planned no packages for ${wanted[*]}"

mkdir -p "$staging"
while read -r pkg ver; do
    [[ $exclude == *" $pkg "* ]] && continue
    debs=("$aptdir/archives/${pkg}_${ver//:/%3a}_"*.deb)
    [[ -e ${debs[0]} ]] || fail "$pkg $ver was not downloaded"
    dpkg-deb -x "${debs[0]}" "$staging"
done <"$work/packages"

# Debian 12 ships files under /bin, /lib, ... as well as /usr; the image is
# merged-/usr like a Debian 12 install.
for d in bin sbin lib lib64; do
    if [[ -d $staging/$d && ! -L $staging/$d ]]; then
        mkdir -p "$staging/usr/$d"
        cp -a "$staging/$d/." "$staging/usr/$d/"
        rm -rf -- "${staging:?}/$d"
    fi
    mkdir -p "$staging/usr/$d"
    ln -s "usr/$d" "$staging/$d"
done

# --- trim: documentation, manuals, translations (licences stay) -----------
# Also glibc's iconv modules (8 MiB): neither runtime converts through iconv
# (Python has its own codecs, node uses ICU; UTF-8, ASCII, Latin-1 and UCS
# are built into glibc), and Python's help() texts.
rm -rf -- "$staging"/usr/share/{man,info,locale,lintian,bug,menu,bash-completion,gdb} \
    "$staging"/usr/share/doc-base "$staging"/usr/lib/x86_64-linux-gnu/pkgconfig \
    "$staging"/usr/lib/x86_64-linux-gnu/gconv \
    "$staging"/usr/include "$staging"/etc/cron.* "$staging"/etc/logrotate.d \
    "$staging"/usr/lib/python3.*/{idlelib,turtledemo,test,lib2to3/tests,pydoc_data} \
    "$staging"/var/cache/* "$staging"/var/lib/dpkg
find "$staging/usr/share/doc" -type f ! -name copyright -delete 2>/dev/null || true
find "$staging/usr/share/doc" -depth -type d -empty -delete 2>/dev/null || true

# --- ours: init + helper (static), agent, configuration -----------------
gcc_flags=(-Os -Wall -Wextra -Werror -I "$here/guest")
mkdir -p "$staging/usr/lib/snapvm" "$staging/etc/snapvm"
gcc -static -s "${gcc_flags[@]}" -o "$staging/usr/lib/snapvm/snapvm-guest" \
    "$here/guest/snapvm-guest.c" "$here/guest/guestops.c"
ln -sf ../lib/snapvm/snapvm-guest "$staging/usr/sbin/init"
ln -sf usr/lib/snapvm/snapvm-guest "$staging/init"
install -m 0644 "$here/$runtime/agent.argv" "$here/$runtime/agent.env" "$staging/etc/snapvm/"
case $runtime in
python3)
    install -m 0644 "$here/python3/agent.py" "$staging/usr/lib/snapvm/agent.py"
    ;;
nodejs)
    install -m 0644 "$here/nodejs/agent.js" "$staging/usr/lib/snapvm/agent.js"
    # Debian's node loads this bundle at start-up and warns without it; it
    # is what update-ca-certificates would write.
    mkdir -p "$staging/etc/ssl/certs"
    cat "$staging"/usr/share/ca-certificates/mozilla/*.crt >"$staging/etc/ssl/certs/ca-certificates.crt"
    # N-API headers of the image's own node, from its libnode-dev package.
    nodever=$(awk '$1 == "nodejs" {print $2}' "$work/packages")
    headers=$aptdir/node-headers-${nodever//:/%3a}
    if [[ ! -e $headers/usr/include/node/node_api.h ]]; then
        (
            flock 8
            cd "$aptdir/archives"
            apt-get "${apt_opts[@]}" -qq download "libnode-dev=$nodever" >&2
        ) 8>"$aptdir/.lock"
        rm -rf -- "$headers.tmp"
        dpkg-deb -x "$aptdir/archives/libnode-dev_${nodever//:/%3a}_amd64.deb" "$headers.tmp"
        mv -- "$headers.tmp" "$headers"
    fi
    # Dynamically linked (node loads it), against glibc symbols old enough
    # for the image's glibc.
    gcc -shared -fPIC -s "${gcc_flags[@]}" -I "$headers/usr/include/node" \
        -o "$staging/usr/lib/snapvm/snapvm_vsock.node" \
        "$here/nodejs/snapvm_vsock.c" "$here/guest/guestops.c"
    ;;
esac

# The rest of a root file system: mount points, accounts, loader cache.
mkdir -p "$staging"/{proc,sys,dev,tmp,srv,run,root,etc,var/tmp}
chmod 1777 "$staging/tmp" "$staging/var/tmp"
chmod 0700 "$staging/root"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$staging/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$staging/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$staging/etc/hosts"
printf 'snapvm\n' >"$staging/etc/hostname"
# A networked VM's name server is its gateway, whose namespace forwards
# DNS to the controller's resolver (src/network.rs); without a network
# nothing answers, as for any other address.
printf 'nameserver 172.16.0.1\noptions timeout:2 attempts:2\n' >"$staging/etc/resolv.conf"
printf 'include /etc/ld.so.conf.d/*.conf\n' >"$staging/etc/ld.so.conf"
ldconfig -r "$staging"
sort "$work/packages" | awk -v ex="$exclude" 'index(ex, " " $1 " ") == 0' \
    >"$staging/etc/snapvm/packages"

# --- checks in the staged tree (chroot: the image's own runtime) ---------
smoke() {
    chroot "$staging" "$@" >/dev/null || fail "check failed in the image: $*"
}
smoke /usr/lib/snapvm/snapvm-guest --help
case $runtime in
python3)
    # Byte code for everything, checked against nothing: the image is
    # read-only, so the sources never change under it.
    chroot "$staging" /usr/bin/python3 -m compileall -q -j 1 \
        --invalidation-mode unchecked-hash /usr/lib/python3 /usr/lib/python3.* \
        /usr/lib/snapvm >/dev/null ||
        fail "compiling the image's python byte code failed"
    smoke /usr/bin/python3 -c 'import socket, fcntl, json, subprocess, asyncio
assert socket.AF_VSOCK, "no AF_VSOCK"
import importlib.util, sys
sys.argv = ["agent"]
spec = importlib.util.spec_from_file_location("agent", "/usr/lib/snapvm/agent.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))'
    ;;
nodejs)
    smoke /usr/bin/node -e 'const a = require("/usr/lib/snapvm/snapvm_vsock.node");
for (const f of ["connectVsock", "connectUnix", "seedRng", "setRealtime"])
  if (typeof a[f] !== "function") throw new Error("addon lacks " + f);
require("vm").compileFunction(require("fs").readFileSync("/usr/lib/snapvm/agent.js", "utf8"));'
    ;;
esac

# --- the image ---------------------------------------------------------------
uuid=$(printf '%s' "$hash" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
files=$(find "$staging" | wc -l)
kib=$(du -sk --apparent-size "$staging" | cut -f1)
tmpimg=$work/image
mkimage() { # SIZE_IN_4K_BLOCKS
    rm -f -- "$tmpimg"
    mkfs.ext4 -q -F -t ext4 -b 4096 -m 0 -N $((files + files / 20 + 32)) \
        -O ^has_journal,^resize_inode -L "snapvm-$runtime" -U "$uuid" \
        -E "root_owner=0:0,hash_seed=$uuid,nodiscard" -d "$staging" "$tmpimg" "$1" \
        >"$work/mkfs.log" 2>&1
}
# Generous first, to measure; then the measured size plus a little (a
# read-only image needs no free space), growing if mkfs runs out.
blocks=$(((kib + kib / 4) / 4 + files + 4096))
mkimage "$blocks" || { cat "$work/mkfs.log" >&2; fail "mkfs.ext4 failed"; }
used=$(dumpe2fs -h "$tmpimg" 2>/dev/null | awk -F: '
    /^Block count/ {n = $2} /^Free blocks/ {f = $2} END {print n - f}')
blocks=$((used + used / 100 + 64))
made=0
for _ in 1 2 3 4 5 6; do
    if mkimage "$blocks"; then
        made=1
        break
    fi
    blocks=$((blocks + blocks / 20))
done
((made)) || { cat "$work/mkfs.log" >&2; fail "mkfs.ext4 failed"; }
e2fsck -fn "$tmpimg" >/dev/null 2>&1 || fail "the new image does not pass e2fsck"
cp -- "$staging/etc/snapvm/packages" "$img.packages"
mv -f -- "$tmpimg" "$img"
# Keep only the newest build of this runtime with these extras.
for old in "$cache/$label"-????????????????.img; do
    [[ $old == "$img" ]] || rm -f -- "$old" "$old.packages"
done
note "built $img: $(( $(stat -c %s "$img") / 1048576 )) MiB, $(wc -l <"$img.packages") packages, $(( $(date +%s) - start )) s"
emit
