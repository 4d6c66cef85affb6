#!/bin/sh
# Starts one Sentinel watching MASTER_NAME. It monitors the primary the other sentinels name (after a
# failover, the new one), or FIRST_PRIMARY when none answers. Sentinel rewrites its own config file,
# so it is written to a writable directory (SENTINEL_DIR) on each start.
# Used by components/redis-sentinel (Kubernetes) and by deploy/compose.yaml's `ha` profile.
set -eu
: "${SENTINELS:?space-separated host:port of every sentinel}"
: "${FIRST_PRIMARY:?the server (host or host:port) that is primary when no sentinel answers}"
MASTER_NAME="${MASTER_NAME:-mymaster}"
SENTINEL_PORT="${SENTINEL_PORT:-26379}"
ANNOUNCE_HOST="${ANNOUNCE_HOST:-$(hostname)}"
SENTINEL_DIR="${SENTINEL_DIR:-/data}"
QUORUM="${QUORUM:-2}"                      # of three: a failover needs two sentinels to agree
DOWN_AFTER_MS="${DOWN_AFTER_MS:-5000}"     # a primary silent this long is down

. "$(dirname "$0")/primary.sh"
primary=$(primary_now "$ANNOUNCE_HOST:$SENTINEL_PORT")

mkdir -p "$SENTINEL_DIR"
cat > "$SENTINEL_DIR/sentinel.conf" <<CONF
port $SENTINEL_PORT
dir $SENTINEL_DIR
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $ANNOUNCE_HOST
sentinel announce-port $SENTINEL_PORT
sentinel monitor $MASTER_NAME $primary $QUORUM
sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS
sentinel failover-timeout $MASTER_NAME 60000
sentinel parallel-syncs $MASTER_NAME 1
CONF
echo "start-sentinel: $ANNOUNCE_HOST watches $MASTER_NAME at $primary"
exec redis-server "$SENTINEL_DIR/sentinel.conf" --sentinel
