#!/usr/bin/env bash
# Profiles the hottest data-plane scenario, S1 (small GETs over keep-alive connections,
# user TLS -> sallyport-proxy -> HTTP/2 tunnel -> sallyport-connector -> plain HTTP/1.1
# backend), on loopback, with the same processes and flags as `sallyport-bench dataplane`.
#
#   bench/profile.sh callgrind     # instructions per request of the proxy and the connector
#   bench/profile.sh flamegraph    # perf + inferno: bench/results/s1-{proxy,connector}-flamegraph.svg
#   bench/profile.sh install       # installs inferno into ~/.cache/sallyport/tools/
#
# callgrind counts instructions, so its figure repeats whatever else runs on the machine:
# it is the verdict for a change; the benchmark's req/s and CPU µs are the sanity check.
#
# Environment (defaults in brackets):
#   CARGO_TARGET_DIR [target]   the release binaries are in $CARGO_TARGET_DIR/release
#   PROFILE_DIR [/tmp/sallyport-profile]   configuration, PKI, logs and profiles (recreated)
#   PROFILE_PROCESSES [proxy connector]    callgrind: which processes run under valgrind
#   REQUESTS [10000]  WARMUP_REQUESTS [1000]  CONNECTIONS [50]   callgrind load (oha -n -c)
#   SECONDS_OF_LOAD [10]   flamegraph: seconds of load (oha -z) while perf records
#   OHA [~/.cache/sallyport/tools/oha-1.16.0/bin/oha]   (bash bench/install-tools.sh)
#
# Build first: cargo build --release -p sallyport-proxy -p sallyport-connector -p sallyport-bench
set -euo pipefail

MODE=${1:-callgrind}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}/release
DIR=${PROFILE_DIR:-/tmp/sallyport-profile}
PROCESSES=${PROFILE_PROCESSES:-proxy connector}
REQUESTS=${REQUESTS:-10000}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-1000}
CONNECTIONS=${CONNECTIONS:-50}
SECONDS_OF_LOAD=${SECONDS_OF_LOAD:-10}
TOOLS=${SALLYPORT_TOOLS:-$HOME/.cache/sallyport/tools}
OHA=${OHA:-$TOOLS/oha-1.16.0/bin/oha}
INFERNO_VERSION=0.12.8
INFERNO=$TOOLS/inferno-$INFERNO_VERSION/bin
APP_HOST=app.bench.test
TUNNEL_HOST=tunnel.bench.test

install_inferno() {
    if [[ -x $INFERNO/inferno-flamegraph ]]; then
        return
    fi
    local build
    build=$(mktemp -d)
    cargo install inferno --version "$INFERNO_VERSION" --locked \
        --root "$TOOLS/inferno-$INFERNO_VERSION" --target-dir "$build"
    rm -rf "$build"
}

if [[ $MODE == install ]]; then
    install_inferno
    exit 0
fi
if [[ $MODE != callgrind && $MODE != flamegraph ]]; then
    echo "usage: $0 callgrind|flamegraph|install" >&2
    exit 2
fi
for binary in sallyport-proxy sallyport-connector sallyport-bench; do
    [[ -x $TARGET/$binary ]] || {
        echo "$TARGET/$binary is missing: cargo build --release -p $binary" >&2
        exit 1
    }
done
[[ -x $OHA ]] || { echo "oha is missing at $OHA: bash bench/install-tools.sh" >&2; exit 1; }

# The benchmark writes the fleet's PKI, the app's certificate, the compiled configuration
# and a registered connector's state into $DIR; its processes are gone when it returns.
rm -rf "$DIR"
mkdir -p "$DIR"
echo "profile: preparing $DIR with one short sallyport-bench dataplane run" >&2
"$TARGET/sallyport-bench" dataplane --keep-dir "$DIR" --skip-s3 --rounds 1 --duration 1 \
    --warmup 0 --oha "$OHA" >"$DIR/bench-setup.out" 2>"$DIR/bench-setup.err"

MANIFEST=$DIR/manifests/bench.yaml
PROXY_PORT=$(sed -n "s|.*externalUrl: https://$APP_HOST:\([0-9]*\)/.*|\1|p" "$MANIFEST")
BACKEND=$(sed -n 's|.*internalUrl: http://\([0-9.:]*\)/.*|\1|p' "$MANIFEST")
[[ -n $PROXY_PORT && -n $BACKEND ]] || { echo "cannot read the ports from $MANIFEST" >&2; exit 1; }

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# $1: name; the rest: the command. Under callgrind when the name is in $PROCESSES.
start() {
    local name=$1
    shift
    local prefix=()
    if [[ $MODE == callgrind && " $PROCESSES " == *" $name "* ]]; then
        prefix=(valgrind --tool=callgrind --compress-strings=no --callgrind-out-file="$DIR/callgrind.$name.out")
    fi
    RUST_LOG=${RUST_LOG:-info} "${prefix[@]}" "$@" >"$DIR/$name.profile.log" 2>&1 &
    PIDS+=($!)
    eval "PID_${name}=$!"
}

start backend "$TARGET/sallyport-bench" dataplane-backend --listen "$BACKEND" --workers 2 --chunk-kib 64
# The same flags as bench/src/dataplane/fleet.rs and mod.rs (no limit per client address:
# oha's users all come from 127.0.0.1); the connector registered during setup.
start proxy "$TARGET/sallyport-proxy" run --listen "127.0.0.1:$PROXY_PORT" \
    --probe-address 127.0.0.1:0 --fleet-config-file "$DIR/fleet-config.json" \
    --tls-dir "$DIR/tls" --registration-token "bench/bench=profile-unused" \
    --tunnel-hostname "$TUNNEL_HOST" --tunnel-tls-dir "$DIR/pki/tunnel-tls" \
    --connector-issuer-dir "$DIR/pki/connector-issuer" --replica bench-proxy \
    --client-requests-per-second 0
start connector "$TARGET/sallyport-connector" run --fleet-address "127.0.0.1:$PROXY_PORT" \
    --fleet-server-name "$TUNNEL_HOST" --fleet-ca-file "$DIR/pki/fleet-ca.crt" \
    --group bench/bench --state-dir "$DIR/connector-state" --tunnels-per-replica 2

URL=https://$APP_HOST:$PROXY_PORT/
OHA_TLS=(--cacert "$DIR/app-ca.crt" --connect-to "$APP_HOST:$PROXY_PORT:127.0.0.1:$PROXY_PORT")
echo "profile: waiting for the first answer through the proxy ($URL)" >&2
for _ in $(seq 1 300); do
    if [[ $(curl -s --cacert "$DIR/app-ca.crt" --resolve "$APP_HOST:$PROXY_PORT:127.0.0.1" \
        -o /dev/null -w '%{http_code}' "$URL" 2>/dev/null) == 200 ]]; then
        break
    fi
    sleep 1
done

# oha -n N; prints the count of 200 answers, fails unless all N were.
load() {
    local requests=$1
    local report
    report=$("$OHA" --no-tui --output-format json -n "$requests" -c "$CONNECTIONS" "${OHA_TLS[@]}" "$URL")
    local ok
    ok=$(jq '.statusCodeDistribution."200" // 0' <<<"$report")
    if [[ $ok != "$requests" ]]; then
        echo "profile: only $ok of $requests answers were 200: $(jq -c '.errorDistribution' <<<"$report")" >&2
        exit 1
    fi
    jq -r '"\(.summary.requestsPerSec | floor) req/s"' <<<"$report"
}

if [[ $MODE == callgrind ]]; then
    echo "profile: warm-up, $WARMUP_REQUESTS requests" >&2
    load "$WARMUP_REQUESTS" >/dev/null
    for name in $PROCESSES; do
        pid_var=PID_$name
        callgrind_control -z "${!pid_var}" >/dev/null
    done
    echo "profile: measuring $REQUESTS requests, $CONNECTIONS connections (under valgrind: $PROCESSES)" >&2
    load "$REQUESTS" >/dev/null
    for name in $PROCESSES; do
        pid_var=PID_$name
        callgrind_control -d measured "${!pid_var}" >/dev/null
    done
    sleep 1
    for name in $PROCESSES; do
        # The dump after zeroing: callgrind.NAME.out.1 (the final one at exit is not waited for).
        file=$(ls -t "$DIR/callgrind.$name.out".* 2>/dev/null | head -1)
        total=$(sed -n 's/^summary: \([0-9]*\).*/\1/p;s/^totals: \([0-9]*\).*/\1/p' "$file" | head -1)
        printf '%s: %s instructions per request (%s Ir / %s requests), %s\n' \
            "$name" "$((total / REQUESTS))" "$total" "$REQUESTS" "$file"
    done
    echo "profile: top functions: callgrind_annotate --inclusive=no FILE | head -60" >&2
else
    install_inferno
    echo "profile: warm-up" >&2
    "$OHA" --no-tui -z 2s -c "$CONNECTIONS" "${OHA_TLS[@]}" "$URL" >/dev/null
    for name in proxy connector; do
        pid_var=PID_$name
        perf record -F 499 -g --call-graph dwarf -o "$DIR/perf.$name.data" -p "${!pid_var}" \
            -- sleep "$SECONDS_OF_LOAD" >"$DIR/perf.$name.log" 2>&1 &
    done
    sleep 0.2
    "$OHA" --no-tui --output-format json -z "${SECONDS_OF_LOAD}s" -c "$CONNECTIONS" "${OHA_TLS[@]}" "$URL" |
        jq -r '"load while recording: \(.summary.requestsPerSec | floor) req/s"'
    wait %perf 2>/dev/null || sleep 2
    sleep 2
    mkdir -p "$REPO/bench/results"
    for name in proxy connector; do
        svg=$REPO/bench/results/s1-$name-flamegraph.svg
        perf script -i "$DIR/perf.$name.data" 2>/dev/null |
            "$INFERNO/inferno-collapse-perf" >"$DIR/perf.$name.folded"
        "$INFERNO/inferno-flamegraph" --minwidth 0.2 \
            --title "S1 small GETs: sallyport-$name (perf -F 499, DWARF stacks)" \
            <"$DIR/perf.$name.folded" >"$svg"
        echo "$name: $svg ($(du -k "$svg" | cut -f1) KiB); folded stacks in $DIR/perf.$name.folded"
    done
fi
