#!/usr/bin/env bash
# Compares redis-benchmark throughput of a real
# redis-server with one dsys node and with a 3-node dsys cluster (most keys owned by another
# node than the one the benchmark talks to), with and without pipelining, and prints ratios.
# Needs: redis-server and redis-tools (apt-get install -y redis-server), cluster.toml with
# [plugins.cache] ports (n1 = 7401 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200000}
C=${C:-50}
REDIS_PORT=${REDIS_PORT:-6390}
RUN=${DSYS_RUN_DIR:-run}
mkdir -p "$RUN"

command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || {
  echo "installing redis-server (Debian package)" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server redis-tools) >/dev/null
}

# ops/s of SET and GET as "set get"
bench() { # port [extra args]
  local port=$1; shift
  redis-benchmark -p "$port" -t set,get -n "$N" -c "$C" -r 100000 --csv "$@" 2>/dev/null |
    awk -F'","' '/"SET"/{gsub(/"/,"",$2); s=$2} /"GET"/{gsub(/"/,"",$2); g=$2} END{print s, g}'
}

wait_resp() { # port: until the node's RESP listener answers PING (plugins start after the node)
  for _ in $(seq 150); do [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ] && return 0; sleep 0.2; done
  echo "bench-cache: nothing answers RESP on port $1" >&2; return 1
}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize yes --pidfile "$PWD/$RUN/bench-redis.pid" --logfile "$PWD/$RUN/bench-redis.log"
trap 'kill "$(cat "$RUN/bench-redis.pid" 2>/dev/null)" 2>/dev/null || true; scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
sleep 0.5

declare -A R
read -r R[redis_set] R[redis_get] < <(bench "$REDIS_PORT")
read -r R[redis_set_p] R[redis_get_p] < <(bench "$REDIS_PORT" -P 16)

scripts/cluster.sh up 1 >/dev/null
wait_resp 7401
read -r R[one_set] R[one_get] < <(bench 7401)
read -r R[one_set_p] R[one_get_p] < <(bench 7401 -P 16)
scripts/cluster.sh down >/dev/null

scripts/cluster.sh up 3 >/dev/null   # returns once every node sees the 3 alive
for p in 7401 7402 7403; do wait_resp $p; done
read -r R[three_set] R[three_get] < <(bench 7401)
read -r R[three_set_p] R[three_get_p] < <(bench 7401 -P 16)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "-" }'; }
printf '%-28s %12s %12s %8s %8s\n' target SET/s GET/s set-x get-x
row() { printf '%-28s %12s %12s %8s %8s\n' "$1" "$2" "$3" "$(ratio "$2" "$4")" "$(ratio "$3" "$5")"; }
row "redis-server"            "${R[redis_set]}"   "${R[redis_get]}"   "${R[redis_set]}"   "${R[redis_get]}"
row "redis-server -P 16"      "${R[redis_set_p]}" "${R[redis_get_p]}" "${R[redis_set_p]}" "${R[redis_get_p]}"
row "dsys 1 node"             "${R[one_set]}"     "${R[one_get]}"     "${R[redis_set]}"   "${R[redis_get]}"
row "dsys 1 node -P 16"       "${R[one_set_p]}"   "${R[one_get_p]}"   "${R[redis_set_p]}" "${R[redis_get_p]}"
row "dsys 3 nodes via n1"     "${R[three_set]}"   "${R[three_get]}"   "${R[redis_set]}"   "${R[redis_get]}"
row "dsys 3 nodes via n1 -P16" "${R[three_set_p]}" "${R[three_get_p]}" "${R[redis_set_p]}" "${R[redis_get_p]}"
echo "targets: 1 node >= 0.90x (no pipelining), >= 0.70x (-P 16); 3 nodes >= 0.50x"
