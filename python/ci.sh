#!/usr/bin/env bash
# Tests the tunnelbot-jupyterhub package: a venv on Debian's python with JupyterHub 6.1.1,
# then mypy and pytest (unit, real broker, real JupyterHub + CHP end to end).
# Idempotent; runs from any directory. Expects TUNNELBOT_BIN (a built broker) and CHP_BIN
# (configurable-http-proxy 5.3.0), as scripts/test.sh exports them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
deps="${TUNNELBOT_DEPS:-$repo/.deps}"
venv="$deps/venv"
python=/usr/bin/python3  # Debian's: pyenv's lives under /root (0700), unusable by job users

for var in TUNNELBOT_BIN CHP_BIN; do
    if [ -z "${!var:-}" ]; then
        echo "python: $var is not set; run scripts/test.sh, or export it (see python/README.md)" >&2
        exit 2
    fi
done

venv_ok() { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; assert sys.base_prefix == "/usr"' 2>/dev/null; }

if ! venv_ok; then
    probe="$(mktemp -d)"
    if ! "$python" -m venv "$probe/venv" >/dev/null 2>&1; then
        echo "python: apt-get install python3-venv (needed for $python -m venv)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    rm -rf "$probe"
    echo "python: creating the venv $venv with $python"
    rm -rf "$venv"
    mkdir -p "$deps"
    "$python" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
echo "python: pip install setuptools, jupyterhub==6.1.1, jupyter_server, and ./python[test] into $venv"
"${pip[@]}" install "setuptools>=77" wheel
# jupyter_server is what jupyterhub-singleuser runs on; no JupyterLab is needed.
"${pip[@]}" install "jupyterhub==6.1.1" "jupyter_server==2.21.1" "pytest>=7" "mypy>=1.5"
# JupyterHub's own traefik proxy and its Redis client, for the traefik-redis route backend's e2e.
"${pip[@]}" install "jupyterhub-traefik-proxy==2.1.0" "redis>=5,<8"
# Without build isolation: the venv's setuptools builds it, so a rerun needs no download.
"${pip[@]}" install --no-build-isolation "${here}[test]"
rm -rf "$here/build" "$here"/*.egg-info

cd "$here"
echo "python: mypy tunnelbot_jupyterhub"
MYPY_CACHE_DIR="$deps/mypy-cache" "$venv/bin/mypy" tunnelbot_jupyterhub

echo "python: pytest tests (TUNNELBOT_BIN=$TUNNELBOT_BIN, CHP_BIN=$CHP_BIN)"
status=0
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest tests -p no:cacheprovider -ra || status=$?
if [ "$status" -eq 5 ]; then
    echo "python: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
