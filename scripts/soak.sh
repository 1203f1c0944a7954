#!/usr/bin/env bash
# Long `dsys check` runs of every workload with every fault, one after another, each with its
# own seed and run folder under run/soak/. Stops at the first verdict that is not valid and
# prints where its history and logs are.
#
#   scripts/soak.sh                 # 10 min per workload, 5 nodes, all faults
#   DURATION=1h ROUNDS=3 scripts/soak.sh
#   WORKLOADS="register set" FAULTS=kill,partition scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10m}
NODES=${NODES:-5}
FAULTS=${FAULTS:-kill,pause,partition,delay}
WORKLOADS=${WORKLOADS:-register set ratelimit}
ROUNDS=${ROUNDS:-1}
BIN=${DSYS_BIN:-target/release/dsys}
if [ -z "${DSYS_BIN:-}" ]; then
  echo "soak: building the release binary"
  cargo build --release -p dsys-node
fi
[ -x "$BIN" ] || { echo "soak: $BIN is not executable" >&2; exit 2; }
dir=run/soak/$(date +%Y%m%d-%H%M%S)
mkdir -p "$dir"
summary=$dir/summary.txt
for round in $(seq 1 "$ROUNDS"); do
  for wl in $WORKLOADS; do
    seed=$(( (RANDOM << 15 | RANDOM) ))
    out=$dir/$wl-r$round
    echo "soak: round $round/$ROUNDS: $wl for $DURATION on $NODES nodes, faults $FAULTS, seed $seed -> $out"
    rc=0
    "$BIN" check "$wl" --nodes "$NODES" --duration "$DURATION" --faults "$FAULTS" --seed "$seed" --out "$out" \
      | tee "$out.txt" || rc=$?
    echo "$wl round $round seed $seed exit $rc $(grep '^verdict:' "$out.txt" || true)" >> "$summary"
    if [ "$rc" -ne 0 ]; then
      echo "soak: $wl gave exit $rc (1 invalid, 3 unknown or cluster failure); history and logs in $out" >&2
      cat "$summary"
      exit 1
    fi
  done
done
echo "soak: every run valid"
cat "$summary"
