#!/usr/bin/env bash
# Checks everything under contrib/ against the real broker: the alert rules (promtool check
# and unit tests), the metric and label names in the dashboard and the rules (against
# src/metrics.rs), the systemd unit (systemd-analyze verify; its descriptor store holds the
# whole port range), the production config (`tunnelbot check`) and the nftables rule (loaded
# in a network namespace of its own: nftables/check.sh).
#
#   TUNNELBOT_BIN=target/debug/tunnelbot bash contrib/check.sh
#
# Runs from any directory; exits non-zero if any check fails. Idempotent: the only thing it
# may fetch is promtool, once, from Debian's `prometheus` package (apt-get download, extracted
# into $TUNNELBOT_DEPS/promtool, default .deps/): installing the package itself would also
# start a Prometheus server and pull in ~30 web packages. promtool on PATH is used as is.
set -euo pipefail

if [ -z "${TUNNELBOT_BIN:-}" ]; then
    echo "contrib/check.sh: set TUNNELBOT_BIN to a built tunnelbot binary" >&2
    exit 2
fi
bin="$(realpath -e "$TUNNELBOT_BIN" 2>/dev/null)" || {
    echo "contrib/check.sh: TUNNELBOT_BIN=$TUNNELBOT_BIN does not exist" >&2
    exit 2
}
contrib="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$contrib")"
deps="${TUNNELBOT_DEPS:-$repo/.deps}"
unit="$contrib/systemd/tunnelbot.service"
config="$contrib/systemd/tunnelbot.toml"
alerts="$contrib/prometheus/tunnelbot-alerts.yml"
scrape="$contrib/prometheus/scrape.yml"
dashboard="$contrib/grafana/tunnelbot-dashboard.json"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# `check` refuses a token file that is missing or readable by others, as a real host would; the
# checks below validate a copy whose token_file is a real 0600 file in the work folder.
source_config="$config"
config="$work/tunnelbot.toml"
(umask 077 && printf 'check-token\n' > "$work/chp.token")
sed "s|/etc/tunnelbot/chp.token|$work/chp.token|" "$source_config" > "$config"

passed=0
failed=()
pass() { echo "   ok   $1"; passed=$((passed + 1)); }
fail() { echo "   FAIL $1"; failed+=("$1"); }
note() { echo "   note $1"; }
# Indents a tool's output under the check it belongs to.
indent() { sed "s/^/        ${1:-}/"; }
is_root() { [ "$(id -u)" -eq 0 ]; }
quiet_apt() { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get -qq -o=Dpkg::Use-Pty=0 "$@"; }
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'
}
# Refreshes apt's lists once, only when they do not know the package.
apt_known() {
    local c
    c="$(apt_candidate "$1")"
    if { [ -z "$c" ] || [ "$c" = "(none)" ]; } && is_root && [ -z "${apt_updated:-}" ]; then
        echo "   apt-get update (apt does not know $1 yet)"
        quiet_apt update >/dev/null 2>&1 || true
        apt_updated=1
        c="$(apt_candidate "$1")"
    fi
    [ -n "$c" ] && [ "$c" != "(none)" ]
}

echo "== contrib: tools"
promtool="$(command -v promtool || true)"
if [ -z "$promtool" ] && [ -x "$deps/promtool/promtool" ]; then
    promtool="$deps/promtool/promtool"
fi
if [ -z "$promtool" ] && command -v apt-get >/dev/null 2>&1 && apt_known prometheus; then
    echo "   fetching promtool from Debian's prometheus $(apt_candidate prometheus) into $deps/promtool"
    mkdir -p "$work/deb"
    # apt downloads as the unprivileged _apt user when it can write the folder.
    if id _apt >/dev/null 2>&1; then chown _apt "$work/deb" 2>/dev/null || true; fi
    if (cd "$work/deb" && quiet_apt download prometheus >/dev/null 2>&1) &&
        dpkg-deb -x "$work"/deb/prometheus_*.deb "$work/deb/x" &&
        install -D -m 0755 "$work/deb/x/usr/bin/promtool" "$deps/promtool/promtool"; then
        promtool="$deps/promtool/promtool"
    else
        echo "   could not fetch promtool"
    fi
fi
if [ -n "$promtool" ]; then
    echo "   promtool: $promtool ($("$promtool" --version 2>&1 | head -1))"
else
    echo "   promtool: unavailable; falling back to a YAML parse of the rules (python3)"
fi

# PyYAML for the rule-file name check: the python3 on PATH, else Debian's with python3-yaml.
python=""
for p in python3 /usr/bin/python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import yaml' 2>/dev/null; then
        python="$p"
        break
    fi
done
if [ -z "$python" ] && is_root && command -v apt-get >/dev/null 2>&1 && apt_known python3-yaml; then
    echo "   apt-get install python3-yaml"
    quiet_apt install -y --no-install-recommends python3-yaml >/dev/null 2>&1 || true
    /usr/bin/python3 -c 'import yaml' 2>/dev/null && python=/usr/bin/python3
fi
if [ -z "$python" ]; then
    echo "   python3 with PyYAML: unavailable; alert rules are left to promtool"
fi
echo "   tunnelbot: $bin ($("$bin" --version 2>&1))"

echo "== contrib: prometheus rules and scrape config"
if [ -n "$promtool" ]; then
    if out="$(timeout 60 "$promtool" check rules "$alerts" 2>&1)"; then
        pass "promtool check rules prometheus/tunnelbot-alerts.yml ($(grep -o '[0-9]* rules found' <<<"$out"))"
    else
        indent <<<"$out"
        fail "promtool check rules prometheus/tunnelbot-alerts.yml"
    fi
    # Each alert fires on a synthetic outage and stays quiet when it should (routes.backend = "none").
    if out="$(cd "$contrib/prometheus" && timeout 60 "$promtool" test rules tunnelbot-alerts.test.yml 2>&1)"; then
        pass "promtool test rules prometheus/tunnelbot-alerts.test.yml ($(grep -c '^  - name:' "$contrib/prometheus/tunnelbot-alerts.test.yml") cases)"
    else
        indent <<<"$out"
        fail "promtool test rules prometheus/tunnelbot-alerts.test.yml"
    fi
    # Also loads the rule file it names, as Prometheus would.
    if out="$(timeout 60 "$promtool" check config "$scrape" 2>&1)"; then
        pass "promtool check config prometheus/scrape.yml"
    else
        indent <<<"$out"
        fail "promtool check config prometheus/scrape.yml"
    fi
else
    for f in "$alerts" "$scrape"; do
        if [ -n "$python" ] && "$python" -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' "$f"; then
            pass "YAML parses (no promtool): ${f#"$contrib"/}"
        else
            fail "YAML parse: ${f#"$contrib"/}"
        fi
    done
fi

echo "== contrib: dashboard and rules name only exported metrics and labels (src/metrics.rs)"
py="${python:-python3}"
args=("$repo/src/metrics.rs" "$dashboard")
[ -n "$python" ] && args+=("$alerts")
if "$py" "$contrib/check_exprs.py" "${args[@]}"; then
    pass "metric and label names, dashboard structure (schemaVersion, \${DS_PROMETHEUS})"
else
    fail "metric and label names (see FAIL lines above)"
fi

echo "== contrib: systemd unit"
# The unit and the config must agree on where the config and the state live.
if grep -q '^ExecStart=/usr/local/bin/tunnelbot .*--config /etc/tunnelbot/tunnelbot.toml' "$unit" &&
    grep -q '^StateDirectory=tunnelbot$' "$unit" &&
    grep -q '^keys_dir = "/var/lib/tunnelbot/' "$config" &&
    grep -q '^state_dir = "/var/lib/tunnelbot/' "$config"; then
    pass "unit and config agree: /etc/tunnelbot/tunnelbot.toml, state under /var/lib/tunnelbot"
else
    fail "unit ExecStart/StateDirectory and config keys_dir/state_dir disagree"
fi
# Every reserved port's listener fits systemd's descriptor store, so a restart frees none.
range="$(sed -n 's/^ports = "\([0-9]*\)-\([0-9]*\)"$/\1 \2/p' "$config")"
store_max="$(sed -n 's/^FileDescriptorStoreMax=\([0-9]*\)$/\1/p' "$unit")"
if read -r first last <<<"$range" && [ -n "${first:-}" ] && [ -n "$store_max" ] &&
    [ "$store_max" -ge $((last - first + 1)) ] && grep -q '^Type=notify$' "$unit"; then
    pass "Type=notify and FileDescriptorStoreMax=$store_max holds tunnels.ports $first-$last"
else
    fail "unit needs Type=notify and FileDescriptorStoreMax >= the size of tunnels.ports (${range:-?})"
fi
# The ExecStart argument order, with the real binary (--check parses, validates, exits).
cmdline="$(sed -n 's#^ExecStart=/usr/local/bin/tunnelbot ##p' "$unit")"
read -r -a exec_args <<<"$cmdline"
if out="$("$bin" "${exec_args[@]/\/etc\/tunnelbot\/tunnelbot.toml/$config}" --check 2>&1)" &&
    [ "$out" = "config ok" ]; then
    pass "ExecStart's arguments are accepted: tunnelbot $cmdline --check"
else
    indent <<<"$out"
    fail "ExecStart's arguments: tunnelbot $cmdline --check"
fi
if command -v systemd-analyze >/dev/null 2>&1; then
    # verify wants ExecStart's binary to exist: check a copy that points at TUNNELBOT_BIN.
    mkdir -p "$work/unit"
    sed "s#^ExecStart=/usr/local/bin/tunnelbot #ExecStart=$bin #" "$unit" >"$work/unit/tunnelbot.service"
    rc=0
    out="$(SYSTEMD_LOG_COLOR=0 timeout 60 systemd-analyze verify "$work/unit/tunnelbot.service" 2>&1)" || rc=$?
    # Unknown or misspelled keys are only warnings to verify (exit 0): fail on any line about
    # our unit. Lines about other units on this host are shown, not held against us.
    ours="$(grep 'tunnelbot' <<<"$out" || true)"
    others="$(grep -v 'tunnelbot' <<<"$out" || true)"
    if [ -n "$others" ]; then indent "(host) " <<<"$others"; fi
    if [ "$rc" -eq 0 ] && [ -z "$ours" ]; then
        pass "systemd-analyze verify systemd/tunnelbot.service ($(systemd-analyze --version | head -1 | cut -d' ' -f1-2))"
    else
        indent <<<"$ours"
        fail "systemd-analyze verify systemd/tunnelbot.service (exit $rc)"
    fi
    # Informational: systemd's own score of the sandboxing (0 = locked down, 10 = none).
    if exposure="$(timeout 30 systemd-analyze security --offline=yes "$work/unit/tunnelbot.service" 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]* [A-Z]*\).*/\1/p')" && [ -n "$exposure" ]; then
        note "systemd-analyze security --offline: exposure $exposure"
    fi
else
    note "systemd-analyze not found: unit not verified (apt-get install systemd to check it)"
fi

echo "== contrib: production config"
if out="$(timeout 30 "$bin" check --config "$config" 2>&1)" && [ "$out" = "config ok" ]; then
    pass "tunnelbot check --config systemd/tunnelbot.toml: $out"
else
    indent <<<"$out"
    fail "tunnelbot check --config systemd/tunnelbot.toml"
fi
# The config of one broker of an active/standby pair (same unit, [store] backend = "redis").
pair="$work/tunnelbot-pair.toml"
sed "s|/etc/tunnelbot/chp.token|$work/chp.token|" "$contrib/systemd/tunnelbot-pair.toml" > "$pair"
if out="$(timeout 30 "$bin" check --config "$pair" 2>&1)" && [ "$out" = "config ok" ] &&
    grep -q '^backend = "redis"$' "$pair"; then
    pass "tunnelbot check --config systemd/tunnelbot-pair.toml: $out"
else
    indent <<<"$out"
    fail "tunnelbot check --config systemd/tunnelbot-pair.toml"
fi

echo "== contrib: nftables rule (in a network namespace of its own)"
rc=0
out="$(timeout 120 bash "$contrib/nftables/check.sh" 2>&1)" || rc=$?
indent <<<"$out"
if [ "$rc" -eq 0 ]; then
    pass "nftables/tunnelbot.nft: only the allowed users reach the reserved ports"
elif [ "$rc" -eq 2 ] && ! is_root; then
    note "nftables/check.sh needs root and nftables (scripts/setup.sh installs it): not run"
else
    fail "nftables/tunnelbot.nft (nftables/check.sh exit $rc)"
fi

if [ "${#failed[@]}" -gt 0 ]; then
    echo "== contrib: ${#failed[@]} check(s) FAILED, $passed ok:"
    printf '   - %s\n' "${failed[@]}"
    exit 1
fi
echo "== contrib: all $passed checks ok"
