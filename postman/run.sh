#!/usr/bin/env bash
# Runs the Postman collection with newman against a real relay pair. The script starts the demo
# upstream API, relay B and relay A on free ports on 127.0.0.1, runs the collection once, and
# stops the three processes. It exits non-zero when a server does not start or a test fails.
#
# Usage: bash postman/run.sh [RELAY_BINARY]
#   RELAY_BINARY  path of the api-relay binary to test, default target/debug/api-relay (relative
#                 to the current folder). The script builds nothing, so run `cargo build` first.
#
# Newman comes from PATH, or npm installs it into postman/.newman on the first run.
set -euo pipefail

readonly NEWMAN_VERSION=6.2.2
# Seconds a server gets to respond to its first request after it starts.
readonly STARTUP_TIMEOUT_SECONDS=20
# Seconds a stopped server gets to exit after SIGTERM before it gets SIGKILL.
readonly STOP_GRACE_SECONDS=10

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
collection="$script_dir/api-relay.postman_collection.json"
environment="$script_dir/api-relay.postman_environment.json"

fail() {
    echo "run.sh: $*" >&2
    exit 1
}

require_command() {
    command -v "$1" >/dev/null 2>&1 || fail "$1 not found on PATH. $2"
}

# Prints the path of a newman executable, installing newman with npm when PATH has none.
find_newman() {
    if command -v newman >/dev/null 2>&1; then
        command -v newman
        return
    fi
    local dir="$script_dir/.newman"
    local newman="$dir/node_modules/.bin/newman"
    if [[ ! -x "$newman" ]]; then
        require_command npm "Install Node.js 16 or later, or put newman on PATH."
        echo "run.sh: installing newman $NEWMAN_VERSION into $dir" >&2
        mkdir -p "$dir"
        npm install --no-save --no-audit --no-fund --prefix "$dir" "newman@$NEWMAN_VERSION" >&2 ||
            fail "npm install of newman $NEWMAN_VERSION failed"
    fi
    [[ -x "$newman" ]] || fail "npm finished but $newman does not exist"
    echo "$newman"
}

# Prints COUNT distinct ports that were free on 127.0.0.1, one per line. All sockets stay open
# until every port is chosen, so the ports differ from each other.
free_ports() {
    python3 - "$1" <<'PYTHON'
import socket
import sys

sockets = []
for _ in range(int(sys.argv[1])):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sockets.append(sock)
for sock in sockets:
    print(sock.getsockname()[1])
    sock.close()
PYTHON
}

random_secret() {
    python3 -c 'import secrets; print(secrets.token_hex(32))'
}

server_pids=()
server_names=()
work_dir=""

# Stops every server this script started, by PID: SIGTERM, then SIGKILL after the grace period.
stop_servers() {
    local pid attempt
    for pid in "${server_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${server_pids[@]}"; do
        for ((attempt = 0; attempt < STOP_GRACE_SECONDS * 10; attempt++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "run.sh: process $pid did not stop within ${STOP_GRACE_SECONDS} s of SIGTERM, so sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$work_dir" ]]; then
        rm -rf "$work_dir"
    fi
}

# Prints the end of each server's log, for a failed start or a failed run.
show_logs() {
    local index
    for index in "${!server_names[@]}"; do
        echo "----- last lines of the ${server_names[$index]} log -----" >&2
        tail -n 20 "$work_dir/${server_names[$index]}.log" >&2 || true
    done
}

# Starts NAME in the background with its output in the work folder: start_server NAME COMMAND...
start_server() {
    local name="$1"
    shift
    "$@" >"$work_dir/$name.log" 2>&1 &
    server_pids+=("$!")
    server_names+=("$name")
}

# Waits until a GET of URL returns 200, failing early when the server's process has exited.
wait_for_server() {
    local name="$1" url="$2" pid="$3"
    local deadline=$((SECONDS + STARTUP_TIMEOUT_SECONDS))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_logs
            fail "$name exited before responding to $url. Its log is above."
        fi
        if curl --silent --fail --max-time 1 --output /dev/null "$url"; then
            return
        fi
        sleep 0.1
    done
    show_logs
    fail "$name did not respond to $url within $STARTUP_TIMEOUT_SECONDS s. Its log is above."
}

run_servers_and_newman() {
    local relay_binary="$1" newman="$2"
    work_dir="$(mktemp -d)"
    trap stop_servers EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    local ports upstream_port relay_b_port relay_a_port
    ports="$(free_ports 3)"
    {
        read -r upstream_port
        read -r relay_b_port
        read -r relay_a_port
    } <<<"$ports"
    local upstream="http://127.0.0.1:$upstream_port"
    local relay_b="http://127.0.0.1:$relay_b_port"
    local relay_a="http://127.0.0.1:$relay_a_port"
    local outbound_token
    outbound_token="$(random_secret)"

    start_server demo-upstream env BIND_ADDRESS=127.0.0.1 PORT="$upstream_port" "$relay_binary" demo-upstream
    wait_for_server demo-upstream "$upstream/api/ready" "${server_pids[-1]}"

    # Each relay gets its own secrets. Relay B's OUTBOUND_TOKEN is required but never used here.
    start_server relay-b env UPSTREAM="$upstream" CLIENT_ID_SECRET="$(random_secret)" \
        OUTBOUND_TOKEN="$(random_secret)" PORT="$relay_b_port" BIND_ADDRESS=127.0.0.1 "$relay_binary"
    wait_for_server relay-b "$relay_b/readyz" "${server_pids[-1]}"

    start_server relay-a env UPSTREAM="$upstream" CLIENT_ID_SECRET="$(random_secret)" \
        OUTBOUND_TOKEN="$outbound_token" PORT="$relay_a_port" BIND_ADDRESS=127.0.0.1 "$relay_binary"
    wait_for_server relay-a "$relay_a/readyz" "${server_pids[-1]}"

    echo "run.sh: demo upstream $upstream, relay B $relay_b, relay A $relay_a" >&2
    if ! "$newman" run "$collection" \
        --environment "$environment" \
        --env-var "DOMAIN=$relay_a" \
        --env-var "UPSTREAM=$relay_b" \
        --env-var "OUTBOUND_TOKEN=$outbound_token" \
        --timeout-request 15000; then
        show_logs
        fail "newman run failed. Its failure list is above the server logs."
    fi
}

main() {
    local relay_binary="${1:-target/debug/api-relay}"
    [[ -x "$relay_binary" && -f "$relay_binary" ]] ||
        fail "relay binary $relay_binary not found or not executable. Run cargo build first, or pass the binary's path."
    relay_binary="$(cd "$(dirname "$relay_binary")" && pwd)/$(basename "$relay_binary")"
    require_command python3 "Install Python 3, which picks free ports and makes secrets."
    require_command curl "Install curl, which checks that the servers respond."

    local newman
    newman="$(find_newman)"
    run_servers_and_newman "$relay_binary" "$newman"
}

main "$@"
