"""A real Slurm for the tests: munged and slurmctld on the hub side, slurmd in a network
namespace that plays the compute node, all in the foreground, started and stopped by PID.

The namespace gets 10.201.0.2/24, the hub side of its veth pair 10.201.0.1; its name is unique
per run. Every Slurm command runs with SLURM_CONF pointing at this cluster's config (a Slurm
client without one would look the controller up in DNS). Facts: ../../../shared/notes/slurm.md.
Needs root, Debian's slurm-wlm 22.05 and munge (scripts/setup-slurm.sh).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from conftest import stop_process, wait_for

HUB_ADDR = "10.201.0.1"
NODE_ADDR = "10.201.0.2"
NODE_NAME = "node1"
JOB_USER = "tbjob"
GATEWAY_USER = "tbgateway"

TOOLS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "ip", "nsenter"]


def missing_requirements() -> str:
    """Empty when this machine can run the cluster, else what is missing."""
    if os.geteuid() != 0:
        return "the real-Slurm tests need root (network namespaces, daemons, job users)"
    for tool in TOOLS:
        if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin"):
            return f"{tool} is not installed (run scripts/setup-slurm.sh)"
    for user in (JOB_USER, GATEWAY_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"the Unix user {user} does not exist (run scripts/setup-slurm.sh)"
    return ""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _run(*cmd: str, check: bool = True, env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=check, env=env)


@dataclass
class SlurmCluster:
    dir: Path
    netns: str
    veth_hub: str
    conf: Path
    munge_socket: Path
    procs: Dict[str, "subprocess.Popen[bytes]"] = field(default_factory=dict)

    @property
    def env(self) -> Dict[str, str]:
        """An environment for Slurm clients: this cluster's config, never a DNS lookup."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def slurm(self, *cmd: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        return _run(*cmd, check=check, env=self.env)

    def squeue(self) -> List[str]:
        """``JOBID STATE USER`` of every job the controller still lists (any state)."""
        out = self.slurm("squeue", "-h", "-t", "all", "-o", "%i %T %u").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def running_jobs(self) -> List[str]:
        return [line for line in self.squeue() if " RUNNING " in f" {line} " or " COMPLETING " in f" {line} "]

    def netns_pids(self) -> List[int]:
        """Processes in the node's namespace other than slurmd itself."""
        out = _run("ip", "netns", "pids", self.netns, check=False).stdout
        slurmd = self.procs.get("slurmd")
        return [int(p) for p in out.split() if slurmd is None or int(p) != slurmd.pid]

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_process(proc, timeout=15)
        # Whatever a job left in the namespace dies with it.
        for pid in self.netns_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _run("ip", "link", "del", self.veth_hub, check=False)
        _run("ip", "netns", "del", self.netns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def _conf(c: SlurmCluster, ctld_port: int, slurmd_port: int) -> str:
    cpus = os.cpu_count() or 1
    return f"""# A one-node cluster for the tests (see slurm_cluster.py)
ClusterName=tunnelbot
SlurmctldHost={socket.gethostname()}({HUB_ADDR})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={c.dir}/state
SlurmdSpoolDir={c.dir}/spool
SlurmctldPidFile={c.dir}/slurmctld.pid
SlurmdPidFile={c.dir}/slurmd.pid
SlurmctldLogFile={c.dir}/slurmctld.log
SlurmdLogFile={c.dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
DefMemPerCPU=100
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
MessageTimeout=10
TCPTimeout=5
MinJobAge=300
NodeName={NODE_NAME} NodeAddr={NODE_ADDR} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=interactive Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster() -> SlurmCluster:
    """Bring the cluster up; the caller must call ``stop()`` (also after a failure here)."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    directory = Path(tempfile.mkdtemp(prefix="tunnelbot-slurm."))
    directory.chmod(0o755)  # the job user reads the config and runs scripts from the spool
    c = SlurmCluster(
        dir=directory,
        netns=f"tunnelbot-slurm-{tag}",
        veth_hub=f"tbh{tag}"[:15],
        conf=directory / "slurm.conf",
        munge_socket=directory / "munge" / "munge.sock",
    )
    veth_node = f"tbn{tag}"[:15]
    try:
        (directory / "munge").mkdir(mode=0o755)
        (directory / "key").mkdir(mode=0o700)
        (directory / "state").mkdir(mode=0o700)
        (directory / "spool").mkdir(mode=0o755)

        _run("ip", "netns", "add", c.netns)
        _run("ip", "link", "add", c.veth_hub, "type", "veth", "peer", "name", veth_node)
        _run("ip", "link", "set", veth_node, "netns", c.netns)
        _run("ip", "addr", "add", f"{HUB_ADDR}/24", "dev", c.veth_hub)
        _run("ip", "link", "set", c.veth_hub, "up")
        for cmd in (("ip", "addr", "add", f"{NODE_ADDR}/24", "dev", veth_node), ("ip", "link", "set", veth_node, "up"),
                    ("ip", "link", "set", "lo", "up")):
            _run("ip", "netns", "exec", c.netns, *cmd)

        key = directory / "key" / "munge.key"
        _run("mungekey", "--create", f"--keyfile={key}", "--force")
        key.chmod(0o600)
        c.procs["munged"] = _daemon(
            directory / "munged.out",
            ["munged", "-F", f"--key-file={key}", f"--socket={c.munge_socket}",
             f"--pid-file={directory / 'munged.pid'}", f"--log-file={directory / 'munged.log'}",
             f"--seed-file={directory / 'munged.seed'}"],
        )
        wait_for(lambda: _munge_ok(c), 15, "munged to answer", 0.05, detail=lambda: _tail(directory / "munged.out"))

        c.conf.write_text(_conf(c, _free_port(HUB_ADDR), _free_port("127.0.0.1")))
        c.conf.chmod(0o644)
        c.procs["slurmctld"] = _daemon(directory / "slurmctld.out", ["slurmctld", "-D", "-i", "-f", str(c.conf)], c.env)
        wait_for(lambda: c.slurm("scontrol", "ping", check=False).stdout.count("UP") > 0, 30,
                 "slurmctld to answer", 0.1, detail=c.logs)
        c.procs["slurmd"] = _daemon(
            directory / "slurmd.out",
            ["nsenter", f"--net=/run/netns/{c.netns}", "--", "slurmd", "-D", "-N", NODE_NAME, "-f", str(c.conf)],
            c.env,
        )

        def idle() -> bool:
            for name, proc in c.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}\n{c.logs()}")
            state = c.slurm("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            return state == "idle"

        wait_for(idle, 40, "the node to be idle", 0.2, detail=c.logs)
    except BaseException:
        c.stop()
        raise
    return c


def _daemon(log: Path, cmd: List[str], env: Optional[Dict[str, str]] = None) -> "subprocess.Popen[bytes]":
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _munge_ok(c: SlurmCluster) -> bool:
    if not c.munge_socket.exists():
        return False
    enc = subprocess.run(["munge", "-n", f"--socket={c.munge_socket}"], capture_output=True, timeout=10)
    if enc.returncode != 0:
        return False
    dec = subprocess.run(["unmunge", f"--socket={c.munge_socket}"], input=enc.stdout, capture_output=True, timeout=10)
    return dec.returncode == 0


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@dataclass
class Gateway:
    """A login node for the gateway topology: a second sshd on the hub's loopback, its own
    host key, and one account (tbgateway) whose sbatch talks to the same slurmctld."""

    proc: "subprocess.Popen[bytes]"
    port: int
    client_key: Path
    known_hosts: Path
    dir: Path

    @property
    def exec_prefix(self) -> str:
        return (
            f"ssh -T -F /dev/null -o BatchMode=yes -i {self.client_key} -o UserKnownHostsFile={self.known_hosts} "
            f"-o StrictHostKeyChecking=yes -p {self.port} {GATEWAY_USER}@127.0.0.1"
        )

    def stop(self) -> None:
        stop_process(self.proc)


def start_gateway(cluster: SlurmCluster) -> Gateway:
    # sshd reads authorized_keys as the account: the directory must be traversable by it
    # (pytest's tmp_path is not). The private keys in it stay 0600.
    workdir = cluster.dir / "gateway"
    workdir.mkdir(mode=0o755)
    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "hub_key"
    for path in (host_key, client_key):
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path))
    authorized = workdir / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o644)
    port = _free_port("127.0.0.1")
    known = workdir / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text().split(' ', 2)[0]} "
                     f"{Path(f'{host_key}.pub').read_text().split(' ', 2)[1]}\n")
    config = workdir / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {host_key}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        f"AllowUsers {GATEWAY_USER}\n"
        "PermitRootLogin no\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        # The login node's sbatch finds this cluster (the site's /etc/slurm/slurm.conf, really).
        f"SetEnv SLURM_CONF={cluster.conf}\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = workdir / "sshd.log"
    proc = _daemon(log, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])
    gw = Gateway(proc=proc, port=port, client_key=client_key, known_hosts=known, dir=workdir)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}:\n{_tail(log)}")
        r = subprocess.run(gw.exec_prefix.split() + ["echo", "$SLURM_CONF"], capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and r.stdout.strip() == str(cluster.conf)

    try:
        wait_for(answers, 20, "the gateway's sshd to answer", 0.1, detail=lambda: _tail(log))
    except BaseException:
        gw.stop()
        raise
    return gw


def cluster_fixture() -> Iterator[SlurmCluster]:
    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()
