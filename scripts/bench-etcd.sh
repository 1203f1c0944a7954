#!/usr/bin/env bash
# Side-by-side write throughput: a 3-member etcd cluster on loopback (`etcdctl check perf
# --load=l`) against `dsys bench kv` writes (N=3, W=2) on 3 dsys nodes, in the same run.
# Installs etcd from Debian's packages when missing. Prints both figures and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/dsys
DUR=${DSYS_BENCH_DURATION:-30s}
WORK=$(mktemp -d /tmp/dsys-etcd.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; scripts/cluster.sh down >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "installing etcd-server and etcd-client (Debian packages)"
  (apt-get update -qq && apt-get install -y -qq etcd-server etcd-client) >/dev/null
fi

echo "== etcd: 3 members on 127.0.0.1"
cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$WORK/e$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token dsys-bench \
    >"$WORK/e$i.log" 2>&1 &
  pids+=($!)
done
EP=http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793
for _ in $(seq 100); do ETCDCTL_API=3 etcdctl --endpoints "$EP" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
ETCDCTL_API=3 etcdctl --endpoints "$EP" check perf --load=l >"$WORK/perf.txt" 2>&1 || true
# Its verdict lines (PASS/FAIL against etcd's own thresholds), without the progress bar.
tr '\r' '\n' <"$WORK/perf.txt" | grep -E 'writes/s|request|Stddev|PASS|FAIL' || true
etcd_wps=$(tr '\r' '\n' <"$WORK/perf.txt" | grep -oE '[0-9.]+ writes/s' | grep -oE '^[0-9.]+' | head -1 || true)
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
pids=()

echo "== dsys: 3 nodes, kv N=3 W=2, 100% writes for $DUR at concurrency ${DSYS_BENCH_CONCURRENCY:-256}"
scripts/cluster.sh up 3 >/dev/null
# Membership converges before every plugin has opened its store: wait (30 s at most) until a
# write at W=2 succeeds through every node, so start-up refusals are not counted as errors.
for n in n1 n2 n3; do
  port=$(scripts/cluster.sh port "$n")
  for i in $(seq 150); do
    "$BIN" --endpoints "127.0.0.1:$port" kv put bench-ready 1 --w 2 >/dev/null 2>&1 && break
    [ "$i" -eq 150 ] && { echo "kv did not answer through 127.0.0.1:$port within 30 s" >&2; exit 1; }
    sleep 0.2
  done
done
out=$("$BIN" --json bench kv --ratio 0:100 --concurrency ${DSYS_BENCH_CONCURRENCY:-256} --w 2 --duration "$DUR" --value-size 100)
echo "$out"
dsys_wps=$(echo "$out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["writes"]["rps"]))')

echo
echo "etcd writes/s: ${etcd_wps:-?}   dsys kv writes/s: $dsys_wps"
if [ -n "${etcd_wps:-}" ]; then
  awk -v d="$dsys_wps" -v e="$etcd_wps" 'BEGIN{printf "ratio dsys/etcd = %.2fx (target >= 3x)\n", d/e}'
fi
