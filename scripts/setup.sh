#!/usr/bin/env bash
# Installs what the test suite needs, idempotently, on Debian (run as root, as CI does):
# the OpenSSH client, Node + configurable-http-proxy 5.3.0 (into .deps/, not globally), and
# nftables (contrib/nftables/check.sh loads the shipped rule in a network namespace).
# Safe to run again: each step checks first and does nothing when already done.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="${TUNNELBOT_DEPS:-$repo/.deps}"
chp_version="5.3.0"

need_apt=()
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need_apt+=(nftables)
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install ${need_apt[*]}; run: sudo apt-get install -y ${need_apt[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

chp="$deps/node/node_modules/.bin/configurable-http-proxy"
if [ ! -x "$chp" ] || ! grep -q "\"version\": \"$chp_version\"" "$deps/node/node_modules/configurable-http-proxy/package.json" 2>/dev/null; then
    echo "setup: npm install configurable-http-proxy@$chp_version into $deps/node"
    mkdir -p "$deps/node"
    npm install --silent --no-audit --no-fund --prefix "$deps/node" "configurable-http-proxy@$chp_version" >/dev/null
fi
bash "$repo/scripts/setup-slurm.sh"  # Slurm, munge, sshd, sudo and the job users for the real-Slurm tests
bash "$repo/scripts/setup-sshd.sh"  # openssh-server for the remote-host tests; never started as a service
bash "$repo/scripts/setup-redis-traefik.sh"  # redis-server and traefik for the scale-out tests; started by PID
echo "setup: ok (ssh $(ssh -V 2>&1 | cut -d, -f1), node $(node --version), chp $chp_version)"
