#!/bin/sh
# Starts one Redis of a Sentinel-managed pair as the primary or as a replica of it. The sentinels say
# which server is the primary; when none answers (the very first start), FIRST_PRIMARY is. So a server
# that comes back after a failover rejoins as a replica of the new primary instead of a second primary.
# Used by components/redis-sentinel (Kubernetes) and by deploy/compose.yaml's `ha` profile.
set -eu
: "${SENTINELS:?space-separated host:port of every sentinel}"
: "${FIRST_PRIMARY:?the server (host or host:port) that is primary when no sentinel answers}"
MASTER_NAME="${MASTER_NAME:-mymaster}"
REDIS_PORT="${REDIS_PORT:-6379}"
ANNOUNCE_HOST="${ANNOUNCE_HOST:-$(hostname)}"
REDIS_CONF="${REDIS_CONF:-/etc/redis/redis.conf}"

. "$(dirname "$0")/primary.sh"
primary=$(primary_now | tr ' ' :)

# The script's own arguments go to redis-server after the config file, like the image's entrypoint.
if [ "$primary" = "$ANNOUNCE_HOST:$REDIS_PORT" ]; then
  echo "start-redis: $ANNOUNCE_HOST starts as the primary of $MASTER_NAME"
  exec redis-server "$REDIS_CONF" "$@" --port "$REDIS_PORT" --replica-announce-ip "$ANNOUNCE_HOST"
fi
echo "start-redis: $ANNOUNCE_HOST starts as a replica of $primary"
exec redis-server "$REDIS_CONF" "$@" --port "$REDIS_PORT" --replica-announce-ip "$ANNOUNCE_HOST" \
  --replicaof "${primary%:*}" "${primary##*:}"
