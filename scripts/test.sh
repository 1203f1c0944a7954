#!/usr/bin/env bash
# The test command: installs the programs the tests drive when they are missing (the one
# list of them is below), then runs the whole suite with `cargo test --workspace`.
# Extra arguments go to cargo test (e.g. `scripts/test.sh -p dsys-plugin-cache`).
# A tool that cannot be installed fails the run with the package's name: no test skips.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: "command package what-needs-it".
DEBIAN=(
  "chromium chromium node/tests/dashboard.rs (headless browser)"
  "chromedriver chromium-driver node/tests/dashboard.rs (WebDriver)"
  "redis-server redis-server plugins/cache/tests/differential.rs (the reference Redis)"
)
# PyPI packages: "python-module package what-needs-it" (none yet).
PYPI=()

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for entry in "${DEBIAN[@]}"; do
  read -r cmd pkg _ <<<"$entry"
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "test.sh: installing Debian packages the tests need: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >/dev/null || echo "test.sh: apt-get update failed; trying the install anyway" >&2
  as_root apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { echo "test.sh: error: could not install Debian package(s) ${missing[*]}" >&2; exit 1; }
fi
for entry in "${DEBIAN[@]}"; do
  read -r cmd pkg why <<<"$entry"
  command -v "$cmd" >/dev/null 2>&1 \
    || { echo "test.sh: error: '$cmd' (Debian package $pkg) is missing; $why needs it" >&2; exit 1; }
done
for entry in "${PYPI[@]+"${PYPI[@]}"}"; do
  read -r module pkg why <<<"$entry"
  python3 -c "import $module" 2>/dev/null && continue
  echo "test.sh: installing PyPI package $pkg" >&2
  python3 -m pip install -q "$pkg" \
    || { echo "test.sh: error: could not install PyPI package $pkg; $why needs it" >&2; exit 1; }
done

exec cargo test --workspace "$@"
