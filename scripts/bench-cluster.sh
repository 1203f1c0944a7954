#!/usr/bin/env bash
# Figures of the running local cluster (start it with scripts/cluster.sh up first):
#  - idle resident memory of every node (VmRSS, and RssAnon: what the node alone costs) and
#    its CPU over IDLE_SECS (default 30);
#  - failure detection: SIGKILL a node ROUNDS times (default 5) and time until every other
#    node reports it dead, then restart it and time until all see it alive again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DSYS_BIN:-target/release/dsys}
RUN=${DSYS_RUN_DIR:-run}
ROUNDS=${1:-5}
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
port_of() { scripts/cluster.sh port "$1"; }

IDLE_SECS=${IDLE_SECS:-30}
HZ=$(getconf CLK_TCK)
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; } # utime + stime
echo "== idle: resident memory now, CPU over the next ${IDLE_SECS} s"
declare -A T0
for n in $(scripts/cluster.sh running); do T0[$n]=$(ticks "$(cat "$RUN/pids/$n.pid")"); done
sleep "$IDLE_SECS"
total=0
for n in $(scripts/cluster.sh running); do
  pid=$(cat "$RUN/pids/$n.pid")
  d=$(( $(ticks "$pid") - ${T0[$n]} )); total=$(( total + d ))
  echo "$n: $(awk '/VmRSS/{r=$2} /RssAnon/{a=$2} END{printf "RSS %.1f MB (private %.1f MB)", r/1024, a/1024}' /proc/$pid/status), CPU $(awk -v d="$d" -v hz="$HZ" -v s="$IDLE_SECS" 'BEGIN{printf "%.2f%%", 100*d/hz/s}') of one core"
done
echo "cluster: CPU $(awk -v d="$total" -v hz="$HZ" -v s="$IDLE_SECS" 'BEGIN{printf "%.2f%%", 100*d/hz/s}') of one core in total"

echo "== failure detection (SIGKILL -> dead on every other node)"
mapfile -t nodes < <(scripts/cluster.sh running)
[ "${#nodes[@]}" -ge 3 ] || { echo "need at least 3 running nodes" >&2; exit 2; }
for r in $(seq 1 "$ROUNDS"); do
  victim=${nodes[$((r % ${#nodes[@]}))]}
  others=(); for n in "${nodes[@]}"; do [ "$n" != "$victim" ] && others+=("$n"); done
  scripts/cluster.sh kill "$victim" >/dev/null
  t0=$(date +%s%N)
  for o in "${others[@]}"; do
    until "$BIN" --json --endpoints "127.0.0.1:$(port_of "$o")" cluster status --no-usage | grep -A1 "\"id\": \"$victim\"" | grep -q '"dead"'; do sleep 0.02; done
  done
  dead=$(ms "$t0")
  scripts/cluster.sh start "$victim" >/dev/null
  t0=$(date +%s%N)
  for o in "${others[@]}"; do
    until "$BIN" --json --endpoints "127.0.0.1:$(port_of "$o")" cluster status --no-usage | grep -A1 "\"id\": \"$victim\"" | grep -q '"alive"'; do sleep 0.02; done
  done
  echo "round $r: $victim dead everywhere after ${dead} ms; back everywhere $(ms "$t0") ms after restart"
done
