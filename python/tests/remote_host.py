"""Remote hosts for the remote-spawner tests: real OpenSSH sshd processes in network namespaces.

Each host is a network namespace (10.202.0.0/24, one /30 per host) joined to the root
namespace by a veth pair, running its own sshd on its veth address. The namespaces share
the filesystem, so the test user's account and home (under a per-run home root) exist "on"
every host. The hub side of each pair (10.202.0.1, .5, ...) is where the test binds the
broker's SSH listener and the hub's API, which the jobs must reach.

Singularity/Apptainer cannot be installed on these machines: :data:`FAKE_RUNTIME` is a
stand-in that takes the same arguments (``exec --bind a,b IMAGE CMD...``), checks them,
and runs CMD without a container.

Needs root (namespaces, useradd) and /usr/sbin/sshd (scripts/setup-sshd.sh). Missing
requirements skip the tests, except under CI where they fail.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from conftest import require as require_or_fail, stop_process, wait_for

SSHD = "/usr/sbin/sshd"
USER = "tbremote"  # the test's Unix user, created idempotently
SUBNET = "10.202.0"

FAKE_RUNTIME = r"""#!/bin/sh
# Stand-in for apptainer/singularity, which cannot be installed on the test machines. Same
# arguments: exec [--bind SRC[:DST[:ro|rw]],...] IMAGE CMD [ARG...]. It checks them as the
# real runtime would (image present, bind sources present, absolute paths) and runs CMD
# directly: no container, the host's network, as Apptainer's default.
set -eu
[ "${1:-}" = exec ] || { echo "fake-apptainer: expected 'exec', got '${1:-}'" >&2; exit 2; }
shift
binds=
if [ "${1:-}" = --bind ]; then binds=$2; shift 2; fi
[ $# -ge 2 ] || { echo "fake-apptainer: usage: exec [--bind PATHS] IMAGE CMD..." >&2; exit 2; }
image=$1; shift
[ -f "$image" ] || { echo "fake-apptainer: image $image not found" >&2; exit 2; }
old_ifs=$IFS; IFS=,
for bind in $binds; do
    src=${bind%%:*}
    case $src in /*) ;; *) echo "fake-apptainer: bind source $src is not absolute" >&2; exit 2 ;; esac
    [ -e "$src" ] || { echo "fake-apptainer: bind source $src does not exist" >&2; exit 2; }
done
IFS=$old_ifs
echo "fake-apptainer: image=$image binds=$binds command=$1"
exec "$@"
"""


def requirement_missing() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces, a test user)"
    for tool in (SSHD, "/usr/bin/nsenter", shutil.which("ip") or "ip", shutil.which("useradd") or "useradd"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (run scripts/setup.sh)"
    return ""


def require() -> None:
    """Skip when the machine cannot host the fixture; under CI, fail instead."""
    require_or_fail(requirement_missing())


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


@dataclass
class Node:
    name: str
    netns: str
    address: str
    hub_address: str
    veth: str
    dir: Path
    host_key_line: str = ""
    sshd: Optional["subprocess.Popen[bytes]"] = None

    def log_text(self) -> str:
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""

    def pids(self) -> List[int]:
        """Every process in this namespace (sshd and whatever it started)."""
        return [int(p) for p in run("ip", "netns", "pids", self.netns).split()]

    def job_pids(self) -> List[int]:
        """Processes in the namespace other than sshd's (the listener and its sessions)."""
        found = []
        for pid in self.pids():
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name != "sshd":
                found.append(pid)
        return found

    def extra_pids(self) -> List[int]:
        """Every process in the namespace but the listening sshd (sessions included)."""
        return [p for p in self.pids() if self.sshd is None or p != self.sshd.pid]

    def listeners(self) -> List[str]:
        """Local addresses of the namespace's listening TCP sockets."""
        out = run("nsenter", f"--net=/run/netns/{self.netns}", "ss", "-Hltn")
        return [line.split()[3] for line in out.splitlines() if line.strip()]


@dataclass
class RemoteHosts:
    base: Path
    user: str
    home_root: Path
    home: Path
    key: Path
    known_hosts: Path
    runtime: Path
    image: Path
    shared: Path
    nodes: List[Node] = field(default_factory=list)

    @property
    def hub_address(self) -> str:
        return self.nodes[0].hub_address

    def spec(self) -> str:
        return ",".join(f"{n.name}:{n.address}" for n in self.nodes)

    def logs(self) -> str:
        parts = [f"--- sshd {n.name}\n{n.log_text()[-3000:]}" for n in self.nodes]
        log = self.home / ".tunnelbot" / "jupyterhub.log"
        if log.exists():
            parts.append(f"--- remote job log\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def _ensure_user(home: Path) -> pwd.struct_passwd:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run("useradd", "--system", "--shell", "/bin/sh", "--no-create-home", "--home-dir", str(home), USER)
    # '*': no password, but not "locked" (sshd without PAM refuses locked accounts' keys too).
    run("usermod", "--home", str(home), "--password", "*", USER)
    return pwd.getpwnam(USER)


def _keygen(path: Path, comment: str) -> str:
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return (path.with_suffix(".pub") if path.suffix else Path(f"{path}.pub")).read_text().strip()


def _sshd_config(node: Node, user: str) -> Path:
    config = node.dir / "sshd_config"
    config.write_text(
        f"ListenAddress {node.address}\n"
        "Port 22\n"
        f"HostKey {node.dir / 'ssh_host_ed25519_key'}\n"
        "PidFile none\n"
        "UsePAM no\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\n"
        "AuthorizedKeysFile .ssh/authorized_keys\n"
        "StrictModes yes\n"
        "PermitRootLogin no\n"
        f"AllowUsers {user}\n"
        "AllowTcpForwarding no\n"
        "X11Forwarding no\n"
        "PrintMotd no\n"
        "LogLevel VERBOSE\n"
    )
    return config


def _start_sshd(node: Node, user: str) -> None:
    config = _sshd_config(node, user)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    run(SSHD, "-t", "-f", str(config))
    with open(node.dir / "sshd.log", "wb") as log:
        node.sshd = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node.netns}", SSHD, "-D", "-e", "-f", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def listening() -> bool:
        assert node.sshd is not None
        if node.sshd.poll() is not None:
            raise AssertionError(f"sshd on {node.name} exited with {node.sshd.returncode}:\n{node.log_text()}")
        try:
            with socket.create_connection((node.address, 22), timeout=2) as s:
                return s.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    wait_for(listening, 20, f"sshd on {node.name} ({node.address}:22)", interval=0.05, detail=node.log_text)


def _add_netns(node: Node, index: int) -> None:
    ns_side = f"{node.veth}n"
    run("ip", "netns", "add", node.netns)
    run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", ns_side, "netns", node.netns)
    run("ip", "addr", "add", f"{node.hub_address}/30", "dev", node.veth)
    run("ip", "link", "set", node.veth, "up")
    inside = ["ip", "-n", node.netns]
    run(*inside, "addr", "add", f"{node.address}/30", "dev", ns_side)
    run(*inside, "link", "set", ns_side, "up")
    run(*inside, "link", "set", "lo", "up")
    # Every hub-side address (the broker's and the hub's listeners are on the first) via this pair.
    run(*inside, "route", "add", "default", "via", node.hub_address)


def _remove_netns(node: Node) -> None:
    if node.sshd is not None:
        stop_process(node.sshd)
    try:
        leftovers = node.pids()
    except AssertionError:
        leftovers = []
    for pid in leftovers:  # started by this test, in this test's namespace
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", node.netns], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "del", node.veth], capture_output=True, timeout=30)


def _busy_subnet() -> str:
    out = run("ip", "-o", "-4", "addr", "show")
    return next((line for line in out.splitlines() if f" {SUBNET}." in line), "")


@pytest.fixture(scope="module")
def remote_hosts() -> Iterator[RemoteHosts]:
    """Two remote hosts, node1 and node2, with the test user's account and key."""
    require()
    busy = _busy_subnet()
    if busy:
        pytest.fail(f"{SUBNET}.0/24 is in use (another run of these tests?): {busy}")
    tag = secrets.token_hex(3)
    base = Path(tempfile.mkdtemp(prefix="tunnelbot-remote-"))
    base.chmod(0o755)  # the test user walks through it to its home
    home_root = base / "home"
    home = home_root / USER
    hosts = RemoteHosts(
        base=base,
        user=USER,
        home_root=home_root,
        home=home,
        key=home / ".ssh" / "id_ed25519",
        known_hosts=base / "known_hosts",
        runtime=base / "bin" / "apptainer",
        image=base / "images" / "notebook.sif",
        shared=base / "shared",
    )
    try:
        account = _ensure_user(home)
        (home / ".ssh").mkdir(parents=True)
        public = _keygen(hosts.key, f"{USER}@tunnelbot-test")
        (home / ".ssh" / "authorized_keys").write_text(public + "\n")
        for path in (home, home / ".ssh", *(home / ".ssh").iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
        home.chmod(0o700)
        (home / ".ssh").chmod(0o700)
        hosts.runtime.parent.mkdir()
        hosts.runtime.write_text(FAKE_RUNTIME)
        hosts.runtime.chmod(0o755)
        hosts.image.parent.mkdir()
        hosts.image.write_text("not really an image\n")
        hosts.shared.mkdir()
        hosts.shared.chmod(0o755)

        for i in range(2):
            node = Node(
                name=f"node{i + 1}",
                netns=f"tbr-{tag}-{i + 1}",
                address=f"{SUBNET}.{4 * i + 2}",
                hub_address=f"{SUBNET}.{4 * i + 1}",
                veth=f"tbr{tag}{i + 1}",
                dir=base / f"node{i + 1}",
            )
            node.dir.mkdir()
            hosts.nodes.append(node)
            _add_netns(node, i)
            host_key = _keygen(node.dir / "ssh_host_ed25519_key", node.name)
            node.host_key_line = f"{node.address} {' '.join(host_key.split()[:2])}"
            _start_sshd(node, USER)
        hosts.known_hosts.write_text("".join(n.host_key_line + "\n" for n in hosts.nodes))
        yield hosts
    finally:
        for node in hosts.nodes:
            _remove_netns(node)
        shutil.rmtree(base, ignore_errors=True)
