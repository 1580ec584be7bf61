#!/usr/bin/env bash
# Writes a testguest appfs image: the manifest lines, one per line, then NUL
# padding to IMAGE_SIZE bytes (DESIGN.md: the first 512 bytes are text lines
# `fn=<name>` then optional `key=value`, NUL-padded).
set -euo pipefail

IMAGE_SIZE=4096
# The manifest must leave at least one NUL in the first sector.
MAX_MANIFEST=511

usage() {
    cat <<EOF
usage: $(basename "$0") OUT.img fn=NAME [KEY=VALUE ...]

Writes a testguest appfs image to OUT.img (atomically: temp file + rename):
the given lines, each ending in a newline, NUL-padded to $IMAGE_SIZE bytes.

  fn=NAME      the built-in function to serve (first line, required),
               e.g. fn=hello, fn=echo, fn=touch, fn=fail
  KEY=VALUE    optional settings passed to the function

NAME and KEY use letters, digits, '_', '-' and '.'; VALUE is any text
without newlines. The lines together must be under 512 bytes.

example: $(basename "$0") hello.img fn=hello
EOF
}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

if [[ $# -ge 1 && ($1 == -h || $1 == --help) ]]; then
    usage
    exit 0
fi
[[ $# -ge 2 ]] || { usage >&2; exit 2; }

out=$1
shift
[[ -n $out && $out != -* ]] || die "bad output path '$out' (see -h)"
[[ ! -d $out ]] || die "'$out' is a directory; give the image file name"
dir=$(dirname -- "$out")
[[ -d $dir ]] || die "directory '$dir' does not exist"

name_re='^[A-Za-z0-9_.-]+$'
manifest=""
first=1
for line in "$@"; do
    case $line in
    *$'\n'* | *$'\r'*) die "line '${line%%$'\n'*}...' contains a newline" ;;
    esac
    [[ $line == *=* ]] || die "'$line' is not KEY=VALUE"
    key=${line%%=*}
    value=${line#*=}
    if ((first)); then
        [[ $key == fn ]] || die "the first line must be fn=NAME, got '$line'"
        [[ $value =~ $name_re ]] || die "bad function name '$value' (letters, digits, _ - .)"
        first=0
    else
        [[ $key != fn ]] || die "fn= may appear only once, as the first line"
        [[ $key =~ $name_re ]] || die "bad key '$key' (letters, digits, _ - .)"
    fi
    manifest+="$line"$'\n'
done

# Bytes, not characters, whatever the locale.
len=$(printf '%s' "$manifest" | wc -c)
((len <= MAX_MANIFEST)) || die "manifest is $len bytes; it must be under 512"

tmp=$(mktemp -- "$out.tmp.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
printf '%s' "$manifest" >"$tmp"
truncate -s "$IMAGE_SIZE" -- "$tmp"
chmod 0644 -- "$tmp"
sync -- "$tmp" 2>/dev/null || true
mv -f -- "$tmp" "$out"
trap - EXIT
