#!/usr/bin/env bash
# Starts one relay on a free loopback port, sends it a request, scrapes /metrics and checks the
# exposition with promtool (Debian package `prometheus`).
#
# Usage: bash .ci/check-metrics.sh [RELAY_BINARY]   (default target/debug/api-relay)
set -euo pipefail

relay_binary="${1:-target/debug/api-relay}"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log="$(mktemp)"

UPSTREAM=http://127.0.0.1:9 CLIENT_ID_SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')" \
    OUTBOUND_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(16))')" \
    BIND_ADDRESS=127.0.0.1 PORT="$port" "$relay_binary" >"$log" 2>&1 &
relay_pid=$!
trap 'kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; rm -f "$log"' EXIT

for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/api/mte-echo/ci" >/dev/null
curl -sS "http://127.0.0.1:$port/no-role" >/dev/null
scrape="$(curl -fsS "http://127.0.0.1:$port/metrics")"
echo "$scrape" | grep -c '^relay_' | xargs echo "relay samples:"
echo "$scrape" | promtool check metrics
echo "promtool check metrics: ok"
