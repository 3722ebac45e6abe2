#!/usr/bin/env bash
# Installs what the real-Slurm tests need, idempotently, on Debian (run as root, as CI does):
# Debian's Slurm 22.05 (slurmctld, slurmd, client), munge, sudo (batchspawner's default
# exec_prefix runs sbatch as the user with it) and OpenSSH's sshd (the gateway
# topology's login node). Nothing is started or enabled: a policy-rc.d refuses every service
# start during the install, and the units these packages enable are disabled afterwards. The
# tests run every daemon themselves, in the foreground, by PID.
# Also creates the Unix accounts the tests run jobs as (no password, no login shell needed
# beyond /bin/sh): tbjob (a notebook user) and tbgateway (a shared gateway account).
set -euo pipefail

need=()
for tool in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge mungekey:munge sshd:openssh-server sudo:sudo; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || need+=("${tool#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-slurm: need root to install ${need[*]}; run: sudo bash $0" >&2
        exit 1
    fi
    echo "setup-slurm: apt-get install ${need[*]} (services kept from starting)"
    created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# setup-slurm.sh: no service starts during package installs\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    status=0
    {
        apt-get -o DPkg::Lock::Timeout=600 update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
                --no-install-recommends "${need[@]}" >/dev/null
    } || status=$?
    [ -z "$created_policy" ] || rm -f /usr/sbin/policy-rc.d
    [ "$status" -eq 0 ] || exit "$status"
fi

# A machine that boots with systemd must not start them either.
for unit in munge slurmd slurmctld ssh; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --quiet "$unit.service" 2>/dev/null || true
    fi
    rm -f "/etc/systemd/system/multi-user.target.wants/$unit.service" "/etc/systemd/system/sshd.service"
done

# The job users (idempotent). Home directories under /var/lib, readable by nobody else.
for account in tbjob tbgateway; do
    if ! getent passwd "$account" >/dev/null; then
        echo "setup-slurm: useradd $account"
        useradd --system --create-home --home-dir "/var/lib/$account" --shell /bin/sh "$account"
    fi
    chmod 0700 "$(getent passwd "$account" | cut -d: -f6)"
    # No password, but not locked: sshd refuses a locked account even with a valid key.
    if [ "$(getent shadow "$account" | cut -d: -f2)" != '*' ]; then
        usermod -p '*' "$account"
    fi
done

echo "setup-slurm: ok ($(/usr/sbin/slurmctld -V 2>/dev/null || echo slurmctld), munge $(dpkg-query -W -f '${Version}' munge 2>/dev/null))"
