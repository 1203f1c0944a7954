#!/usr/bin/env bash
# Local cluster control: up [N] | down | status | logs NODE [-f] | start NODE | restart NODE | kill NODE | pid NODE | port NODE
# Nodes come from cluster.toml (or $DSYS_CONFIG); pid files and logs live in run/ (git-ignored).
# `down` and `kill` stop only processes this script started, checked by pid and command line.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${DSYS_CONFIG:-cluster.toml}
RUN=${DSYS_RUN_DIR:-run}
BIN=${DSYS_BIN:-target/release/dsys}
mkdir -p "$RUN/pids" "$RUN/logs"

log() { echo "[$(date +%H:%M:%S)] $*"; }
die() { echo "cluster.sh: $*" >&2; exit 2; }

ids() { sed -n 's/^\[nodes\.\([a-z0-9-]*\)\]$/\1/p' "$CONFIG"; }

build() {
  if [ "${DSYS_BIN:-}" ]; then [ -x "$BIN" ] || die "DSYS_BIN=$BIN is not executable"; return; fi
  if [ ! -x "$BIN" ] || [ -n "$(find Cargo.toml Cargo.lock runtime node plugins -newer "$BIN" -name '*.rs' -o -newer "$BIN" -name 'Cargo.*' 2>/dev/null | head -1)" ]; then
    log "building the release binary (first time takes a few minutes on 2 cores)"
    cargo build --release -p dsys-node >&2
  fi
}

certs() {
  local dir
  dir=$(sed -n 's/^certs_dir *= *"\(.*\)"/\1/p' "$CONFIG" | head -1)
  [ -f "${dir:-run/certs}/ca.pem" ] || "$BIN" --config "$CONFIG" cluster init
}

pid_of() { # prints the pid of NODE if it is running and is ours
  local f="$RUN/pids/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "agent --node $1 "; then
    echo "$pid"
  else
    rm -f "$f"; return 1
  fi
}

start() {
  local n=$1
  ids | grep -qx "$n" || die "unknown node '$n' (cluster has: $(ids | tr '\n' ' '))"
  if pid_of "$n" >/dev/null; then log "$n already running"; return; fi
  # Nodes start with transparent huge pages off (an idle heap would be resident 2 MiB at a
  # time); DSYS_HUGE_PAGES=1 in the environment keeps them on.
  # DSYS_AGENT_ARGS: extra agent flags, e.g. `--plugins kv` (scripts/bench-cluster.sh).
  # shellcheck disable=SC2086
  nohup "$BIN" --config "$CONFIG" agent --node "$n" ${DSYS_AGENT_ARGS:-} </dev/null >>"$RUN/logs/$n.log" 2>&1 &
  echo $! >"$RUN/pids/$n.pid"
  log "started $n (pid $!)"
}

stop() { # stop NODE with SIGTERM, SIGKILL after 5 s
  local n=$1 pid
  pid=$(pid_of "$n") || { log "$n is not running"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$RUN/pids/$n.pid"
  log "stopped $n"
}

running() { for n in $(ids); do pid_of "$n" >/dev/null && echo "$n"; done; return 0; }

wait_alive() { # wait until every running node sees every running node alive
  local want deadline=$((SECONDS + ${1:-60})) ok n port
  want=$(running | wc -l)
  while [ $SECONDS -lt $deadline ]; do
    ok=0
    for n in $(running); do
      port=$(awk -v n="[nodes.$n]" '$0==n{f=1;next} /^\[/{f=0} f&&/^rpc_port/{print $3}' "$CONFIG")
      c=$("$BIN" --config "$CONFIG" --endpoints "127.0.0.1:$port" --timeout 1s --json cluster status --no-usage 2>/dev/null | grep -c '"state": "alive"' || true)
      [ "$c" -ge "$want" ] && ok=$((ok + 1))
    done
    [ "$ok" -eq "$want" ] && { log "all $want running nodes see each other alive"; return 0; }
    sleep 0.3
  done
  echo "cluster.sh: nodes did not converge within ${1:-60}s; see $RUN/logs/" >&2
  return 1
}

cmd=${1:-}
case "$cmd" in
  up)
    count=${2:-$(ids | wc -l)}
    [[ "$count" =~ ^[0-9]+$ ]] && [ "$count" -ge 1 ] || die "up takes a node count"
    build; certs
    for n in $(ids | head -n "$count"); do start "$n"; done
    wait_alive 60
    cat <<MSG

Try next:
  $BIN cluster status
  $BIN ring lookup user:42
  $BIN ratelimit check alice --rule api        # exit 1 once the limit is reached
  curl -i http://127.0.0.1:7301/ratelimit/api/alice
  scripts/cluster.sh kill n3; $BIN cluster status
  scripts/chaos.sh --kill-every 10s --restart-after 5s --for 1m
  scripts/cluster.sh down
MSG
    ;;
  down) for n in $(ids); do stop "$n"; done ;;
  status) build; "$BIN" --config "$CONFIG" cluster status ;;
  logs)
    [ -n "${2:-}" ] || die "logs NODE [-f]"
    if [ "${3:-}" = "-f" ]; then tail -n 100 -f "$RUN/logs/$2.log"; else tail -n 200 "$RUN/logs/$2.log"; fi ;;
  start) [ -n "${2:-}" ] || die "start NODE"; build; start "$2" ;;
  restart) [ -n "${2:-}" ] || die "restart NODE"; build; stop "$2"; start "$2" ;;
  kill)
    [ -n "${2:-}" ] || die "kill NODE"
    pid=$(pid_of "$2") || die "$2 is not running"
    kill -KILL "$pid"; rm -f "$RUN/pids/$2.pid"; log "SIGKILLed $2 (pid $pid)" ;;
  pid)
    [ -n "${2:-}" ] || die "pid NODE"
    pid_of "$2" || die "$2 is not running" ;;
  port) # the node's RPC port, from the cluster file
    [ -n "${2:-}" ] || die "port NODE"
    p=$(awk -v n="[nodes.$2]" '$0==n{f=1;next} /^\[/{f=0} f&&/^rpc_port/{print $3}' "$CONFIG")
    [ -n "$p" ] || die "$2 has no rpc_port in $CONFIG"; echo "$p" ;;
  running) running ;;
  *) echo "usage: scripts/cluster.sh up [N] | down | status | logs NODE [-f] | start NODE | restart NODE | kill NODE | pid NODE | port NODE | running" >&2; exit 2 ;;
esac
