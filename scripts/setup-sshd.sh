#!/usr/bin/env bash
# Installs OpenSSH's server for the remote-host tests (python/tests/remote_host.py), idempotently,
# on Debian (run as root, as CI does). The tests start their own sshd by PID inside a network
# namespace with their own config; the system's ssh service is never started or enabled:
# the package is installed under a policy-rc.d that refuses every start, and its units are
# disabled so a machine that boots with systemd does not start them either.
set -euo pipefail

if [ -x /usr/sbin/sshd ]; then
    echo "setup-sshd: ok ($(/usr/sbin/sshd -V 2>&1 | head -n1 | cut -d, -f1))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-sshd: need root to install openssh-server; run: sudo bash $0" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
    # Our own guard, removed again below; an existing one (e.g. Docker's) is left alone.
    printf '#!/bin/sh\n# tunnelbot setup-sshd: no service starts during apt-get install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    ours=1
fi
cleanup() { if [ -n "$ours" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

echo "setup-sshd: apt-get install openssh-server (the service is not started)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
for unit in ssh.service ssh.socket; do
    systemctl disable "$unit" >/dev/null 2>&1 || true
done
# The sysvinit script honours this file too.
touch /etc/ssh/sshd_not_to_be_run
echo "setup-sshd: ok ($(/usr/sbin/sshd -V 2>&1 | head -n1 | cut -d, -f1))"
