#!/usr/bin/env bash
# CPU profile of a relay pair under load: perf samples both relays while wrk sends 1 KB POSTs
# through them to the same nginx upstream bench/run.sh uses. Writes, per relay, a flame graph,
# the folded stacks behind it and perf's samples (<relay>.perf.data), and one summary with the
# throughput, the CPU per request and where that CPU goes. It builds the relay first, as
# bench/run.sh does, and installs perf (apt-get) and inferno (cargo install) when they are
# missing.
#
# Usage: bench/profile.sh
# Environment:
#   CONNECTIONS  wrk connections (default 100)
#   SECONDS_SAMPLED  seconds perf samples, in the middle of a wrk run 4 s longer (default 10)
#   FREQUENCY    samples per second and relay (default 499)
#   MODE         memory (default) or redis: the relays keep their state in a redis-server
#                this script starts
#   PROFILE_DIR  folder for the profiles (default: target/profile in the relay's tree). Not
#                OUT_DIR, which cargo gives build scripts: some rebuild when it changes.
#   THREADS      wrk threads (default 2)
#   BUILD, KEEP_RUN_DIR, RELAY_DIR  as for bench/run.sh (BUILD=pgo, the default, profiles the
#                profile-guided build)
#
# perf copies 8 KiB of stack per sample and unwinds it with the binary's DWARF tables, because
# release builds keep no frame pointers. Reading the samples back takes about ten seconds per
# relay.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
RELAY_DIR=${RELAY_DIR:-$REPO_DIR}
CONNECTIONS=${CONNECTIONS:-100}
SECONDS_SAMPLED=${SECONDS_SAMPLED:-10}
FREQUENCY=${FREQUENCY:-499}
MODE=${MODE:-memory}
PROFILE_DIR=${PROFILE_DIR:-$RELAY_DIR/target/profile}
THREADS=${THREADS:-2}

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

[[ $MODE == memory || $MODE == redis ]] || fail "MODE must be memory or redis, not $MODE"

install_tools perf:linux-perf
if ! command -v inferno-flamegraph >/dev/null; then
    log "installing inferno (flame graphs): cargo install inferno --locked"
    cargo install inferno --locked
fi
build_relay

prepare_run_dir
mkdir -p "$PROFILE_DIR"
read -r UPSTREAM_PORT RELAY_A_PORT RELAY_B_PORT REDIS_PORT <<<"$(free_ports 4)"
OUTBOUND_TOKEN=$(openssl rand -hex 16)
PAIRING_PSK=$(openssl rand -hex 32)

write_upstream_config
start_nginx upstream
state_a=() state_b=()
if [[ $MODE == redis ]]; then
    start_redis
    state_a=(REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_KEY_PREFIX=profile-a)
    state_b=(REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_KEY_PREFIX=profile-b)
fi
start_relay relay-b "$RELAY_B_PORT" "$(openssl rand -hex 16)" "${state_b[@]}"
start_relay relay-a "$RELAY_A_PORT" "$OUTBOUND_TOKEN" \
    OUTBOUND_ALLOWLIST="http://127.0.0.1:$RELAY_B_PORT" "${state_a[@]}"

wait_for_http "http://127.0.0.1:$UPSTREAM_PORT/files/none" 404
wait_for_http "http://127.0.0.1:$RELAY_A_PORT/readyz" 200
wait_for_http "http://127.0.0.1:$RELAY_B_PORT/readyz" 200
check_target relay
warm_up relay
log "sampling both relays for $SECONDS_SAMPLED s at $FREQUENCY Hz, $CONNECTIONS connections, $MODE mode"

# shellcheck disable=SC2154  # start_relay sets the PID_* names
relay_pids=("$PID_relay_a" "$PID_relay_b")
cpu_before=$(cpu_ticks "${relay_pids[@]}")
BENCH_BODY_FILE=$RUN_DIR/www/files/body-1k.json BENCH_OUT=$RUN_DIR/profile-wrk.json \
    BENCH_OUTBOUND_TOKEN=$OUTBOUND_TOKEN BENCH_PEER=$(peer_for relay) BENCH_DELAY_MS=0 \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$((SECONDS_SAMPLED + 4))s" --timeout 5s \
    -s "$BENCH_DIR/post.lua" "$(url_for relay)$(path_for 1k)" >"$RUN_DIR/profile-wrk.txt" &
wrk_pid=$!
PIDS+=("$wrk_pid")
sleep 2
perf_pids=()
for name in relay-a relay-b; do
    pid_name=PID_${name//-/_}
    perf record --quiet -F "$FREQUENCY" --call-graph dwarf -e cpu-clock -o "$PROFILE_DIR/$name.perf.data" \
        -p "${!pid_name}" -- sleep "$SECONDS_SAMPLED" 2>>"$RUN_DIR/perf.log" &
    perf_pids+=($!)
    PIDS+=($!)
done
for pid in "${perf_pids[@]}"; do
    wait "$pid" || fail "perf record failed; see $RUN_DIR/perf.log"
done
wait "$wrk_pid" || fail "wrk failed; see $RUN_DIR/profile-wrk.txt"
cpu_after=$(cpu_ticks "${relay_pids[@]}")

for name in relay-a relay-b; do
    log "folding the samples of $name"
    perf script -i "$PROFILE_DIR/$name.perf.data" 2>>"$RUN_DIR/perf.log" |
        inferno-collapse-perf --all >"$PROFILE_DIR/$name.folded"
    inferno-flamegraph --title "$name, $CONNECTIONS connections, 1 KB POST, $MODE mode" \
        <"$PROFILE_DIR/$name.folded" >"$PROFILE_DIR/$name.svg"
done

python3 "$BENCH_DIR/profile.py" \
    --wrk "$RUN_DIR/profile-wrk.json" --cpu-ticks $((cpu_after - cpu_before)) \
    --clock-ticks "$(getconf CLK_TCK)" --connections "$CONNECTIONS" --mode "$MODE" \
    --commit "$(git -C "$RELAY_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --relay relay-a "$PROFILE_DIR/relay-a.folded" --relay relay-b "$PROFILE_DIR/relay-b.folded" \
    >"$PROFILE_DIR/summary.md"
cat "$PROFILE_DIR/summary.md"
log "wrote $PROFILE_DIR/summary.md, relay-a.svg and relay-b.svg"
