#!/usr/bin/env bash
# Proves tunnelbot.nft for real, inside a network namespace of its own (never the host's):
# loads the rule with a test port range and test users, listens in the namespace, and checks
# that the allowed user and root connect while another user is refused, on IPv4 and IPv6
# loopback, and that ports outside the range stay open to everyone.
#
#   bash contrib/nftables/check.sh        # as root; needs nft, ip, setpriv, python3
#
# Exits 0 when every case holds, 1 when one does not, 2 when it cannot run here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rules="$here/tunnelbot.nft"
for tool in nft ip setpriv; do
    command -v "$tool" >/dev/null 2>&1 || { echo "nftables check: $tool not found" >&2; exit 2; }
done
# The system's python3: the test users must be able to run it (a python3 under root's home,
# such as a pyenv shim, is not readable by them).
py=/usr/bin/python3
[ -x "$py" ] || { echo "nftables check: $py not found" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "nftables check: needs root (network namespace)" >&2; exit 2; }

ns="tunnelbot-nft-$$"
allowed_uid=64001 # stands for the proxy's user
other_uid=64002   # any other local user
first=41000 last=41009 inside=41005 outside=41100
work="$(mktemp -d)"
listener=""
cleanup() {
    [ -n "$listener" ] && kill "$listener" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$ns"
ip -n "$ns" link set lo up
# The shipped file with only the two defines changed.
sed -e "s/^define ports = .*/define ports = $first-$last/" \
    -e "s/^define allowed = .*/define allowed = { 0, $allowed_uid }/" "$rules" >"$work/test.nft"
grep -q "^define ports = $first-$last$" "$work/test.nft" && grep -q "^define allowed = { 0, $allowed_uid }$" "$work/test.nft" ||
    { echo "nftables check: tunnelbot.nft has no 'define ports'/'define allowed' line to set" >&2; exit 1; }
ip netns exec "$ns" nft -f "$work/test.nft"
# Loading twice must work (the file replaces its own table).
ip netns exec "$ns" nft -f "$work/test.nft"

# Listens on both ports, IPv4 and IPv6 loopback, accepting and closing; signals readiness by
# creating a file once every socket listens.
ip netns exec "$ns" "$py" - "$work/ready" "$inside" "$outside" <<'PY' &
import os, socket, sys, threading
ready, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
socks = []
for port in ports:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
        socks.append(s)
def serve(s):
    while True:
        c, _ = s.accept()
        c.close()
for s in socks:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
open(ready, "w").close()
threading.Event().wait()
PY
listener=$!
for _ in $(seq 1 500); do
    [ -e "$work/ready" ] && break
    kill -0 "$listener" 2>/dev/null || { echo "nftables check: listener died" >&2; exit 1; }
    sleep 0.02
done
[ -e "$work/ready" ] || { echo "nftables check: listener not ready" >&2; exit 1; }

# connect UID HOST PORT: prints "ok" or the error (refused), bounded by a 5 s connect timeout.
connect() {
    local who=()
    [ "$1" -ne 0 ] && who=(setpriv --reuid="$1" --regid="$1" --clear-groups)
    ip netns exec "$ns" "${who[@]}" "$py" -c '
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("ok")
except OSError as e:
    print(type(e).__name__)
' "$2" "$3"
}

failed=0
expect() { # expect WANT UID HOST PORT WHAT
    local got
    got="$(connect "$2" "$3" "$4")"
    if [ "$got" = "$1" ]; then
        echo "   ok   $5: $got"
    else
        echo "   FAIL $5: wanted $1, got $got"
        failed=1
    fi
}
for host in 127.0.0.1 ::1; do
    expect ok "$allowed_uid" "$host" "$inside" "proxy user -> $host:$inside (reserved)"
    expect ok 0 "$host" "$inside" "root -> $host:$inside (reserved)"
    expect ConnectionRefusedError "$other_uid" "$host" "$inside" "other user -> $host:$inside (reserved)"
    expect ok "$other_uid" "$host" "$outside" "other user -> $host:$outside (not reserved)"
done
# The rule counted the refusals.
if ip netns exec "$ns" nft list table inet tunnelbot | grep -q 'counter packets [1-9]'; then
    echo "   ok   the rule's counter saw the refused connections"
else
    echo "   FAIL the rule's counter is zero"
    failed=1
fi
exit "$failed"
