#!/usr/bin/env bash
# Release build of api-relay with profile-guided optimisation (PGO), the build the container
# image ships.
#
# 1. Builds a relay that records which code runs and how often (target/pgo/instrumented).
# 2. Trains it with wrk through relay A, relay B and the demo upstream API on loopback, in
#    memory mode and, when redis-server is installed, in Redis mode. The loads mix small and
#    large JSON POSTs, MKE and MTE exchanges, GETs, many connections and few.
# 3. Merges the recorded profiles with llvm-profdata (rustup component llvm-tools).
# 4. Builds the relay again with the merged profile: target/pgo/release/api-relay.
#
# The compiler lays out and inlines the code for the paths the training ran often. Alternating
# benchmark runs on 2-CPU virtual machines measured the cut in CPU time per exchange
# (bench/notes.md). On an Intel Xeon machine it was 9-11 % in memory mode and 8-13 % in Redis
# mode. On an AMD EPYC machine it was 16-19 % and 20-25 %. Code the training never ran, such as
# most error replies, is optimised for size and may run somewhat slower.
#
# Usage: deploy/build-pgo.sh [OUTPUT]   copies the optimised binary to OUTPUT when given
# Environment:
#   TRAIN_SECONDS   length of each training load (default 8); there are nine with Redis, six
#                   without
#   PGO_TARGET_DIR  cargo target folder of the optimised build (default target/pgo). The
#                   instrumented build goes to its subfolder `instrumented`.
#
# Every server listens on 127.0.0.1 only, and the EXIT trap stops exactly the processes this
# script started, by PID.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRAIN_SECONDS=${TRAIN_SECONDS:-8}
PGO_TARGET_DIR=${PGO_TARGET_DIR:-$REPO_DIR/target/pgo}
OUTPUT=${1:-}
PIDS=()
WORK_DIR=""
# Names of the relays started for training. Each must write a profile.
TRAINED_RELAYS=()

log() {
    printf '[build-pgo %(%H:%M:%S)T] %s\n' -1 "$*" >&2
}

fail() {
    log "error: $*"
    exit 1
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_processes
    if [[ -n $WORK_DIR && -d $WORK_DIR ]]; then
        if [[ $status == 0 ]]; then
            rm -rf "$WORK_DIR"
        else
            log "logs kept in $WORK_DIR"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# SIGTERM lets each relay stop cleanly, which is when it writes its profile.
stop_processes() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

# ---------------------------------------------------------------------------------------------
# Tools

install_tools() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v curl >/dev/null || missing+=(curl)
    command -v openssl >/dev/null || missing+=(openssl)
    if ((${#missing[@]} > 0)); then
        log "installing ${missing[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
        log "installing the rustup component llvm-tools"
        rustup component add llvm-tools
    fi
    PROFDATA="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
    [[ -x $PROFDATA ]] || fail "llvm-profdata not found at $PROFDATA"
}

# ---------------------------------------------------------------------------------------------
# Processes

# Succeeds when something accepts a TCP connection on port $1 of 127.0.0.1.
listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints a TCP port on 127.0.0.1 that nothing listens on, picked at random from 20000-59999.
free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if ! listening "$port"; then
            echo "$port"
            return 0
        fi
    done
    fail "no free port found on 127.0.0.1"
}

# Waits up to 20 s until something listens on port $1 of 127.0.0.1.
wait_for_port() {
    for _ in $(seq 1 200); do
        listening "$1" && return 0
        sleep 0.1
    done
    fail "no server listens on 127.0.0.1:$1 after 20 s; see the logs in $WORK_DIR"
}

# Waits up to 20 s until a GET of $1 returns status $2.
wait_for_http() {
    local url=$1 expected=$2 status=""
    for _ in $(seq 1 200); do
        status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [[ $status == "$expected" ]] && return 0
        sleep 0.1
    done
    fail "$url did not return $expected within 20 s (last status: ${status:-none})"
}

# Starts one process of the instrumented binary. $1 names it and its log, $2 is the folder its
# profile goes to, the rest are VAR=value settings and arguments for env.
start() {
    local name=$1 profile_dir=$2
    shift 2
    env LLVM_PROFILE_FILE="$profile_dir/$name-%p.profraw" "$@" >"$WORK_DIR/$name.log" 2>&1 &
    PIDS+=($!)
}

# Starts relay B and relay A in front of the demo upstream. $1 is the mode (memory or redis).
# Sets RELAY_A and RELAY_B to their base URLs.
start_pair() {
    local mode=$1 port_a port_b extra=()
    port_b=$(free_port)
    port_a=$(free_port)
    [[ $port_a != "$port_b" ]] || port_a=$(free_port)
    if [[ $mode == redis ]]; then
        extra=(REDIS_URL="redis://127.0.0.1:$REDIS_PORT")
    fi
    start "relay-b-$mode" "$WORK_DIR/profiles" UPSTREAM="http://127.0.0.1:$UPSTREAM_PORT" \
        CLIENT_ID_SECRET="$(openssl rand -hex 32)" OUTBOUND_TOKEN="$(openssl rand -hex 16)" \
        PAIRING_PSK="$PAIRING_PSK" BIND_ADDRESS=127.0.0.1 PORT="$port_b" LOG_FORMAT=json \
        "${extra[@]}" REDIS_KEY_PREFIX=train-b "$INSTRUMENTED"
    start "relay-a-$mode" "$WORK_DIR/profiles" UPSTREAM="http://127.0.0.1:$UPSTREAM_PORT" \
        CLIENT_ID_SECRET="$(openssl rand -hex 32)" OUTBOUND_TOKEN="$OUTBOUND_TOKEN" \
        OUTBOUND_ALLOWLIST="http://127.0.0.1:$port_b" \
        PAIRING_PSK="$PAIRING_PSK" BIND_ADDRESS=127.0.0.1 PORT="$port_a" LOG_FORMAT=json \
        "${extra[@]}" REDIS_KEY_PREFIX=train-a "$INSTRUMENTED"
    TRAINED_RELAYS+=("relay-b-$mode" "relay-a-$mode")
    RELAY_A="http://127.0.0.1:$port_a"
    RELAY_B="http://127.0.0.1:$port_b"
    wait_for_http "$RELAY_B/readyz" 200
    wait_for_http "$RELAY_A/readyz" 200
}

# ---------------------------------------------------------------------------------------------
# Training loads

# Runs wrk once through the pair: $1 connections, $2 path, $3 body file or "-" for a GET, $4
# pause in milliseconds between a response and the next request on a connection, then extra
# request headers as "name: value".
load() {
    local connections=$1 path=$2 body=$3 delay=$4
    shift 4
    local threads=2
    ((connections >= 2)) || threads=1
    local headers=(-H "x-mte-outbound-token: $OUTBOUND_TOKEN" -H "x-mte-upstream: $RELAY_B")
    local header
    for header in "$@"; do
        headers+=(-H "$header")
    done
    TRAIN_BODY_FILE=$body TRAIN_DELAY_MS=$delay \
        wrk -t"$threads" -c"$connections" -d"${TRAIN_SECONDS}s" -s "$WORK_DIR/train.lua" \
        "${headers[@]}" "$RELAY_A$path" >"$WORK_DIR/wrk.out" 2>&1 ||
        fail "wrk failed: $(cat "$WORK_DIR/wrk.out")"
    local summary
    summary=$(grep -E 'Requests/sec|Non-2xx|Socket errors' "$WORK_DIR/wrk.out" | tr -s ' ' | tr '\n' ';')
    local method=POST
    [[ $body != - ]] || method=GET
    log "$method $path, $connections connections, body ${body##*/}, ${*:-no extra headers}: $summary"
    if grep -q 'Non-2xx' "$WORK_DIR/wrk.out"; then
        fail "training requests failed; see $WORK_DIR"
    fi
}

# Runs the training loads through the pair. With $1 = small it skips the large-body and MTE
# loads: Redis mode runs the same code for them, and memory mode has trained it already.
train_pair() {
    local json=(content-type:\ application/json)
    load 64 /api/echo "$WORK_DIR/body-1k.json" 0 "${json[@]}"
    load 8 /api/echo "$WORK_DIR/body-1k.json" 5 "${json[@]}"
    load 16 /api/echo - 0
    [[ ${1:-all} == small ]] && return 0
    load 16 /api/echo "$WORK_DIR/body-1k.json" 0 "${json[@]}" "x-mte-encode-type: MTE"
    load 8 /api/echo "$WORK_DIR/body-200k.json" 0 "${json[@]}"
    load 4 /api/echo "$WORK_DIR/body-200k.json" 0 "${json[@]}" "x-mte-encode-type: MTE"
}

write_training_files() {
    cat >"$WORK_DIR/train.lua" <<'EOF'
-- POSTs the file TRAIN_BODY_FILE (or sends GETs when it is "-") and waits TRAIN_DELAY_MS
-- milliseconds after each response.
local body_file = os.getenv("TRAIN_BODY_FILE")
if body_file ~= nil and body_file ~= "-" then
  local file = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
end
local delay_ms = tonumber(os.getenv("TRAIN_DELAY_MS") or "0")
if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end
EOF
    local size name
    for size in 1024 204800; do
        name=$([[ $size == 1024 ]] && echo 1k || echo 200k)
        {
            printf '{"name":"item","note":"'
            head -c $((size - 26)) /dev/zero | tr '\0' 'x'
            printf '"}\n'
        } >"$WORK_DIR/body-$name.json"
    done
}

# ---------------------------------------------------------------------------------------------
# Main

cd "$REPO_DIR"
install_tools
WORK_DIR=$(mktemp -d /tmp/api-relay-pgo.XXXXXX)
mkdir -p "$WORK_DIR/profiles"
write_training_files

# Profiles of processes outside the training, such as build scripts, go to a folder of their
# own. Its path is fixed so that cargo reuses the instrumented build while the sources stay the
# same.
OTHER_PROFILES=$PGO_TARGET_DIR/instrumented/other-profiles
rm -rf "$OTHER_PROFILES"
log "building the instrumented relay in $PGO_TARGET_DIR/instrumented"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$OTHER_PROFILES" \
    cargo build --release --locked --bin api-relay --target-dir "$PGO_TARGET_DIR/instrumented"
INSTRUMENTED=$PGO_TARGET_DIR/instrumented/release/api-relay

OUTBOUND_TOKEN=$(openssl rand -hex 16)
PAIRING_PSK=$(openssl rand -hex 32)
UPSTREAM_PORT=$(free_port)
# The demo upstream's profile is left out: it would weigh code the relays do not run.
start upstream "$OTHER_PROFILES" BIND_ADDRESS=127.0.0.1 PORT="$UPSTREAM_PORT" \
    "$INSTRUMENTED" demo-upstream
wait_for_http "http://127.0.0.1:$UPSTREAM_PORT/api/items" 200

log "training in memory mode, ${TRAIN_SECONDS}s per load"
start_pair memory
train_pair

if command -v redis-server >/dev/null; then
    REDIS_PORT=$(free_port)
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$WORK_DIR" --logfile "$WORK_DIR/redis.log" &
    PIDS+=($!)
    wait_for_port "$REDIS_PORT"
    log "training in Redis mode"
    start_pair redis
    train_pair small
else
    log "redis-server not installed: Redis mode is left out of the training"
fi
stop_processes

shopt -s nullglob
for relay in "${TRAINED_RELAYS[@]}"; do
    written=("$WORK_DIR/profiles/$relay"-*.profraw)
    ((${#written[@]} > 0)) || fail "$relay wrote no profile; see $WORK_DIR/$relay.log"
done
profiles=("$WORK_DIR"/profiles/*.profraw)
"$PROFDATA" merge -o "$WORK_DIR/merged.profdata" "${profiles[@]}"

# The profile's path changes with every run, so cargo always builds again with the new profile.
log "building the optimised relay in $PGO_TARGET_DIR/release"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$WORK_DIR/merged.profdata" \
    cargo build --release --locked --bin api-relay --target-dir "$PGO_TARGET_DIR"
if [[ -n $OUTPUT ]]; then
    cp "$PGO_TARGET_DIR/release/api-relay" "$OUTPUT"
    log "optimised relay copied to $OUTPUT"
else
    log "optimised relay: $PGO_TARGET_DIR/release/api-relay"
fi
