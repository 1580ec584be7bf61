#!/usr/bin/env bash
# Builds the snapvm guest kernel: an uncompressed x86_64 vmlinux from
# Debian's linux-source-6.1 package, `make tinyconfig` plus our config
# fragment (resources/kernel/snapvm.config).
#
#   scripts/build-kernel.sh
#
# Prints the absolute path of the vmlinux as the last line of stdout;
# progress goes to stderr, the full build log to the build directory.
# Results are cached under $SNAPVM_CACHE/kernel (default
# ~/.cache/snapvm/kernel), keyed by the source package version, the
# compiler and the fragments: a second run prints the cached
# path at once. Fails, naming them, if any fragment option is missing from
# the final .config.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-kernel: unknown argument $1 (usage: $0)" >&2; exit 2 ;;
esac

SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/$SRC_PKG.tar.xz
BUILD_DEPS=(bc bison flex libelf-dev libssl-dev make gcc xz-utils)
# Bump when a change here changes what gets built.
SCRIPT_KEY=2

t0=$SECONDS
say() { printf 'build-kernel [%4ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { echo "build-kernel: error: $*" >&2; exit 1; }

fragments=("$repo"/resources/kernel/*.config)
for f in "${fragments[@]}"; do
    [[ -f $f ]] || die "missing input $f"
done

# --- Packages ----------------------------------------------------------------
missing=()
for p in "$SRC_PKG" "${BUILD_DEPS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
[[ -f $SRC_TARBALL ]] || die "$SRC_TARBALL is missing although $SRC_PKG is installed"
src_version="$(dpkg-query -W -f '${Version}' "$SRC_PKG")"

# --- Cache key ---------------------------------------------------------------
cache="${SNAPVM_CACHE:-$HOME/.cache/snapvm}/kernel"
key="$({
    echo "script $SCRIPT_KEY source $SRC_PKG $src_version"
    gcc --version | head -n1
    for f in "${fragments[@]}"; do
        echo "== ${f#"$repo"/}"
        cat "$f"
    done
} | sha256sum | cut -c1-16)"
out="$cache/vmlinux-$src_version-$key"
if [[ -f $out ]]; then
    say "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [[ -f $out ]]; then # built by someone else while we waited
    echo "$out"
    exit 0
fi

# --- Source trees ------------------------------------------------------------
# Unpacked once per package version.
srctree="$cache/src/$src_version"
if [[ ! -f $srctree/.snapvm-unpacked ]]; then
    say "unpacking $SRC_TARBALL"
    rm -rf "$srctree" "$srctree.tmp"
    mkdir -p "$srctree.tmp"
    tar -xJf "$SRC_TARBALL" -C "$srctree.tmp" --strip-components=1
    touch "$srctree.tmp/.snapvm-unpacked"
    mv "$srctree.tmp" "$srctree"
fi

# --- Configure ---------------------------------------------------------------
# One object directory per source tree: a fragment change rebuilds
# incrementally.
objtree="$cache/build/$(basename "$srctree")"
mkdir -p "$objtree"
log="$objtree/build.log"
: >"$log"
kmake() {
    nice make -C "$srctree" O="$objtree" ARCH=x86_64 "$@" >>"$log" 2>&1 ||
        { tail -n 40 "$log" >&2; die "make $* failed (log: $log)"; }
}
say "configuring: tinyconfig + ${fragments[*]#"$repo"/}"
kmake tinyconfig
"$srctree/scripts/kconfig/merge_config.sh" -m -O "$objtree" "$objtree/.config" "${fragments[@]}" >>"$log" 2>&1 ||
    die "merge_config.sh failed (log: $log)"
kmake olddefconfig

# Every fragment line must have survived olddefconfig: an option whose
# dependencies are not met is silently dropped by Kconfig.
missing=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF -- "$line" "$objtree/.config" || {
            got="$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$objtree/.config" || echo "absent")"
            missing+=("$line (got: $got)")
        }
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        if grep -qE "^${BASH_REMATCH[1]}=" "$objtree/.config"; then
            missing+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$objtree/.config"))")
        fi
    fi
done < <(cat "${fragments[@]}")
if ((${#missing[@]})); then
    echo "build-kernel: error: these fragment options are not in the final .config:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

# --- Build -------------------------------------------------------------------
jobs="$(nproc)"
say "building vmlinux with $jobs jobs (log: $log)"
kmake -j"$jobs" vmlinux
[[ -f $objtree/vmlinux ]] || die "make succeeded but $objtree/vmlinux is missing"
cp "$objtree/vmlinux" "$out.tmp"
cp "$objtree/.config" "$out.config"
mv "$out.tmp" "$out"
say "done: $(du -h "$out" | cut -f1) vmlinux ($src_version)"
echo "$out"
