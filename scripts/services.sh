#!/usr/bin/env bash
# Ensure the brokers the tests use are up: Redis on 127.0.0.1:6379 and RabbitMQ on
# 127.0.0.1:5672. Starts whichever is not answering; safe to run when both already are.
# A server that is not installed is reported and skipped (its tests skip with a reason);
# one that is installed but does not come up is an error.
set -euo pipefail

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

if port_open 6379; then
    log "redis already running on 127.0.0.1:6379"
elif ! command -v redis-server >/dev/null; then
    log "redis-server not installed; Redis tests will skip"
else
    log "starting redis-server (log: /tmp/taskmeter-redis.log)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /tmp --logfile /tmp/taskmeter-redis.log
    wait_port redis 6379 10
fi

if port_open 5672; then
    log "rabbitmq already running on 127.0.0.1:5672"
elif ! command -v rabbitmq-server >/dev/null; then
    log "rabbitmq-server not installed; RabbitMQ tests will skip"
else
    log "starting rabbitmq-server -detached"
    # A node still booting makes -detached complain; the port probe below decides.
    rabbitmq-server -detached || log "rabbitmq-server -detached exited $?; waiting for the port"
    wait_port rabbitmq 5672 60
fi
