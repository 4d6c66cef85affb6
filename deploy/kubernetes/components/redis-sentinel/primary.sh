# Sourced by start-redis.sh and start-sentinel.sh: which server is the primary now.
# primary_now [SKIP]: prints "host port" as the first sentinel of SENTINELS that answers names it
# (skipping the sentinel SKIP, host:port), or FIRST_PRIMARY ("host" or "host:port", port 6379 by
# default) when none does: the very first start.
primary_now() {
  for sentinel in $SENTINELS; do
    [ "$sentinel" = "${1:-}" ] && continue
    answer=$(timeout 3 redis-cli -h "${sentinel%:*}" -p "${sentinel##*:}" \
      sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null) || answer=""
    host=$(echo "$answer" | sed -n 1p)
    port=$(echo "$answer" | sed -n 2p)
    if [ -n "$host" ] && [ -n "$port" ]; then echo "$host $port"; return; fi
  done
  case "$FIRST_PRIMARY" in
    *:*) echo "${FIRST_PRIMARY%:*} ${FIRST_PRIMARY##*:}" ;;
    *) echo "$FIRST_PRIMARY 6379" ;;
  esac
}
