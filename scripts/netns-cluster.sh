#!/usr/bin/env bash
# Multi-host mode on one machine: every node in its own network namespace with its own
# address, joined by a bridge that lives in a hub namespace (the root namespace is not
# touched: no interface, address or rule is added there).
#
#   scripts/netns-cluster.sh up 5          # namespaces dsys-hub, dsys-n1..dsys-n5 (root)
#   scripts/netns-cluster.sh status
#   scripts/netns-cluster.sh check register --nodes 5 --duration 60s --faults kill,partition
#                                          # runs `dsys check ... --netns` inside dsys-hub
#   scripts/netns-cluster.sh down          # deletes every namespace above (and with them
#                                          # their veths, bridge and nft rules)
#
# Addresses: node nK is 10.77.0.K/24 on eth0 in namespace dsys-nK; the hub (where the check
# process and its clients run) is 10.77.0.254 on bridge dsysbr. `dsys check --netns` starts
# each agent with `ip netns exec dsys-nK` and cuts partitions with nft drop rules inside the
# node namespaces (table inet dsys_check). nftables is installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
HUB=dsys-hub
NET=10.77.0
die() { echo "netns-cluster.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (ip netns)"
command -v ip >/dev/null || die "iproute2 (ip) is missing"

ours() { ip netns list | awk '{print $1}' | grep -E '^dsys-(hub|n[0-9]+)$' || true; }

up() {
  local n=${1:-5}
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 9 ] || die "up N: N must be 1..9"
  if ! command -v nft >/dev/null; then
    echo "installing nftables"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null; }
  fi
  [ -z "$(ours)" ] || die "namespaces already up ($(ours | tr '\n' ' ')); run down first"
  trap 'echo "netns-cluster.sh: up failed; removing what it made" >&2; down' ERR
  ip netns add $HUB
  ip -n $HUB link set lo up
  ip -n $HUB link add dsysbr type bridge
  ip -n $HUB addr add $NET.254/24 dev dsysbr
  ip -n $HUB link set dsysbr up
  for i in $(seq 1 "$n"); do
    local ns=dsys-n$i
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # The veth is created inside the hub with its peer moved straight into the node namespace.
    ip -n $HUB link add "vh$i" type veth peer name eth0 netns "$ns"
    ip -n $HUB link set "vh$i" master dsysbr up
    ip -n "$ns" addr add "$NET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
  trap - ERR
  echo "up: $HUB ($NET.254) and $n node namespaces dsys-n1..dsys-n$n ($NET.1..$NET.$n)"
}

down() {
  local gone=0
  for ns in $(ours); do ip netns del "$ns" && gone=$((gone + 1)); done
  echo "down: removed $gone namespaces (their veths, bridge and nft rules went with them)"
}

status() {
  local list; list=$(ours)
  [ -n "$list" ] || { echo "no dsys namespaces"; return; }
  for ns in $list; do
    addr=$(ip -n "$ns" -4 -o addr show | awk '$2 != "lo" {print $4}' | tr '\n' ' ')
    rules=$(ip netns exec "$ns" nft list table inet dsys_check 2>/dev/null | grep -c drop || true)
    echo "$ns  $addr  drop rules: ${rules:-0}"
  done
}

case "${1:-}" in
  up) up "${2:-5}" ;;
  down) down ;;
  status) status ;;
  check)
    shift
    BIN=${DSYS_BIN:-target/release/dsys}
    [ -x "$BIN" ] || die "$BIN is not executable (build it, or set DSYS_BIN)"
    [ -n "$(ours)" ] || die "no namespaces: run scripts/netns-cluster.sh up N first"
    exec ip netns exec $HUB "$BIN" check "$@" --netns
    ;;
  *) die "usage: $0 up N | down | status | check WORKLOAD [dsys check options]" ;;
esac
