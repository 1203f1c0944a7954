#!/usr/bin/env bash
# Run the RESP parser fuzz target for a bounded time (default 60 s). Needs cargo-fuzz and a
# nightly toolchain: `cargo install cargo-fuzz && rustup toolchain install nightly`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
exec cargo +nightly fuzz run resp -- -max_total_time="$secs" -rss_limit_mb=1024
