#!/usr/bin/env bash
# Functions bench/run.sh and bench/profile.sh share: tools, build, certificates, nginx
# configurations, the processes under test and the targets they serve. Sourcing scripts set
# BENCH_DIR and RELAY_DIR first.
#
# Every server listens on 127.0.0.1 only, and the EXIT trap stops exactly the processes the
# sourcing script started, by PID.

PIDS=()
RUN_DIR=""

log() {
    printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2
}

fail() {
    log "error: $*"
    exit 1
}

# Stops the processes the sourcing script started: SIGTERM first, SIGKILL for any still running 10 s
# later. nginx masters stop their own workers on SIGTERM.
cleanup() {
    local status=$?
    local pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "process $pid still running 10 s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    if [[ -n $RUN_DIR && -d $RUN_DIR ]]; then
        if [[ ${KEEP_RUN_DIR:-0} == 1 || $status != 0 ]]; then
            log "run folder kept: $RUN_DIR"
        else
            rm -rf "$RUN_DIR"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Tools and build

# Installs what the benchmark needs and is missing, plus the packages of the extra
# `command:package` pairs given as arguments.
install_tools() {
    local missing=() extra
    for extra in "$@"; do
        command -v "${extra%%:*}" >/dev/null || missing+=("${extra#*:}")
    done
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v python3 >/dev/null || missing+=(python3)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v curl >/dev/null || missing+=(curl)
    if ((${#missing[@]} > 0)); then
        log "installing ${missing[*]}"
        # NOTE: where invoke-rc.d may start services, Debian's nginx and redis-server packages
        # start their system service on install (nginx on port 80 of every address).
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

# Builds the relay as BUILD selects: `pgo` (default) is the profile-guided build the
# container image ships (deploy/build-pgo.sh), `plain` is `cargo build --release --locked`.
build_relay() {
    case ${BUILD:=pgo} in
        pgo)
            [[ -f $RELAY_DIR/deploy/build-pgo.sh ]] ||
                fail "$RELAY_DIR has no deploy/build-pgo.sh; measure it with BUILD=plain"
            BUILD_COMMAND="bash deploy/build-pgo.sh"
            RELAY_BIN=$RELAY_DIR/target/pgo/release/api-relay
            ;;
        plain)
            BUILD_COMMAND="cargo build --release --locked"
            RELAY_BIN=$RELAY_DIR/target/release/api-relay
            ;;
        *) fail "BUILD must be pgo or plain, not $BUILD" ;;
    esac
    log "building the relay in $RELAY_DIR: $BUILD_COMMAND"
    (cd "$RELAY_DIR" && $BUILD_COMMAND)
    [[ -x $RELAY_BIN ]] || fail "relay binary not found at $RELAY_BIN after the build"
}

# Prints N distinct free TCP ports on 127.0.0.1. All sockets stay bound until every port is
# chosen, so the ports differ. Another program could still take one before a server binds it.
free_ports() {
    python3 - "$1" <<'EOF'
import socket
import sys

sockets = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
print(" ".join(str(s.getsockname()[1]) for s in sockets))
EOF
}

# ---------------------------------------------------------------------------------------------
# Certificates: one throw-away CA, a server certificate for nginx B and a client certificate
# for nginx A, all ECDSA P-256.

make_certificates() {
    local dir=$RUN_DIR/certs
    mkdir -p "$dir"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 2 -subj "/CN=api-relay bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$dir/ca.crt"

    local name usage
    for name in server client; do
        if [[ $name == server ]]; then
            usage="extendedKeyUsage=serverAuth
subjectAltName=DNS:$PEER_TLS_NAME"
        else
            usage="extendedKeyUsage=clientAuth"
        fi
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/$name.key" 2>/dev/null
        openssl req -new -key "$dir/$name.key" -subj "/CN=bench-$name" -out "$dir/$name.csr"
        printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n%s\n' "$usage" >"$dir/$name.ext"
        openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
            -CAcreateserial -days 2 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
    done
    openssl verify -CAfile "$dir/ca.crt" "$dir/server.crt" "$dir/client.crt" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# nginx configurations

# Settings every nginx instance shares: process files in the run folder, no daemon.
nginx_common() {
    local name=$1 workers=$2
    cat <<EOF
daemon off;
worker_processes $workers;
worker_rlimit_nofile 16384;
pid $RUN_DIR/$name.pid;
error_log $RUN_DIR/$name.error.log warn;
events {
    worker_connections 8192;
}
EOF
}

# Temporary paths inside the run folder, so no instance touches the system's nginx folders.
nginx_temp_paths() {
    local name=$1
    cat <<EOF
    client_body_temp_path $RUN_DIR/tmp/$name/body;
    proxy_temp_path $RUN_DIR/tmp/$name/proxy;
    fastcgi_temp_path $RUN_DIR/tmp/$name/fastcgi;
    uwsgi_temp_path $RUN_DIR/tmp/$name/uwsgi;
    scgi_temp_path $RUN_DIR/tmp/$name/scgi;
EOF
}

# The upstream API: POST /api, /api/64k and /api/1m return 200 with a fixed JSON body of
# 1024 bytes, 64 KiB and 1 MiB. The static module rejects POST with 405, so each location
# returns 405 and error_page turns it into a GET of the file with status 200.
write_upstream_config() {
    {
        nginx_common upstream 2
        cat <<EOF
http {
    access_log off;
$(nginx_temp_paths upstream)
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    sendfile on;
    tcp_nopush on;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT backlog=4096;
        root $RUN_DIR/www;
        default_type application/json;
        client_max_body_size 4m;
        location = /api     { error_page 405 =200 /files/body-1k.json;  return 405; }
        location = /api/64k { error_page 405 =200 /files/body-64k.json; return 405; }
        location = /api/1m  { error_page 405 =200 /files/body-1m.json;  return 405; }
        location /files/    { internal; }
    }
}
EOF
    } >"$RUN_DIR/upstream.conf"
}

# Settings both hops of the nginx pair share: stream request bodies like the relay does, keep
# response buffering in memory only, access log buffered to a file like the relay's log.
nginx_proxy_common() {
    cat <<EOF
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_request_buffering off;
        proxy_max_temp_file_size 0;
        client_max_body_size 4m;
EOF
}

# nginx A: plain HTTP from the application, HTTPS with a client certificate to nginx B.
write_nginx_a_config() {
    {
        nginx_common nginx-a 2
        cat <<EOF
http {
    access_log $RUN_DIR/nginx-a.access.log combined buffer=64k flush=1s;
$(nginx_temp_paths nginx-a)
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream nginx_b {
        server 127.0.0.1:$NGINX_B_PORT;
        keepalive 512;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }
    server {
        listen 127.0.0.1:$NGINX_A_PORT backlog=4096;
        location / {
            proxy_pass https://nginx_b;
$(nginx_proxy_common)
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate $RUN_DIR/certs/client.crt;
            proxy_ssl_certificate_key $RUN_DIR/certs/client.key;
            proxy_ssl_trusted_certificate $RUN_DIR/certs/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name $PEER_TLS_NAME;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF
    } >"$RUN_DIR/nginx-a.conf"
}

# nginx B: HTTPS that requires a client certificate signed by the bench CA, plain HTTP to the
# upstream API.
write_nginx_b_config() {
    {
        nginx_common nginx-b 2
        cat <<EOF
http {
    access_log $RUN_DIR/nginx-b.access.log combined buffer=64k flush=1s;
$(nginx_temp_paths nginx-b)
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream upstream_api {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 512;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }
    server {
        listen 127.0.0.1:$NGINX_B_PORT ssl backlog=4096;
        ssl_protocols TLSv1.3;
        ssl_certificate $RUN_DIR/certs/server.crt;
        ssl_certificate_key $RUN_DIR/certs/server.key;
        ssl_client_certificate $RUN_DIR/certs/ca.crt;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_session_cache shared:nginx_b_sessions:10m;
        location / {
            proxy_pass http://upstream_api;
$(nginx_proxy_common)
        }
    }
}
EOF
    } >"$RUN_DIR/nginx-b.conf"
}

# Writes a JSON body of exactly $2 bytes to $1: {"data":"xxx...x"}.
write_body() {
    local file=$1 size=$2
    python3 - "$file" "$size" <<'EOF'
import sys

path, size = sys.argv[1], int(sys.argv[2])
prefix, suffix = b'{"data":"', b'"}'
with open(path, "wb") as f:
    f.write(prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix)
EOF
}

# ---------------------------------------------------------------------------------------------
# Processes

start_nginx() {
    local name=$1
    mkdir -p "$RUN_DIR/tmp/$name"
    nginx -t -q -c "$RUN_DIR/$name.conf" -p "$RUN_DIR" 2>>"$RUN_DIR/$name.error.log" ||
        fail "nginx rejected $RUN_DIR/$name.conf; see $RUN_DIR/$name.error.log"
    nginx -c "$RUN_DIR/$name.conf" -p "$RUN_DIR" 2>>"$RUN_DIR/$name.error.log" &
    PIDS+=($!)
    printf -v "PID_${name//-/_}" '%s' "$!"
}

# Starts one relay. $1 names it, $2 is its port, $3 its OUTBOUND_TOKEN, and the rest are extra
# VAR=value settings. The relay's JSON log goes to $RUN_DIR/<name>.log.
start_relay() {
    local name=$1 port=$2 token=$3
    shift 3
    env UPSTREAM="http://127.0.0.1:$UPSTREAM_PORT" \
        CLIENT_ID_SECRET="$(openssl rand -hex 32)" \
        OUTBOUND_TOKEN="$token" \
        PAIRING_PSK="$PAIRING_PSK" \
        PORT="$port" BIND_ADDRESS=127.0.0.1 LOG_FORMAT=json \
        "$@" "$RELAY_BIN" >"$RUN_DIR/$name.log" 2>&1 &
    PIDS+=($!)
    printf -v "PID_${name//-/_}" '%s' "$!"
}

start_redis() {
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$RUN_DIR" --logfile "$RUN_DIR/redis.log" &
    PIDS+=($!)
    # shellcheck disable=SC2034  # bench/run.sh reads it
    PID_redis=$!
}

# Waits up to 20 s until a request to $1 returns status $2.
wait_for_http() {
    local url=$1 expected=$2 status
    for _ in $(seq 1 200); do
        status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [[ $status == "$expected" ]] && return 0
        sleep 0.1
    done
    fail "$url did not return $expected within 20 s (last status: ${status:-none})"
}

# Sends one request of each body size through a target and checks status and body size.
check_target() {
    local target=$1 size path expected status bytes
    for size in 1k 64k 1m; do
        path=$(path_for "$size")
        expected=$(stat -c %s "$RUN_DIR/www/files/body-$size.json")
        read -r status bytes < <(curl -s -o /dev/null -w '%{http_code} %{size_download}\n' --max-time 10 \
            -H 'content-type: application/json' \
            -H "x-mte-outbound-token: $OUTBOUND_TOKEN" -H "x-mte-upstream: $(peer_for "$target")" \
            --data-binary "@$RUN_DIR/www/files/body-$size.json" "$(url_for "$target")$path")
        [[ $status == 200 && $bytes == "$expected" ]] ||
            fail "check of $target with $size body failed: status $status, $bytes bytes (expected 200, $expected bytes)"
    done
}

# ---------------------------------------------------------------------------------------------
# Targets and measurements

url_for() {
    case $1 in
        direct) echo "http://127.0.0.1:$UPSTREAM_PORT" ;;
        nginx) echo "http://127.0.0.1:$NGINX_A_PORT" ;;
        relay) echo "http://127.0.0.1:$RELAY_A_PORT" ;;
        relay-redis) echo "http://127.0.0.1:$REDIS_RELAY_A_PORT" ;;
    esac
}

# The x-mte-upstream header value: relay B of the pair. Other targets ignore the header.
peer_for() {
    case $1 in
        relay-redis) echo "http://127.0.0.1:$REDIS_RELAY_B_PORT" ;;
        *) echo "http://127.0.0.1:$RELAY_B_PORT" ;;
    esac
}

path_for() {
    case $1 in
        1k) echo /api ;;
        64k) echo /api/64k ;;
        1m) echo /api/1m ;;
    esac
}

# PIDs whose CPU time a target's figure counts: both relays, or both nginx masters and their
# workers. The direct target counts nothing. start_nginx and start_relay set the PID_* names.
# shellcheck disable=SC2154
measured_pids() {
    local master
    case $1 in
        relay) echo "$PID_relay_a $PID_relay_b" ;;
        relay-redis) echo "$PID_redis_relay_a $PID_redis_relay_b" ;;
        nginx)
            for master in "$PID_nginx_a" "$PID_nginx_b"; do
                echo "$master $(cat "/proc/$master/task/$master/children")"
            done | tr '\n' ' '
            ;;
    esac
}

# Sums utime + stime, in clock ticks, of the given PIDs from /proc/<pid>/stat.
cpu_ticks() {
    local pid total=0 stat fields
    for pid in "$@"; do
        stat=$(<"/proc/$pid/stat")
        # After the ")" that closes the command name, fields[0] is the state (field 3 in proc(5)),
    # so utime (field 14) is fields[11] and stime (field 15) is fields[12].
        read -r -a fields <<<"${stat##*) }"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# Prints VmHWM of a PID in KiB.
peak_rss_kib() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

# Resets VmHWM of a PID to its current resident set (Linux clear_refs value 5).
reset_peak_rss() {
    echo 5 >"/proc/$1/clear_refs"
}


# Creates the run folder with the three body files, and sets RUN_DIR.
prepare_run_dir() {
    RUN_DIR=$(mktemp -d /tmp/api-relay-bench.XXXXXX)
    # nginx workers run as an unprivileged user when started by root, so they need to read the
    # body files and write their temporary folders.
    chmod 755 "$RUN_DIR"
    mkdir -p "$RUN_DIR/www/files"
    log "run folder: $RUN_DIR"
    write_body "$RUN_DIR/www/files/body-1k.json" 1024
    write_body "$RUN_DIR/www/files/body-64k.json" 65536
    write_body "$RUN_DIR/www/files/body-1m.json" 1048576
    chmod -R a+rX "$RUN_DIR/www"
}

# Sends 1 KB requests through each target named in the arguments for 2 s, 100 connections: the
# first requests pair the relays and open keep-alive connections on every hop.
warm_up() {
    local target
    for target in "$@"; do
        BENCH_BODY_FILE=$RUN_DIR/www/files/body-1k.json BENCH_OUT=$RUN_DIR/warmup.json \
            BENCH_OUTBOUND_TOKEN=$OUTBOUND_TOKEN BENCH_PEER=$(peer_for "$target") \
            wrk -t"$THREADS" -c100 -d2s -s "$BENCH_DIR/post.lua" "$(url_for "$target")/api" >/dev/null
    done
}
