#!/usr/bin/env bash
# Compares redis-benchmark throughput of a real
# redis-server with one dsys node and with a 3-node dsys cluster (most keys owned by another
# node than the one the benchmark talks to), with and without pipelining, and prints ratios,
# and the servers' CPU time per request (steadier than throughput on a shared machine).
# DSYS_BIN=path uses that binary instead of building target/release/dsys.
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

# CPU ticks (user + system, 1/CLK_TCK s) used so far by the server processes in $PIDS.
PIDS=""
ticks() { local t=0 p; for p in $PIDS; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
HZ=$(getconf CLK_TCK)

# "SET/s GET/s SET-cpu-us/op GET-cpu-us/op": throughput, and the servers' CPU per request
# (summed over every server process), which the other load of a shared machine disturbs
# much less than the throughput.
bench() { # port [extra args]
  local port=$1 t out=() a b r; shift
  for t in set get; do
    a=$(ticks)
    r=$(redis-benchmark -p "$port" -t "$t" -n "$N" -c "$C" -r 100000 --csv "$@" 2>/dev/null |
      awk -F'","' 'NR > 1 {gsub(/"/, "", $2); print $2}')
    b=$(ticks)
    out+=("$r" "$(awk -v d=$((b - a)) -v hz="$HZ" -v n="$N" 'BEGIN{printf "%.1f", d * 1e6 / hz / n}')")
  done
  echo "${out[0]} ${out[2]} ${out[1]} ${out[3]}"
}

wait_resp() { # port: until the node's RESP listener answers PING (plugins start after the node)
  for _ in $(seq 150); do [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ] && return 0; sleep 0.2; done
  echo "bench-cache: nothing answers RESP on port $1" >&2; return 1
}

# The script starts its own 1- and 3-node clusters: nodes left running would join them.
for p in 7401 7402 7403 7404 7405; do
  if [ "$(redis-cli -p "$p" ping 2>/dev/null)" = PONG ]; then
    echo "bench-cache: a node already answers on port $p; stop it first (scripts/cluster.sh down)" >&2
    exit 1
  fi
done

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize yes --pidfile "$PWD/$RUN/bench-redis.pid" --logfile "$PWD/$RUN/bench-redis.log"
trap 'kill "$(cat "$RUN/bench-redis.pid" 2>/dev/null)" 2>/dev/null || true; scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
sleep 0.5

# An untimed pass before each target's measured runs, the same for redis-server and dsys: a
# node that has just started is still starting its other plugins and settling membership,
# and that CPU would otherwise be charged to the first measured run.
warm() { redis-benchmark -p "$1" -t set,get -n 50000 -c "$C" -r 100000 -q >/dev/null 2>&1 || true; sleep 1; }

node_pids() { local f; for f in "$RUN"/pids/n*.pid; do cat "$f"; done | tr '\n' ' '; }

declare -A R
warm "$REDIS_PORT"
PIDS=$(cat "$RUN/bench-redis.pid")
read -r R[redis_set] R[redis_get] R[redis_set_c] R[redis_get_c] < <(bench "$REDIS_PORT")
read -r R[redisP_set] R[redisP_get] R[redisP_set_c] R[redisP_get_c] < <(bench "$REDIS_PORT" -P 16)

scripts/cluster.sh up 1 >/dev/null
wait_resp 7401
warm 7401
PIDS=$(node_pids)
read -r R[one_set] R[one_get] R[one_set_c] R[one_get_c] < <(bench 7401)
read -r R[oneP_set] R[oneP_get] R[oneP_set_c] R[oneP_get_c] < <(bench 7401 -P 16)
scripts/cluster.sh down >/dev/null

scripts/cluster.sh up 3 >/dev/null   # returns once every node sees the 3 alive
for p in 7401 7402 7403; do wait_resp $p; done
warm 7401
PIDS=$(node_pids)
read -r R[three_set] R[three_get] R[three_set_c] R[three_get_c] < <(bench 7401)
read -r R[threeP_set] R[threeP_get] R[threeP_set_c] R[threeP_get_c] < <(bench 7401 -P 16)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "-" }'; }
fmt='%-26s %11s %11s %6s %6s | %9s %9s\n'
printf "$fmt" target SET/s GET/s set-x get-x "SET cpu" "GET cpu"
row() { # name key baseline-key
  printf "$fmt" "$1" "${R[$2_set]}" "${R[$2_get]}" "$(ratio "${R[$2_set]}" "${R[$3_set]}")" \
    "$(ratio "${R[$2_get]}" "${R[$3_get]}")" "${R[$2_set_c]}us" "${R[$2_get_c]}us"
}
row "redis-server"             redis  redis
row "redis-server -P 16"       redisP redisP
row "dsys 1 node"              one    redis
row "dsys 1 node -P 16"        oneP   redisP
row "dsys 3 nodes via n1"      three  redis
row "dsys 3 nodes via n1 -P16" threeP redisP
echo "targets: 1 node >= 0.90x (no pipelining), >= 0.70x (-P 16); 3 nodes >= 0.50x"
echo "cpu: server CPU time per request (user + system, summed over the server processes: 1 for"
echo "redis-server, every dsys node); load average now: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
