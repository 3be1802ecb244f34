#!/usr/bin/env bash
# Ensure the brokers the tests use are up: Redis on 127.0.0.1:6379 and RabbitMQ on
# 127.0.0.1:5672 (REDIS_PORT / RABBITMQ_PORT override the ports; RabbitMQ gets its port
# as RABBITMQ_NODE_PORT). Starts whichever is not answering; safe to run when both
# already are. One that is installed but does not come up is an error. One that is not
# installed is an error under CI (env CI=true, 1 or yes: its tests would fail anyway),
# locally a note (its tests skip with the reason).
set -euo pipefail

REDIS_PORT=${REDIS_PORT:-6379}
RABBITMQ_PORT=${RABBITMQ_PORT:-5672}
case ${CI:-} in
[Tt][Rr][Uu][Ee] | 1 | [Yy][Ee][Ss]) STRICT=1 ;;
*) STRICT=0 ;;
esac

log() { echo "services: $*"; }

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_port() { # NAME PORT SECONDS
    local i
    for ((i = 0; i < $3 * 2; i++)); do
        port_open "$2" && { log "$1 is up on 127.0.0.1:$2"; return 0; }
        sleep 0.5
    done
    echo "services: ERROR: $1 did not open 127.0.0.1:$2 within $3 s" >&2
    return 1
}

not_installed() { # NAME WHAT
    if ((STRICT)); then
        echo "services: ERROR: $1 is not installed and CI=$CI: $2 tests would fail (scripts/setup.sh installs it)" >&2
        exit 1
    fi
    log "$1 not installed; $2 tests will skip"
}

if port_open "$REDIS_PORT"; then
    log "redis already running on 127.0.0.1:$REDIS_PORT"
elif ! command -v redis-server >/dev/null; then
    not_installed redis-server Redis
else
    log "starting redis-server on 127.0.0.1:$REDIS_PORT (log: /tmp/taskmeter-redis-$REDIS_PORT.log)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir /tmp --logfile "/tmp/taskmeter-redis-$REDIS_PORT.log"
    wait_port redis "$REDIS_PORT" 10
fi

if port_open "$RABBITMQ_PORT"; then
    log "rabbitmq already running on 127.0.0.1:$RABBITMQ_PORT"
elif ! command -v rabbitmq-server >/dev/null; then
    not_installed rabbitmq-server RabbitMQ
else
    log "starting rabbitmq-server -detached on 127.0.0.1:$RABBITMQ_PORT"
    # A node still booting makes -detached complain; the port probe below decides.
    RABBITMQ_NODE_PORT=$RABBITMQ_PORT rabbitmq-server -detached ||
        log "rabbitmq-server -detached exited $?; waiting for the port"
    wait_port rabbitmq "$RABBITMQ_PORT" 60
fi
