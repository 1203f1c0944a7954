#!/usr/bin/env bash
# Fuzz the cache plugin's RESP parser (plugins/cache/fuzz, target `resp`) for a bounded time.
#   scripts/fuzz-cache.sh [SECONDS]     default 60
# Installs cargo-fuzz when missing and uses the nightly toolchain (libFuzzer needs it).
# Exits non-zero when the fuzzer finds a crash; the reproducer is then under
# plugins/cache/fuzz/artifacts/resp/ (run it again with
# `cd plugins/cache && cargo +nightly fuzz run resp fuzz/artifacts/resp/crash-...`).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac

rustup toolchain list | grep -q '^nightly' || {
  echo "fuzz-cache: installing the nightly toolchain" >&2
  rustup toolchain install nightly --profile minimal
}
cargo fuzz --version >/dev/null 2>&1 || {
  echo "fuzz-cache: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
}

cd plugins/cache
mkdir -p fuzz/corpus/resp
# A few valid commands to start from, so the fuzzer reaches deep paths quickly.
printf '*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n' >fuzz/corpus/resp/seed-set
printf '*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n' >fuzz/corpus/resp/seed-pipeline
printf 'PING\r\nSET a "b c"\r\n' >fuzz/corpus/resp/seed-inline
printf '*2\r\n:1\r\n*2\r\n+OK\r\n-ERR x\r\n$-1\r\n*-1\r\n' >fuzz/corpus/resp/seed-types

# -max_total_time bounds the run; libFuzzer exits 0 when it ends without a crash and
# non-zero (with the crashing input saved under fuzz/artifacts/resp/) when it finds one.
cargo +nightly fuzz run resp fuzz/corpus/resp -- \
  -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1
