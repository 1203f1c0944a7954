#!/usr/bin/env bash
# dsys Raft (plugins/consensus) side by side with etcd, in one run, on this machine:
#   1. write throughput: `etcdctl check perf --load=l` on a 3-member etcd against
#      `dsys bench raft` on 3 dsys nodes with the same workload (500 requests in flight, a
#      fresh random 256-byte key and a 1024-byte value per put, 8000 puts/s rate limit);
#   2. failover: SIGKILL the leader while a writer loops (one `put` after another through the
#      followers' endpoints, the same shell loop for both, 500 ms deadline per put), and time
#      from the kill to the end of the first put that started after it and succeeded (a put
#      that hangs past the recovery costs up to its 500 ms). TRIALS kills each (default 3).
# Prints both figures and the ratios. Installs etcd-server/etcd-client (Debian packages) when
# missing. Everything runs on 127.0.0.1 on non-default ports, data in a temporary folder that
# is removed at the end, and every process it started is stopped by PID.
#
#   scripts/bench-raft.sh            # full run (~4 min)
#   scripts/bench-raft.sh --quick    # sanity run (~1 min): no check perf (it always runs 60 s),
#                                    # a 5 s dsys bench, one kill each
# Environment: DSYS_BIN (default target/release/dsys, built if missing), TRIALS, DUR (the dsys
# bench's length), ETCD=0 skips etcd (dsys alone, when working on dsys), KEEP=1 keeps
# the temporary folder (logs) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "usage: scripts/bench-raft.sh [--quick]" >&2; exit 2 ;;
esac
TRIALS=${TRIALS:-$([ $QUICK = 1 ] && echo 1 || echo 3)}
DUR=${DUR:-$([ $QUICK = 1 ] && echo 5s || echo 60s)}
CONC=500        # check perf --load=l: 500 clients
RATE=8000       # check perf --load=l: rate.NewLimiter(8000, 1)
BIN=${DSYS_BIN:-target/release/dsys}
WORK=$(mktemp -d /tmp/dsys-bench-raft.XXXXXX)
export DSYS_CONFIG=$WORK/cluster.toml DSYS_RUN_DIR=$WORK/run DSYS_BIN=$BIN
declare -A EPID=()   # etcd member -> pid
WRITER=""
log() { echo "[$(date +%H:%M:%S)] $*"; }

cleanup() {
  set +e
  [ -n "$WRITER" ] && kill "$WRITER" 2>/dev/null
  stop_etcd
  [ -f "$DSYS_CONFIG" ] && scripts/cluster.sh down >/dev/null 2>&1
  wait 2>/dev/null
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK (logs)"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ns() { date +%s%N; }

# Failover figure from a writer log ("start_ns end_ns rc" per put) and the kill time: ms from
# the kill to the end of the first put that started after it and succeeded.
failover_ms() {
  awk -v k="$2" '$1 >= k && $3 == 0 { printf "%.0f\n", ($2 - k) / 1e6; found = 1; exit }
                 END { if (!found) print "none" }' "$1"
}

# Run "$@" (one put) in a loop, logging each attempt, until killed.
writer() {
  local out=$1; shift
  while :; do
    local s e rc
    s=$(now_ns)
    if "$@" >/dev/null 2>&1; then rc=0; else rc=1; fi
    e=$(now_ns)
    echo "$s $e $rc" >>"$out"
  done
}

# Wait (up to 20 s) until the writer logged a success that started after the kill.
wait_recovered() {
  local f=$1 k=$2
  for _ in $(seq 200); do
    [ "$(failover_ms "$f" "$k")" != none ] && return 0
    sleep 0.1
  done
  return 1
}

# Wait (up to 30 s) until the writer has three successes in a row: the cluster is serving
# writes (e.g. done with the aftermath of the throughput run) when the leader is killed.
wait_serving() {
  for _ in $(seq 300); do
    [ "$(tail -n 3 "$1" | awk '$3 == 0' | wc -l)" -ge 3 ] && return 0
    sleep 0.1
  done
  return 1
}

median() { sort -n | awk '{a[NR]=$1} END { if (NR == 0) print "none"; else print a[int((NR + 1) / 2)] }'; }

# ---------------------------------------------------------------- etcd
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  log "installing etcd-server and etcd-client (Debian packages)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client) >/dev/null
fi
export ETCDCTL_API=3
ECLUSTER="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
EP_ALL=http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793
start_etcd() { # member number, new|existing; started from a subshell, so that its SIGKILL
  local i=$1  # is not reported as a job of this script
  EPID[$i]=$( (etcd --name "e$i" --data-dir "$WORK/etcd/e$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$ECLUSTER" --initial-cluster-state "$2" --initial-cluster-token dsys-bench-raft \
    >>"$WORK/etcd-e$i.log" 2>&1 </dev/null & echo $!) )
}
stop_etcd() { # SIGTERM every member, then wait (up to 10 s) for them to exit
  local p
  for p in "${EPID[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 100); do
    local alive=0
    for p in "${EPID[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  EPID=()
}
etcd_healthy() { # all three members answer and agree on a leader
  etcdctl --endpoints "$EP_ALL" --command-timeout=2s endpoint health >/dev/null 2>&1
}
etcd_leader() { # prints the member number of the leader
  etcdctl --endpoints "$EP_ALL" --command-timeout=2s endpoint status 2>/dev/null |
    awk -F', ' '$5 == "true" { sub(/.*:2379/, "", $1); print $1; exit }'
}

ETCD_WPS=""; ETCD_FO=()
if [ "${ETCD:-1}" = 1 ]; then
mkdir -p "$WORK/etcd"
log "etcd $(etcd --version | awk '/etcd Version/ {print $3}'): 3 members on 127.0.0.1:23791-23793"
for i in 1 2 3; do start_etcd "$i" new; done
for _ in $(seq 150); do etcd_healthy && break; sleep 0.2; done
etcd_healthy || { echo "etcd did not become healthy; see $WORK/etcd-e*.log" >&2; exit 1; }

ETCD_WPS=""
if [ $QUICK = 0 ]; then
  log "etcd: etcdctl check perf --load=l (60 s, 500 clients, 8000 puts/s limit, 256 B keys, 1 KiB values)"
  uptime
  etcdctl --endpoints "$EP_ALL" check perf --load=l >"$WORK/perf.txt" 2>&1 || true
  tr '\r' '\n' <"$WORK/perf.txt" | grep -E 'writes/s|request|Stddev|PASS|FAIL|rror' || true
  ETCD_WPS=$(tr '\r' '\n' <"$WORK/perf.txt" | grep -oE '[0-9]+ writes/s' | grep -oE '^[0-9]+' | head -1 || true)
else
  log "etcd: --quick skips etcdctl check perf (it always runs 60 s)"
fi

ETCD_FO=()
for t in $(seq "$TRIALS"); do
  l=$(etcd_leader)
  [ -n "$l" ] || { echo "no etcd leader" >&2; exit 1; }
  followers=$(for i in 1 2 3; do if [ "$i" != "$l" ]; then printf 'http://127.0.0.1:2379%s,' "$i"; fi; done)
  wlog="$WORK/etcd-writer-$t.log"; : >"$wlog"
  writer "$wlog" etcdctl --endpoints "${followers%,}" --dial-timeout=500ms --command-timeout=500ms put failover-key v &
  WRITER=$!
  wait_serving "$wlog" || log "etcd trial $t: writes were not succeeding before the kill"
  l2=$(etcd_leader); [ -n "$l2" ] && [ "$l2" != "$l" ] && log "etcd trial $t: leader moved to e$l2 meanwhile"
  k=$(now_ns)
  kill -KILL "${EPID[$l]}"
  wait_recovered "$wlog" "$k" || true
  kill "$WRITER" 2>/dev/null || true; wait "$WRITER" 2>/dev/null || true; WRITER=""
  ms=$(failover_ms "$wlog" "$k")
  log "etcd trial $t: SIGKILL leader e$l -> first successful write after ${ms} ms"
  [ "$ms" != none ] && ETCD_FO+=("$ms")
  start_etcd "$l" existing
  for _ in $(seq 150); do etcd_healthy && break; sleep 0.2; done
done
stop_etcd

fi
# ---------------------------------------------------------------- dsys
if [ ! -x "$BIN" ]; then
  log "building the release binary"
  cargo build --release -p dsys-node >&2
fi
# The repository's cluster file on other ports (20000 up), with its data and certificates
# in the temporary folder; the consensus plugin's own timing defaults.
sed -E -e 's/([ =])(7[1-5]0[1-9])\b/\12\2/g' \
  -e "s#^certs_dir = .*#certs_dir = \"$WORK/certs\"#" \
  -e "s#^data_dir = \"run/data/#data_dir = \"$WORK/data/#" \
  -e '/^\[plugins\.consensus\]/,/^\[/{/^(heartbeat_ms|election_min_ms|election_max_ms|snapshot_every) *=/d}' \
  cluster.toml >"$DSYS_CONFIG"
port() { awk -v n="[nodes.$1]" '$0==n{f=1;next} /^\[/{f=0} f&&/^rpc_port/{print $3}' "$DSYS_CONFIG"; }
EPS=$(for n in n1 n2 n3; do printf '127.0.0.1:%s,' "$(port $n)"; done); EPS=${EPS%,}
dsys() { "$BIN" --config "$DSYS_CONFIG" "$@"; }
raft_leader() { # prints the leader's name once the three voters agree on one
  local l="" n s
  for n in n1 n2 n3; do
    s=$(dsys --endpoints "127.0.0.1:$(port $n)" --timeout 2s --json raft status 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["Status"]["leader"] or "")' 2>/dev/null) || return 1
    [ -n "$s" ] || return 1
    [ -z "$l" ] || [ "$l" = "$s" ] || return 1
    l=$s
  done
  echo "$l"
}
field() { # NODE FIELD: one field of that node's raft status
  dsys --endpoints "127.0.0.1:$(port "$1")" --timeout 2s --json raft status 2>/dev/null |
    python3 -c "import json,sys; print(json.load(sys.stdin)['Status']['$2'] or 0)" 2>/dev/null
}
# Wait (up to 60 s) until every voter has applied what the leader had committed: a follower
# that still lags (after the throughput run, or after its restart) would have to catch up
# before a new leader could commit anything, which is not what a failover measures.
wait_caught_up() {
  local l=$1 c n a
  c=$(field "$l" committed) || return 1
  for _ in $(seq 300); do
    local ok=1
    for n in n1 n2 n3; do
      a=$(field "$n" applied); [ "${a:-0}" -ge "${c:-0}" ] || { ok=0; break; }
    done
    [ $ok = 1 ] && return 0
    sleep 0.2
  done
  return 1
}
wait_leader() { for _ in $(seq 300); do raft_leader && return 0; sleep 0.2; done; return 1; }

log "dsys: 3 nodes on 127.0.0.1 ($EPS), voters n1-n3"
scripts/cluster.sh up 3 >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; exit 1; }
wait_leader >/dev/null || { echo "no Raft leader elected" >&2; exit 1; }

log "dsys: bench raft --concurrency $CONC --rate $RATE --duration $DUR (256 B keys, 1 KiB values)"
uptime
dsys --endpoints "$EPS" bench raft --concurrency "$CONC" --rate "$RATE" --duration "$DUR" \
  --key-size 256 --value-size 1024 | tee "$WORK/dsys-bench.txt"
DSYS_WPS=$(grep -oE '^[0-9]+ writes/s' "$WORK/dsys-bench.txt" | grep -oE '^[0-9]+' || true)

DSYS_FO=()
for t in $(seq "$TRIALS"); do
  l=$(wait_leader) || { echo "no Raft leader" >&2; exit 1; }
  wait_caught_up "$l" || log "dsys trial $t: a voter had not caught up after 60 s"
  followers=$(for n in n1 n2 n3; do if [ "$n" != "$l" ]; then printf '127.0.0.1:%s,' "$(port $n)"; fi; done)
  wlog="$WORK/dsys-writer-$t.log"; : >"$wlog"
  writer "$wlog" "$BIN" --config "$DSYS_CONFIG" --endpoints "${followers%,}" --timeout 500ms raft put failover-key v &
  WRITER=$!
  wait_serving "$wlog" || log "dsys trial $t: writes were not succeeding before the kill"
  l2=$(raft_leader || true); [ -n "$l2" ] && [ "$l2" != "$l" ] && log "dsys trial $t: leader moved to $l2 meanwhile"
  # The pid first, so that the clock starts at the SIGKILL itself, as for etcd (timing
  # `cluster.sh kill` counted its start-up: puts that started meanwhile still reached the
  # leader and read as a failover of 20 ms).
  pid=$(scripts/cluster.sh pid "$l")
  k=$(now_ns)
  kill -KILL "$pid"
  wait_recovered "$wlog" "$k" || true
  kill "$WRITER" 2>/dev/null || true; wait "$WRITER" 2>/dev/null || true; WRITER=""
  ms=$(failover_ms "$wlog" "$k")
  log "dsys trial $t: SIGKILL leader $l -> first successful write after ${ms} ms"
  [ "$ms" != none ] && DSYS_FO+=("$ms")
  scripts/cluster.sh start "$l" >/dev/null
  wait_leader >/dev/null || true
done

# ---------------------------------------------------------------- summary
e_fo=$(printf '%s\n' "${ETCD_FO[@]}" | grep -v '^$' | median)
d_fo=$(printf '%s\n' "${DSYS_FO[@]}" | grep -v '^$' | median)
echo
echo "== summary ($(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%-34s %12s %12s %10s\n' "" "etcd" "dsys" "dsys/etcd"
ratio() { awk -v d="$1" -v e="$2" 'BEGIN { if (d+0 > 0 && e+0 > 0) printf "%.2fx", d / e; else print "-" }'; }
printf '%-34s %12s %12s %10s\n' "writes/s (load l, 500 in flight)" "${ETCD_WPS:--}" "${DSYS_WPS:--}" "$(ratio "${DSYS_WPS:-0}" "${ETCD_WPS:-0}")"
printf '%-34s %12s %12s %10s\n' "failover ms (median of $TRIALS)" "$e_fo" "$d_fo" "$(ratio "$d_fo" "$e_fo")"
echo "failover trials ms: etcd ${ETCD_FO[*]:-none}; dsys ${DSYS_FO[*]:-none}"
echo "targets: writes/s >= 1.5x etcd, failover <= etcd"
