#!/usr/bin/env bash
# Figures of the running local cluster (start it with scripts/cluster.sh up first):
#  - idle resident memory of every node (VmRSS, and RssAnon: what the node alone costs) and
#    its CPU over IDLE_SECS (default 30);
#  - failure detection: SIGKILL a node ROUNDS times (default 5) and time until every other
#    node reports it dead, then restart it and time until all see it alive again;
#  - idle heap per plugin (HEAP=0 skips it): a 5-node cluster of its own per plugin, on the
#    ports of cluster.toml + 1000 with data in a temporary folder, so the running cluster is
#    not touched. A plugin's figure is the nodes' private memory (RssAnon, averaged) with it
#    minus without it (with only the plugins it calls), HEAP_SETTLE s (default 15) after
#    every node sees every other alive; each plugin is held to 1 MB.
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

[ "${HEAP:-1}" = 0 ] && exit 0
SETTLE=${HEAP_SETTLE:-15}
echo "== idle heap per plugin (private memory per node, average of 5 nodes, ${SETTLE} s after all are alive)"
tmp=$(mktemp -d)
hcfg=$tmp/cluster.toml
hrun() { DSYS_CONFIG=$hcfg DSYS_RUN_DIR=$tmp/run "$@"; }
trap 'hrun scripts/cluster.sh down >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
sed -E -e 's/^(gossip_port|rpc_port|http_port) = 7([0-9]{3})/\1 = 8\2/' -e 's/= 74([0-9]{2})/= 84\1/g' \
  -e "s#^data_dir = \"run/#data_dir = \"$tmp/#" "${DSYS_CONFIG:-cluster.toml}" >"$hcfg"
for p in $(sed -n 's/^\(gossip\|rpc\|http\)_port = \([0-9]*\)/\2/p' "$hcfg"); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "port $p is in use; skipping the heap figures" >&2; exit 1; fi
done
anon_kb() { # plugins -> average RssAnon (KiB) of the nodes running only them
  DSYS_AGENT_ARGS="--plugins $1" hrun scripts/cluster.sh up >/dev/null
  sleep "$SETTLE"
  local sum=0 k=0 n
  for n in $(hrun scripts/cluster.sh running); do
    sum=$(( sum + $(awk '/RssAnon/{print $2}' "/proc/$(cat "$tmp/run/pids/$n.pid")/status") )); k=$((k + 1))
  done
  hrun scripts/cluster.sh down >/dev/null
  rm -rf "$tmp/data"
  echo $(( sum / k ))
}
mb() { awk -v k="$1" 'BEGIN{printf "%.2f", k/1024}'; }
declare -A kb_of # plugin set -> KiB, each set measured once
measure() { [ -n "${kb_of[$1]:-}" ] || kb_of[$1]=$(anon_kb "$1"); }
# What each plugin calls, so it runs as it would in a full node.
declare -A deps=([ratelimit]=consensus,config [config]=consensus [lock]=consensus
  [election]=consensus [idgen]=consensus)
measure none
printf "%-10s %18s %16s  %s\n" plugin "private MB/node" "its idle heap" "budget 1 MB"
printf "%-10s %18s %16s\n" runtime "$(mb "${kb_of[none]}")" "-"
over=0 total=0
for p in ring wal kv cache consensus ratelimit config lock election idgen; do
  d=${deps[$p]:-none}
  if [ "$d" = none ]; then with=$p; else with=$d,$p; fi
  measure "$d"; measure "$with"
  kb=${kb_of[$with]}; diff=$(( kb - ${kb_of[$d]} )); total=$(( total + diff ))
  verdict=ok; [ "$diff" -gt 1024 ] && { verdict=OVER; over=1; }
  printf "%-10s %18s %13s MB  %s\n" "$p" "$(mb "$kb")" "$(mb "$diff")" "$verdict"
done
all=$(anon_kb ring,wal,kv,cache,consensus,ratelimit,config,lock,election,idgen)
echo "every plugin: $(mb "$all") MB private per node = runtime alone $(mb "${kb_of[none]}") MB + $(mb $(( all - ${kb_of[none]} ))) MB for the plugins (their figures above add up to $(mb "$total") MB)"
[ "$over" = 0 ] || echo "a plugin is over its 1 MB budget"
