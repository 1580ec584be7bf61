#!/usr/bin/env bash
# Checks a live multivm against its OpenAPI document (docs/openapi.yaml,
# served at GET /openapi.yaml) with schemathesis: no 5xx, and every status
# code, content type and response body as the document says. multivm runs
# with testguest functions (`http`, the envelope echo; `hello`), a deploy
# section whose image directory holds `hello.img`, and basic auth on
# /system/*; schemathesis has the credentials.
#
# Usage: scripts/api-fuzz.sh [SECONDS]   time budget of schemathesis (default 90)
# Fails (non-zero) on any check that fails, on multivm dying or not
# stopping cleanly; multivm is stopped on every way out.
# schemathesis (pinned below) is installed from PyPI into a venv under
# ${SNAPVM_CACHE:-~/.cache/snapvm}/venv/, made once and reused. Honours
# CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
secs=${1:-90}
# Examples per operation and phase: with the time budget, what bounds a run.
max_examples=40
say() { echo "api-fuzz: [${SECONDS}s] $*" >&2; }

cache=${SNAPVM_CACHE:-$HOME/.cache/snapvm}
venv="$cache/venv/schemathesis-$ST_VERSION"
# A venv cannot be moved once made: it is made in place and marked complete
# last, so an interrupted install is made again, not used.
if [[ ! -e $venv/.complete ]]; then
    say "installing schemathesis $ST_VERSION into $venv (once)"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    # Debian's python3 (scripts/setup.sh installs it and python3-venv).
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
    touch "$venv/.complete"
else
    say "schemathesis $ST_VERSION from $venv"
fi

say "building multivm (release) and testguest"
cargo build --release -q --bins
bin=$(realpath "${CARGO_TARGET_DIR:-target}")/release
tg=$(scripts/build-testguest.sh 2>/dev/null | tail -1)

tmp=$(mktemp -d /tmp/snapvm-api-fuzz.XXXXXX)
pid=
stop_daemon() {
    # SIGTERM drains and stops every VM; a second look after 30 s kills.
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    local code=0
    wait "$pid" || code=$?
    pid=
    return "$code"
}
cleanup() {
    stop_daemon || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A testguest appfs image: manifest lines, NUL-padded to 4 KiB.
app() {
    printf '%s\n' "${@:2}" >"$1"
    truncate -s 4096 "$1"
}
truncate -s 4096 "$tmp/rootfs.img"
mkdir -p "$tmp/apps" "$tmp/creds" "$tmp/run"
app "$tmp/http.img" fn=http
app "$tmp/hello.img" fn=hello
app "$tmp/apps/hello.img" fn=hello
user=admin
password=$(head -c 12 /dev/urandom | base64)
printf '%s\n' "$user" >"$tmp/creds/basic-auth-user"
printf '%s\n' "$password" >"$tmp/creds/basic-auth-password"
cat >"$tmp/multivm.yaml" <<EOF
kernel_path: $tg
vm_overhead: 8
boot_timeout: 20s
functions:
  http:
    runtimefs: $tmp/rootfs.img
    appfs: $tmp/http.img
    memory: 32
    min_idle: 1
  hello:
    runtimefs: $tmp/rootfs.img
    appfs: $tmp/hello.img
    memory: 32
deploy:
  state_dir: $tmp/state
  image_dir: $tmp/apps
  default_runtime: testguest
  runtimes:
    testguest:
      runtimefs: $tmp/rootfs.img
      memory: 32
EOF

say "starting multivm"
XDG_RUNTIME_DIR=$tmp/run RUST_LOG=warn "$bin/multivm" --config "$tmp/multivm.yaml" \
    --mem $((8 * 40)) --listen 127.0.0.1:0 --basic_auth_dir "$tmp/creds" \
    >"$tmp/stdout" 2>"$tmp/multivm.log" </dev/null &
pid=$!
addr=
for _ in $(seq 100); do
    addr=$(sed -n 's|^listening on http://||p' "$tmp/stdout")
    [[ -n $addr ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if [[ -z $addr ]]; then
    say "error: multivm did not start:"
    cat "$tmp/multivm.log" >&2
    exit 1
fi
say "multivm on $addr; schemathesis for at most ${secs} s, $max_examples examples per operation"

# One worker: Debian 12's Python 3.11.2 has a race in ast.parse (called by
# hypothesis while describing strategies) that two workers hit now and then
# ("AST constructor recursion depth mismatch", an error of the tool itself).
status=0
# From the scratch directory: schemathesis leaves its own files in its cwd.
(cd "$tmp" && exec "$venv/bin/st" run "http://$addr/openapi.yaml" --url "http://$addr" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --auth "$user:$password" \
    --phases examples,coverage,fuzzing \
    --max-time "$secs" --max-examples "$max_examples" \
    --workers 1 --request-timeout 30 \
    --generation-database none --no-color) ||
    status=$?

if ! kill -0 "$pid" 2>/dev/null; then
    say "error: multivm died during the run; its log:"
    tail -50 "$tmp/multivm.log" >&2
    exit 1
fi
# What reached functions (not only multivm's own 404s for made-up names).
say "invocations by function and status:"
"$venv/bin/python" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
    "http://$addr/metrics" | sed -n 's/^gateway_function_invocation_total{\(.*\)} /  \1: /p' >&2 || true
say "stopping multivm"
if ! stop_daemon; then
    say "error: multivm did not stop cleanly; its log:"
    tail -50 "$tmp/multivm.log" >&2
    exit 1
fi
if ((status != 0)); then
    say "error: schemathesis found problems (exit $status); multivm's log:"
    tail -50 "$tmp/multivm.log" >&2
    exit "$status"
fi
say "ok"
