#!/usr/bin/env bash
# tunnelbot vs OpenSSH's sshd, in one run, with the same stock ssh clients and backends.
# Method, machine and latest results: docs/benchmark.md. Loopback only. Needs root on Debian.
#
#   benches/compare/compare.sh [--quick] [--big] [--storm K] [--repeats R] [--only PHASES]
#                              [--no-setup] [--no-build] [--bin PATH] [--out DIR] [--keep]
#                              [--perf DIR] [--tb-env KEY=VALUE] [--bulk CIPHER:STREAMS:job|hub,...]
#
#   (default)  N = 100 and 1000 idle tunnels, 500 handshakes, 50 setups (x2 kex), wrk 10 s and
#              iperf3 10 s (3 ciphers x 1 and 4 streams + 2 the other way), each twice with the
#              server order swapped (medians), storm of 200: about 8 minutes on 2 vCPU
#   --quick    N = 50, 150 handshakes, 20 setups, wrk/iperf3 5 s once, 2 ciphers, storm of 100:
#              about 1 minute
#   --big      adds N = 10,000 for tunnelbot only (needs ulimit -n >= ~20,100; where it cannot be
#              raised N is capped to fit); ~1.3 MiB of RAM per ssh client, +1-3 minutes
#   --storm K  K clients at once in the storm (1000: the baseline's job array; +20 s)
#   --only     comma list of mem,cpu,setup,wrk,bulk,storm
#   --perf DIR perf record the broker during cpu/wrk/bulk/storm (slows it: not for figures)
#   --tb-env   extra environment for the broker, for A/B runs (e.g. GLIBC_TUNABLES=...)
#   --rekey-limit "SIZE TIME"  the clients' RekeyLimit (default "512M 30m", as the job wrapper;
#              "default": OpenSSH's own, so the servers start the re-keys)
#
# Results: the table on stdout, results.md + results.json in --out (default
# benches/compare/results/). Exit status 1 when the run was aborted (time budget, signal).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

setup=1 build=1 keep=0 bin="" out="$here/results"
driver_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-setup) setup=0 ;;
        --no-build) build=0 ;;
        --keep) keep=1 ;;
        --bin) bin="$2"; shift ;;
        --out) out="$2"; shift ;;
        --storm|--only|--budget|--par|--repeats|--perf|--tb-env|--bulk|--rekey-limit) driver_args+=("$1" "$2"); shift ;;
        --quick|--big) driver_args+=("$1") ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; exit 64 ;;
    esac
    shift
done

if [ "$(id -u)" -ne 0 ]; then
    echo "compare.sh: run as root (sshd, the tunnelbot account, /run/sshd, ulimit -n)" >&2
    exit 1
fi

# --- setup: idempotent, installs only what is missing -----------------------------------------
if [ "$setup" = 1 ]; then
    need=()
    command -v wrk >/dev/null || need+=(wrk)
    command -v iperf3 >/dev/null || need+=(iperf3)
    command -v nginx >/dev/null || need+=(nginx-light)
    [ -x /usr/sbin/sshd ] || need+=(openssh-server)
    command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
    [ -x /usr/bin/python3 ] || command -v python3 >/dev/null || need+=(python3)
    if [ "${#need[@]}" -gt 0 ]; then
        echo "compare.sh: apt-get install ${need[*]}" >&2
        apt-get update -qq
        # policy-rc.d 101: do not start the distribution's nginx/sshd services on install.
        prc=/usr/sbin/policy-rc.d made_prc=0
        if [ ! -e "$prc" ]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod 755 "$prc"; made_prc=1; fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        if [ "$made_prc" = 1 ]; then rm -f "$prc"; fi
    fi
    # The baseline's account: exists, password field "*" (not "!": refused under UsePAM no).
    if ! getent passwd tunnelbot >/dev/null; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tunnelbot
    fi
    pw="$(getent shadow tunnelbot | cut -d: -f2)"
    if [ "$pw" != "*" ]; then
        case "$pw" in
            ''|'!'|'!!'|'!*') usermod -p '*' tunnelbot ;;
            *) echo "compare.sh: account tunnelbot has a password set; not touching it" >&2; exit 1 ;;
        esac
    fi
    mkdir -p /run/sshd && chmod 0755 /run/sshd
fi

# --- descriptors: every tunnel is sockets, and the driver holds every client's stderr -----------
ulimit -Hn 1048576 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)"

# --- the broker -------------------------------------------------------------------------------
if [ -z "$bin" ]; then
    bin="$repo/target/release/tunnelbot"
    if [ "$build" = 1 ]; then
        (cd "$repo" && cargo build --release --quiet --bin tunnelbot)
    fi
fi
[ -x "$bin" ] || { echo "compare.sh: no broker binary at $bin" >&2; exit 1; }
commit="$(GIT_OPTIONAL_LOCKS=0 git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ -n "$(GIT_OPTIONAL_LOCKS=0 git -C "$repo" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    commit="$commit+dirty-src"
fi

# sshd's StrictModes checks every directory up to / of authorized_keys: not under /tmp.
base=/var/lib/tunnelbot-compare
mkdir -p "$base" && chmod 0755 "$base"
work="$(mktemp -d "$base/run.XXXXXX")"
chmod 0755 "$work"

py=/usr/bin/python3
[ -x "$py" ] || py="$(command -v python3)"

driver_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$driver_pid" ] && kill -0 "$driver_pid" 2>/dev/null; then
        kill -TERM "$driver_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$driver_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$driver_pid" 2>/dev/null || true
    fi
    # Anything the driver started and left behind (it died hard): by PID, if still the same process.
    if [ -f "$work/pids" ]; then
        while read -r pid st; do
            [ -r "/proc/$pid/stat" ] || continue
            stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
            rest="${stat##*) }"
            # shellcheck disable=SC2086
            set -- $rest
            [ "${20:-}" = "$st" ] && kill -KILL "$pid" 2>/dev/null || true
        done <"$work/pids"
    fi
    if [ "$keep" = 0 ]; then rm -rf "$work"; else echo "compare.sh: kept $work" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$py" "$here/driver.py" --bin "$bin" --work "$work" --out "$out" --commit "$commit" \
    ${driver_args[@]+"${driver_args[@]}"} &
driver_pid=$!
wait "$driver_pid"
