#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is missing, then format, lint, Rust tests
# (real OpenSSH client, real CHP) and the Python package's tests (real JupyterHub).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export TUNNELBOT_DEPS="${TUNNELBOT_DEPS:-$repo/.deps}"

bash scripts/setup.sh
export CHP_BIN="$TUNNELBOT_DEPS/node/node_modules/.bin/configurable-http-proxy"
# Tests hold many sockets at once.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked
echo "== contrib (systemd unit, alert rules, dashboard)"
TUNNELBOT_BIN="$repo/target/debug/tunnelbot" bash contrib/check.sh
if [ -f python/ci.sh ]; then
    echo "== python package"
    TUNNELBOT_BIN="$repo/target/debug/tunnelbot" bash python/ci.sh
fi
echo "== all tests passed"
