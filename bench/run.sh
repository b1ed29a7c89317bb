#!/usr/bin/env bash
# Load benchmark of a relay pair against an nginx pair with mutual TLS, both in front of the
# same nginx upstream, then bench/RESULTS.md from the medians.
#
# Usage: bench/run.sh
# Environment:
#   DURATION  length of one wrk run, in wrk syntax (default 10s, QUICK=1: 3s)
#   ROUNDS    rounds over all cases and targets; medians are reported (default 2, QUICK=1: 1)
#   QUICK     1 runs a short smoke test and writes bench/RESULTS.quick.md instead
#   THREADS   wrk threads (default 2)
#   KEEP_RUN_DIR  1 keeps the temporary folder with configs, certificates and logs
#   RELAY_DIR     source tree of the relay to build and measure (default: this repository)
#   RELAY_COMMIT  commit shown in the report when RELAY_DIR is not a git checkout
#   BUILD         pgo (default): the profile-guided build of deploy/build-pgo.sh, as the
#                 container image ships it; plain: cargo build --release --locked
#
# Every server listens on 127.0.0.1 only, and the EXIT trap stops exactly the processes this
# script started, by PID.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
RELAY_DIR=${RELAY_DIR:-$REPO_DIR}

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    DURATION=${DURATION:-3s}
    ROUNDS=${ROUNDS:-1}
    RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS.quick.md}
else
    DURATION=${DURATION:-10s}
    ROUNDS=${ROUNDS:-2}
    RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/RESULTS.md}
fi
THREADS=${THREADS:-2}
RAW_FILE=${RESULTS_FILE%.md}.jsonl
# Light load: each of 10 connections waits this long after a response before its next request.
LIGHT_DELAY_MS=10

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

# One wrk run: $1 round, $2 case name, $3 target, $4 connections, $5 body size, $6 delay in
# ms. Appends one JSON line to $RAW_FILE.
measure() {
    local round=$1 case_name=$2 target=$3 connections=$4 size=$5 delay_ms=$6
    local pids cpu_before cpu_after redis_before=0 redis_after=0 rss_a=0 rss_b=0 out
    local threads=$THREADS
    ((connections < threads)) && threads=$connections
    out=$RUN_DIR/wrk-$round-$case_name-$target.json
    pids=$(measured_pids "$target")

    if [[ $target == relay || $target == relay-redis ]]; then
        local relay_a relay_b
        read -r relay_a relay_b <<<"$pids"
        reset_peak_rss "$relay_a"
        reset_peak_rss "$relay_b"
    fi
    # shellcheck disable=SC2086  # pids is a list of numbers
    cpu_before=$(cpu_ticks $pids)
    [[ $target == relay-redis ]] && redis_before=$(cpu_ticks "$PID_redis")

    local command=(wrk -t"$threads" -c"$connections" -d"$DURATION" --timeout 5s
        -s "$BENCH_DIR/post.lua" "$(url_for "$target")$(path_for "$size")")
    BENCH_BODY_FILE=$RUN_DIR/www/files/body-$size.json BENCH_OUT=$out \
        BENCH_OUTBOUND_TOKEN=$OUTBOUND_TOKEN BENCH_PEER=$(peer_for "$target") \
        BENCH_DELAY_MS=$delay_ms "${command[@]}" >"$RUN_DIR/wrk-$round-$case_name-$target.txt"

    # shellcheck disable=SC2086
    cpu_after=$(cpu_ticks $pids)
    [[ $target == relay-redis ]] && redis_after=$(cpu_ticks "$PID_redis")
    if [[ $target == relay || $target == relay-redis ]]; then
        rss_a=$(peak_rss_kib "$relay_a")
        rss_b=$(peak_rss_kib "$relay_b")
    fi
    [[ -s $out ]] || fail "wrk wrote no summary for $case_name/$target; see $RUN_DIR/wrk-$round-$case_name-$target.txt"

    local load
    read -r load _ </proc/loadavg
    printf '{"round":%d,"case":"%s","target":"%s","connections":%d,"body":"%s","delay_ms":%d,"cpu_ticks":%d,"redis_cpu_ticks":%d,"peak_rss_a_kib":%d,"peak_rss_b_kib":%d,"load1":%s,"wrk":%s}\n' \
        "$round" "$case_name" "$target" "$connections" "$size" "$delay_ms" \
        $((cpu_after - cpu_before)) $((redis_after - redis_before)) "$rss_a" "$rss_b" "$load" \
        "$(tr -d '\n' <"$out")" >>"$RAW_FILE"
    log "round $round $case_name $target: $(python3 "$BENCH_DIR/report.py" --summary-line "$out")"
}

# Cases: name, connections, body size, pause between requests per connection in ms.
CASES=(
    "c100-1k 100 1k 0"
    "c200-1k 200 1k 0"
    "c300-1k 300 1k 0"
    "light-1k 10 1k $LIGHT_DELAY_MS"
    "c10-64k 10 64k 0"
    "c10-1m 10 1m 0"
)
TARGETS=(direct nginx relay relay-redis)

# ---------------------------------------------------------------------------------------------
# Main

install_tools
build_relay

prepare_run_dir

PEER_TLS_NAME=nginx-b.bench.test
read -r UPSTREAM_PORT NGINX_A_PORT NGINX_B_PORT RELAY_A_PORT RELAY_B_PORT \
    REDIS_RELAY_A_PORT REDIS_RELAY_B_PORT REDIS_PORT <<<"$(free_ports 8)"
OUTBOUND_TOKEN=$(openssl rand -hex 16)
PAIRING_PSK=$(openssl rand -hex 32)

make_certificates
write_upstream_config
write_nginx_a_config
write_nginx_b_config

start_nginx upstream
start_nginx nginx-b
start_nginx nginx-a
start_redis
start_relay relay-b "$RELAY_B_PORT" "$(openssl rand -hex 16)"
start_relay relay-a "$RELAY_A_PORT" "$OUTBOUND_TOKEN" \
    OUTBOUND_ALLOWLIST="http://127.0.0.1:$RELAY_B_PORT"
start_relay redis-relay-b "$REDIS_RELAY_B_PORT" "$(openssl rand -hex 16)" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_KEY_PREFIX=bench-b
start_relay redis-relay-a "$REDIS_RELAY_A_PORT" "$OUTBOUND_TOKEN" \
    OUTBOUND_ALLOWLIST="http://127.0.0.1:$REDIS_RELAY_B_PORT" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_KEY_PREFIX=bench-a

wait_for_http "http://127.0.0.1:$UPSTREAM_PORT/files/none" 404
wait_for_http "http://127.0.0.1:$NGINX_A_PORT/files/none" 404
for port in "$RELAY_A_PORT" "$RELAY_B_PORT" "$REDIS_RELAY_A_PORT" "$REDIS_RELAY_B_PORT"; do
    wait_for_http "http://127.0.0.1:$port/readyz" 200
done
for target in "${TARGETS[@]}"; do
    check_target "$target"
done
log "all targets answer; duration $DURATION, $ROUNDS round(s), wrk threads $THREADS"

warm_up "${TARGETS[@]}"

: >"$RAW_FILE"
STARTED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq 1 "$ROUNDS"); do
    for spec in "${CASES[@]}"; do
        read -r case_name connections size delay_ms <<<"$spec"
        for target in "${TARGETS[@]}"; do
            measure "$round" "$case_name" "$target" "$connections" "$size" "$delay_ms"
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# Commands and settings the report prints, with the secrets left out.
META_FILE=${RESULTS_FILE%.md}.meta.json
python3 - "$META_FILE" <<EOF
import json
import sys

meta = {
    "started_at": "$STARTED_AT",
    "finished_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "load_before": "$LOAD_BEFORE",
    "load_after": "$LOAD_AFTER",
    "duration": "$DURATION",
    "rounds": $ROUNDS,
    "threads": $THREADS,
    "quick": "$QUICK" == "1",
    "clock_ticks_per_second": $(getconf CLK_TCK),
    "light_delay_ms": $LIGHT_DELAY_MS,
    "build": "$BUILD",
    "build_command": "$BUILD_COMMAND",
    "relay_binary": "${RELAY_BIN#"$RELAY_DIR"/}",
    "commit": "$(git -C "$RELAY_DIR" rev-parse --short HEAD 2>/dev/null || echo "${RELAY_COMMIT:-unknown}")",
    "rustc": "$(rustc --version)",
    "nginx": "$(nginx -v 2>&1)",
    "wrk": "$(wrk -v 2>&1 | head -n 1 | cut -c1-60 | sed 's/ *$//')",
    "redis": "$(redis-server --version)",
    "openssl": "$(openssl version)",
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=2)
EOF

python3 "$BENCH_DIR/report.py" --raw "$RAW_FILE" --meta "$META_FILE" --out "$RESULTS_FILE"
log "wrote $RESULTS_FILE and $RAW_FILE"
