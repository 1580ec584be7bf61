#!/usr/bin/env bash
# The emulated KVM host: runs a command on a real KVM that runs Linux
# guests, on any x86_64 machine. Debian's stock kernel (linux-image-amd64,
# unpacked into the cache, never installed as this host's kernel) boots
# under QEMU TCG with nested SVM (-cpu max) and loads irqbypass, ccp, kvm
# and kvm-amd; its /dev/kvm is the kvm_amd users run, only slower.
#
#   scripts/kvm-host.sh [--timeout SECS] [--stall SECS] [--mem MiB] [--smp N]
#                       [--payload DIR] [--out DIR] -- COMMAND [ARG...]
#
# Inside, DIR (--payload) is /payload and the working directory; COMMAND
# runs there as root with bash, GNU coreutils, grep, sed, util-linux's
# flock and busybox, and the glibc our Rust binaries link against; /tmp is
# a tmpfs. Its stdout and stderr stream to ours live; what it writes under
# /out comes back into --out DIR. Exit status: COMMAND's; 124 when the run
# exceeded --timeout (default 900 s; QEMU is killed, nothing is left
# running); 125 when the emulated host failed (no /dev/kvm inside, a
# kernel panic, QEMU died, or it stopped making progress), with the reason
# on stderr. Progress: the emulated host's user space prints a heartbeat on
# its console every 10 s; QEMU TCG now and then wedges the whole emulated
# host (soft lockups, then silence), and a console silent for --stall
# seconds (default 120; 0 = never) or a kernel lockup report stops the
# run. A command that hangs while the emulated host lives runs into its
# own limits or --timeout instead: it is the command's failure.
#
# The kernel package and the base initramfs are cached under
# $SNAPVM_CACHE/kvm-host (default ~/.cache/snapvm): IMAGE-KEY/{vmlinuz,
# vmlinux,initramfs.cpio}, keyed by the package version, busybox's and
# this script's; resolved-KEY remembers which package linux-image-amd64
# means for as long as apt's lists stay the same. The kernel boots from
# its decompressed vmlinux through QEMU's PVH entry (3.5 s faster than the
# bzImage under TCG). The payload travels as a second, uncompressed cpio
# archive appended to the cached one (the kernel unpacks both into its
# rootfs: measured the fastest start and fastest reads, no guest-side
# drivers needed; a 300 MB payload costs ~2.5 s). Output comes back over
# two more serial ports (stderr, and /out as a base64 tar stream), so no
# virtio driver is loaded either.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

timeout=900 stall=120 mem=3072 smp=2 payload= out=
usage() { sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
    --timeout) timeout=${2:?}; shift 2 ;;
    --stall) stall=${2:?}; shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    --smp) smp=${2:?}; shift 2 ;;
    --payload) payload=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "kvm-host: unknown argument '$1' (see -h)" >&2; exit 2 ;;
    esac
done
(($#)) || { echo "kvm-host: no command (usage: $0 [options] -- COMMAND [ARG...])" >&2; exit 2; }
[[ $timeout =~ ^[1-9][0-9]*$ ]] || { echo "kvm-host: --timeout must be seconds" >&2; exit 2; }
[[ $stall =~ ^[0-9]+$ ]] || { echo "kvm-host: --stall must be seconds" >&2; exit 2; }
[[ -z $payload || -d $payload ]] || { echo "kvm-host: --payload $payload is not a directory" >&2; exit 2; }

t0=$SECONDS
say() { printf 'kvm-host [%4ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { echo "kvm-host: error: $*" >&2; exit 125; }

# --- Packages ------------------------------------------------------------------
# QEMU 10 or newer: Debian 12's own QEMU 7.2 wedged the emulated host (no
# progress, both TCG threads busy) in most runs of the Linux suite; 10.0
# from bookworm-backports has not so far (see the README's Tests). On
# Debian 12 it comes from bookworm-backports, which this adds to apt's
# sources; newer releases carry it.
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
missing=() from=()
for p in busybox-static cpio; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if (($(qemu_major || true) + 0 < 10)); then
    missing+=(qemu-system-x86)
    if [[ $(. /etc/os-release && echo "${VERSION_CODENAME:-}") == bookworm ]]; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" >/etc/apt/sources.list.d/snapvm-backports.list
        from=(-t bookworm-backports)
    fi
fi
if ((${#missing[@]})); then
    say "installing ${missing[*]}${from[*]:+ (QEMU from ${from[1]})}"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${from[@]}" "${missing[@]}" >&2 ||
        die "cannot install ${missing[*]}"
fi
(($(qemu_major || true) + 0 >= 10)) || die "QEMU 10 or newer is needed (qemu-system-x86_64 --version: $(qemu-system-x86_64 --version 2>&1 | head -n1))"

# linux-image-amd64 is a metapackage: the image is what it depends on.
# apt-cache takes over a second, so the answer is remembered for as long as
# apt's package lists stay the same.
cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}/kvm-host
mkdir -p "$cache"
resolve() {
    image_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
    image_ver=
    [[ -z $image_pkg ]] || image_ver=$(apt-cache policy "$image_pkg" | sed -n 's/^ *Candidate: //p')
}
lists_key=$(ls -l --full-time /var/lib/apt/lists/ /etc/apt/sources.list* /etc/apt/preferences* 2>/dev/null |
    sha256sum | cut -c1-16)
if [[ -f $cache/resolved-$lists_key ]] &&
    read -r image_pkg image_ver 2>/dev/null <"$cache/resolved-$lists_key" && [[ -n $image_ver ]]; then
    :
else
    resolve
    if [[ -z $image_pkg || -z $image_ver || $image_ver == "(none)" ]]; then
        say "updating apt's package lists to find linux-image-amd64"
        apt-get update -qq >&2 || true
        resolve
    fi
    [[ -n $image_pkg ]] ||
        die "cannot resolve Debian's linux-image-amd64 to a kernel package (apt-cache depends linux-image-amd64)"
    [[ -n $image_ver && $image_ver != "(none)" ]] ||
        die "$image_pkg has no installable version in apt's sources (apt-cache policy $image_pkg)"
    rm -f "$cache"/resolved-????????????????
    # Keyed by the lists as they are now (apt-get update above changed them).
    lists_key=$(ls -l --full-time /var/lib/apt/lists/ /etc/apt/sources.list* /etc/apt/preferences* 2>/dev/null |
        sha256sum | cut -c1-16)
    echo "$image_pkg $image_ver" >"$cache/resolved-$lists_key.$$"
    mv "$cache/resolved-$lists_key.$$" "$cache/resolved-$lists_key"
fi

# --- Cache: the kernel, its modules, the base initramfs -----------------------------
# (This whole script is in the key: any edit rebuilds, in about 10 s.)
key=$(printf '%s\n' "$(sha256sum <"$0")" "$image_pkg $image_ver" "$(dpkg-query -W -f '${Version}' busybox-static)" |
    sha256sum | cut -c1-16)
base=$cache/$image_pkg-$key
mkdir -p "$cache"
if [[ ! -f $base/initramfs.cpio ]]; then
    exec 9>"$cache/.lock"
    flock 9
fi
if [[ ! -f $base/initramfs.cpio ]]; then
    say "building the emulated host: $image_pkg $image_ver (once; cached in $base)"
    tmp=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download "$image_pkg=$image_ver" >/dev/null 2>&1) ||
        die "cannot download $image_pkg $image_ver from the Debian archive"
    dpkg-deb -x "$tmp"/"$image_pkg"_*.deb "$tmp/pkg"
    kver=${image_pkg#linux-image-}
    root=$tmp/root
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,proc,sys,dev,tmp,out,payload,root,etc}
    # KVM, and what VMs' networks use (src/network.rs: TAPs, veth pairs,
    # nftables NAT): each module after the ones it depends on, in the
    # order /init loads them (lib/modules/order).
    mods=$tmp/pkg/lib/modules/$kver/kernel
    declare -A loaded=()
    add_module() { # NAME [optional]
        local name=${1//-/_} f dep
        [[ -z ${loaded[$name]:-} ]] || return 0
        loaded[$name]=1
        f=$(find "$mods" -name "$name.ko*" -o -name "${name//_/-}.ko*" | head -n1)
        [[ -n $f || -z ${2:-} ]] || return 0
        [[ -n $f ]] || die "$image_pkg has no module $name"
        if [[ $f == *.xz ]]; then xz -dc "$f" >"${f%.xz}"; f=${f%.xz}; fi
        for dep in $(modinfo -F depends "$f" | tr , ' '); do add_module "$dep"; done
        cp "$f" "$root/lib/modules/$name.ko"
        echo "$name" >>"$root/lib/modules/order"
    }
    for m in irqbypass ccp kvm kvm-amd tun veth; do
        add_module "$m"
    done
    # libcrc32c (nf_tables, nf_conntrack) asks the crypto API for crc32c
    # (a soft dependency modinfo does not list): built in on some kernels.
    add_module crc32c_generic optional
    for m in nf_tables nft_chain_nat nft_masq nft_nat nft_ct; do
        add_module "$m"
    done
    cp "$tmp/pkg/boot/vmlinuz-$kver" "$base.vmlinuz.tmp"
    # busybox for everything else, GNU tools first on PATH (scripts use
    # their long options), with every shared library they and our Rust
    # binaries need.
    cp /bin/busybox "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list); do
        [[ -e $root/bin/$a ]] || ln -s busybox "$root/bin/$a"
    done
    # (ip and nft: the VMs' networks and the tests' upstream namespaces.)
    tools=(/bin/bash /usr/bin/flock /usr/bin/cmp /bin/grep /bin/sed /usr/bin/find /usr/sbin/ip /usr/sbin/nft)
    mapfile -t -O "${#tools[@]}" tools < <(dpkg -L coreutils | grep -E '^/(usr/)?bin/[^/]+$')
    for t in "${tools[@]}"; do
        [[ -f $t ]] && cp "$t" "$root/usr/bin/"
    done
    [[ -f $root/usr/bin/nft && -f $root/usr/bin/ip ]] || die "ip and nft are needed (scripts/setup.sh installs iproute2 and nftables)"

    libs=$(for t in "${tools[@]}" "$repo"/target/release/firerunner; do ldd "$t" 2>/dev/null; done |
        grep -oE '/[^ ]+\.so[^ ]*' | sort -u)
    for l in $libs /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/libm.so.6; do
        [[ -e $l ]] || continue
        mkdir -p "$root$(dirname "$l")"
        cp -L "$l" "$root$l"
    done
    [[ -e $root/lib64/ld-linux-x86-64.so.2 ]] || die "the dynamic loader was not found by ldd"
    cat >"$root/init" <<'EOF'
#!/bin/sh
# PID 1 of the emulated KVM host (scripts/kvm-host.sh).
export PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root TMPDIR=/tmp
# The serial ports look like terminals: no colour codes in logs.
export RUST_LOG_STYLE=never TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=75% tmp /tmp
# What devtmpfs leaves out and shells rely on (process substitution).
ln -s /proc/self/fd /dev/fd
ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
# cgroup2 for the jail (src/jail/cgroup.rs): each VM's memory, pids and cpu
# limits. The jailer enables those controllers for its subtree.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Loopback, for servers the command starts (multivm).
ip link set lo up
# ttyS0: the command's stdout, ttyS1: its stderr, ttyS2: exit status and
# /out for the host (ttyS3 is the kernel's console). Raw, so that bytes
# pass unchanged.
for t in 0 1 2; do stty -F /dev/ttyS$t raw -echo 2>/dev/null; done
report() { # STATUS: hand the status and /out to the host, power off
    { echo "exit $1"; tar -C /out -cf - . | base64; echo "kvm-host: end of report"; } >/dev/ttyS2
    sync
    # The serial ports drain asynchronously: give them time to empty.
    sleep 1
    poweroff -f
}
while read -r m; do
    insmod /lib/modules/$m.ko 2>/dev/ttyS1 || echo "kvm-host: insmod $m failed" >/dev/ttyS1
done </lib/modules/order
if [ ! -c /dev/kvm ]; then
    { echo "kvm-host: no /dev/kvm inside the emulated host; the kernel said:"
      dmesg | grep -iE 'kvm|svm|virtuali' | tail -n 20; } >/dev/ttyS1
    report 125
fi
# The heartbeat the host watches (a wedged emulated host stops printing).
(while :; do echo "kvm-host: alive $(cut -d' ' -f1 /proc/uptime)"; sleep 10; done) >/dev/ttyS3 &
cd /payload
bash /command.sh </dev/null >/dev/ttyS0 2>/dev/ttyS1
report $?
EOF
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet) >"$tmp/initramfs.cpio"
    mkdir -p "$base.tmp"
    mv "$base.vmlinuz.tmp" "$base.tmp/vmlinuz"
    mv "$tmp/initramfs.cpio" "$base.tmp/initramfs.cpio"
    rm -rf "$base" "$cache"/linux-image-*-????????????????   # older builds
    mv "$base.tmp" "$base"
    rm -rf "$tmp"
    trap - EXIT
    say "emulated host ready: $(du -sh "$base" | cut -f1)"
fi
exec 9>&- # the build lock, if taken: not held for the run

# The kernel's own ELF, decompressed once: QEMU boots it through its PVH
# entry point (CONFIG_PVH), which skips the firmware's real-mode loader and
# the xz decompression that take ~3.5 s under TCG (measured: QEMU start ->
# the command running 3.5 s instead of 7 s). Falls back to the bzImage.
kernel=$base/vmlinuz
if [[ ! -f $base/vmlinux && ! -f $base/no-vmlinux ]]; then
    exec 9>"$cache/.lock"
    flock 9
    if [[ ! -f $base/vmlinux && ! -f $base/no-vmlinux ]]; then
        off=$(LC_ALL=C grep -abo $'\xfd7zXZ\x00' "$base/vmlinuz" | head -n1 | cut -d: -f1)
        if [[ -n $off ]] && tail -c +"$((off + 1))" "$base/vmlinuz" | xz -dc 2>/dev/null >"$base/vmlinux.$$"
            [[ $(head -c4 "$base/vmlinux.$$" 2>/dev/null | od -An -tx1 | tr -d ' ') == 7f454c46 ]] &&
            readelf -n "$base/vmlinux.$$" 2>/dev/null | grep -q 'Xen.*0x00000012'; then
            mv "$base/vmlinux.$$" "$base/vmlinux"
        else
            rm -f "$base/vmlinux.$$"
            say "warning: cannot unpack a PVH vmlinux from the kernel image; booting the bzImage (slower)"
            touch "$base/no-vmlinux"
        fi
    fi
    exec 9>&-
fi
[[ ! -f $base/vmlinux ]] || kernel=$base/vmlinux

# --- This run: the payload and the command, as a second archive --------------
run=$(mktemp -d)
qemu_pid= watcher_pid=
cleanup() {
    # qemu_pid is timeout's: a TERM makes it pass the TERM on to QEMU (a
    # KILL would leave QEMU running), and waiting for it makes sure QEMU is
    # gone before its files are.
    [[ -z $watcher_pid ]] || kill "$watcher_pid" 2>/dev/null || true
    if [[ -n $qemu_pid ]]; then
        kill -TERM "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
        # Stopped from outside mid-run (a caller's stall watchdog): keep
        # the emulated host's console, as for any other failed run.
        if [[ -n $out && -s $run/console ]]; then
            mkdir -p "$out" && cp "$run/console" "$out/kvm-host-console.log" || true
        fi
    fi
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir "$run/archive"
printf 'exec' >"$run/archive/command.sh"
printf ' %q' "$@" >>"$run/archive/command.sh"
echo >>"$run/archive/command.sh"
if [[ -n $payload ]]; then
    ln -s "$(cd "$payload" && pwd)" "$run/archive/payload"
fi
# One pass: the cached base, then the payload's archive (1 MiB blocks, twice
# as fast as cpio's default; the kernel skips the zeros padding its end).
{
    cat "$base/initramfs.cpio"
    (cd "$run/archive" && find -L . -mindepth 1 | cpio -o -H newc -L --quiet --block-size=2048)
} >"$run/initramfs.cpio" || die "cannot pack the payload $payload"
say "booting the emulated host (QEMU TCG, -cpu max, $smp CPUs, $mem MiB; payload $(du -sh "$run/initramfs.cpio" | cut -f1); limit ${timeout}s)"

# The command's stdout and stderr reach ours through two serial ports
# (FIFOs copied by cat, which writes through our own descriptors); the
# third carries the exit status and /out, the fourth the kernel's console.
mkfifo "$run/stdout" "$run/stderr"
cat "$run/stdout" &
cat "$run/stderr" >&2 &
timeout --kill-after=5 "$timeout" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp "$smp" -m "$mem" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$kernel" -initrd "$run/initramfs.cpio" \
    -append "console=ttyS3 loglevel=${KVM_HOST_LOGLEVEL:-4} panic=-1 rdinit=/init" \
    -serial "file:$run/stdout" -serial "file:$run/stderr" \
    -serial "file:$run/report" -serial "file:$run/console" </dev/null &
qemu_pid=$!
# Once the report is complete the run is over: if the emulated host then
# fails to power off (TCG now and then wedges; seen at "reboot: Power
# down"), QEMU is stopped here rather than at the time limit. A wedged
# emulated host (no heartbeat for $stall s, or its kernel reports a
# lockup) is stopped too, and the reason left in $run/wedged.
(
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if [[ $(tail -n1 "$run/report" 2>/dev/null) == "kvm-host: end of report" ]]; then
            for _ in $(seq 20); do kill -0 "$qemu_pid" 2>/dev/null || exit 0; sleep 0.5; done
            echo "kvm-host: the emulated host did not power off; stopping QEMU" >&2
            kill -TERM "$qemu_pid" 2>/dev/null
            exit 0
        fi
        wedged=
        if ((stall)) && (($(date +%s) - $(stat -c %Y "$run/console" 2>/dev/null || date +%s) > stall)); then
            wedged="no heartbeat for ${stall}s"
        elif grep -qE 'soft lockup|hard LOCKUP|rcu_.*self-detected stall' "$run/console" 2>/dev/null; then
            wedged="its kernel reported a lockup"
        fi
        if [[ -n $wedged ]]; then
            echo "$wedged" >"$run/wedged"
            kill -TERM "$qemu_pid" 2>/dev/null
            exit 0
        fi
        sleep 1
    done
) &
watcher_pid=$!
status=0
wait "$qemu_pid" || status=$?
qemu_pid=
kill "$watcher_pid" 2>/dev/null || true
wait "$watcher_pid" 2>/dev/null || true
wait # for the two cats
# The emulated host's own console, shown and kept when it failed.
console_tail() {
    echo "kvm-host: the emulated host's console ends with:" >&2
    grep -v '^kvm-host: alive ' "$run/console" | tail -n 40 >&2 || true
    if [[ -n $out ]]; then
        mkdir -p "$out" && cp "$run/console" "$out/kvm-host-console.log" &&
            echo "kvm-host: its whole console: $out/kvm-host-console.log" >&2
    fi
}
if ((status == 124 || status == 137)); then
    console_tail
    echo "kvm-host: error: the run exceeded its limit of ${timeout}s; QEMU was stopped" >&2
    exit 124
fi
if [[ -f $run/wedged ]]; then
    console_tail
    die "the emulated host stopped making progress ($(cat "$run/wedged")); QEMU TCG wedged, QEMU was stopped"
fi
((status == 0)) || { console_tail; die "QEMU failed (exit status $status)"; }
first=$(head -n1 "$run/report")
if [[ ! $first =~ ^exit\ ([0-9]+)$ ]]; then
    console_tail
    die "the emulated host stopped without reporting the command's status"
fi
code=${BASH_REMATCH[1]}
if [[ -n $out ]]; then
    mkdir -p "$out"
    sed '1d; /^kvm-host: end of report$/,$d' "$run/report" | base64 -d | tar -C "$out" -xf - ||
        echo "kvm-host: warning: cannot unpack /out into $out" >&2
fi
say "done: the command exited $code"
exit "$code"
