# shellcheck shell=bash
# Helpers shared by scripts/bench-peers and scripts/loadtest-smoke: build the
# binaries, pick free ports, start servers and wait until they accept, and stop
# exactly the processes we started (by pid, never by name).

LT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LT_PIDS=()

# lt_build PROFILE PACKAGE... : cargo build; prints nothing, fails loudly.
lt_build() {
    local profile=$1
    shift
    local args=()
    for p in "$@"; do args+=(-p "$p"); done
    if [ "$profile" = release ]; then
        (cd "$LT_ROOT" && cargo build --release "${args[@]}")
    else
        (cd "$LT_ROOT" && cargo build "${args[@]}")
    fi
}

# lt_bin PROFILE NAME : path of a built binary.
lt_bin() {
    local dir=${CARGO_TARGET_DIR:-$LT_ROOT/target}
    case $dir in /*) ;; *) dir=$LT_ROOT/$dir ;; esac
    echo "$dir/$([ "$1" = release ] && echo release || echo debug)/$2"
}

# lt_free_port : a TCP port on 127.0.0.1 that nothing listens on right now.
lt_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# lt_wait_port PORT [SECONDS] : wait until 127.0.0.1:PORT accepts TCP.
lt_wait_port() {
    local port=$1 deadline=$((SECONDS + ${2:-20}))
    while [ $SECONDS -lt "$deadline" ]; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listening on 127.0.0.1:$port after ${2:-20}s" >&2
    return 1
}

# lt_start LOGFILE CMD... : start a server in the background, remember its pid in LT_LAST_PID.
lt_start() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    LT_LAST_PID=$!
    LT_PIDS+=("$LT_LAST_PID")
}

# lt_stop_all : stop the servers this script started (SIGTERM, then SIGKILL).
lt_stop_all() {
    local pid
    for pid in "${LT_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    sleep 0.5
    for pid in "${LT_PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    LT_PIDS=()
}

# lt_utc_date : YYYY-MM-DD in UTC.
lt_utc_date() {
    date -u +%F
}
