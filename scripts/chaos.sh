#!/usr/bin/env bash
# Chaos against the local cluster started by scripts/cluster.sh:
#   scripts/chaos.sh --kill-every 10s --restart-after 5s --for 2m [--partition] [--seed N]
# Every interval it SIGKILLs a random running node and restarts it after --restart-after, or
# with --partition cuts the cluster into two random groups (through `dsys chaos`) and heals
# after --restart-after. Each action is logged with a timestamp. It always stops by itself
# after --for, and on exit (even Ctrl-C) it heals and restarts what it killed.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${DSYS_CONFIG:-cluster.toml}
BIN=${DSYS_BIN:-target/release/dsys}
every=10s; after=5s; total=2m; partition=0; seed=${RANDOM}

secs() { # 10s | 2m | 500ms | 3 -> seconds (may be fractional)
  case "$1" in
    *ms) awk -v v="${1%ms}" 'BEGIN{print v/1000}' ;;
    *s) echo "${1%s}" ;;
    *m) awk -v v="${1%m}" 'BEGIN{print v*60}' ;;
    *h) awk -v v="${1%h}" 'BEGIN{print v*3600}' ;;
    *) echo "$1" ;;
  esac
}
while [ $# -gt 0 ]; do
  case "$1" in
    --kill-every) every=$2; shift 2 ;;
    --restart-after) after=$2; shift 2 ;;
    --for) total=$2; shift 2 ;;
    --partition) partition=1; shift ;;
    --seed) seed=$2; shift 2 ;;
    *) echo "usage: chaos.sh --kill-every 10s --restart-after 5s --for 2m [--partition] [--seed N]" >&2; exit 2 ;;
  esac
done
E=$(secs "$every"); A=$(secs "$after"); T=$(secs "$total")
awk -v e="$E" -v a="$A" -v t="$T" 'BEGIN{exit !(e>0 && a>=0 && t>0 && a<e)}' ||
  { echo "chaos.sh: need --kill-every > --restart-after >= 0 and --for > 0" >&2; exit 2; }
RANDOM=$seed
log() { echo "[$(date +%H:%M:%S.%3N)] $*"; }
# Say it on the dashboards' timelines too (nodes that are down simply miss the note).
note() { "$BIN" --config "$CONFIG" --timeout 1s chaos note "chaos.sh: $*" >/dev/null 2>&1 || true; }
killed=()
cleanup() {
  if [ "$partition" = 1 ]; then "$BIN" --config "$CONFIG" chaos heal >/dev/null 2>&1 || true; log "healed"; fi
  for n in "${killed[@]}"; do scripts/cluster.sh start "$n" >/dev/null || true; log "restarted $n"; done
  killed=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log "chaos: every ${E}s for ${T}s, recover after ${A}s, mode $([ $partition = 1 ] && echo partition || echo kill), seed $seed"
end=$(awk -v s="$(date +%s.%N)" -v t="$T" 'BEGIN{printf "%.3f", s+t}')
while awk -v n="$(date +%s.%N)" -v e="$end" 'BEGIN{exit !(n<e)}'; do
  mapfile -t up < <(scripts/cluster.sh running)
  if [ "${#up[@]}" -lt 2 ]; then log "fewer than 2 nodes running; waiting"; sleep "$E"; continue; fi
  if [ "$partition" = 1 ]; then
    mapfile -t all < <(printf '%s\n' "${up[@]}" | awk -v s=$RANDOM 'BEGIN{srand(s)} {print rand()"\t"$0}' | sort | cut -f2)
    cut=$((1 + RANDOM % (${#all[@]} - 1)))
    g1=$(IFS=,; echo "${all[*]:0:cut}"); g2=$(IFS=,; echo "${all[*]:cut}")
    "$BIN" --config "$CONFIG" chaos partition "$g1" "$g2" >/dev/null && log "partition $g1 | $g2"
    sleep "$A"
    "$BIN" --config "$CONFIG" chaos heal >/dev/null && log "healed"
  else
    victim=${up[$((RANDOM % ${#up[@]}))]}
    scripts/cluster.sh kill "$victim" >/dev/null && killed+=("$victim") && log "SIGKILL $victim" && note "SIGKILL $victim"
    sleep "$A"
    scripts/cluster.sh start "$victim" >/dev/null && log "restarted $victim" && note "restarted $victim"
    killed=()
  fi
  sleep "$(awk -v e="$E" -v a="$A" 'BEGIN{print e-a}')"
done
log "chaos: done"
