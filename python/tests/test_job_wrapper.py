"""tunnelbot-job with the real ssh client against the real broker."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shlex
import signal
import socket
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conftest import (
    WRAPPER,
    Broker,
    descendants,
    http_get,
    pid_alive,
    python_http_server,
    ssh_children,
    start_broker,
    stop_process,
    wait_for,
)
from tunnelbot_jupyterhub import BrokerClient, Tunnel, heredoc, render_bundle
from tunnelbot_jupyterhub.spawner import describe_exit


def client(broker: Broker) -> BrokerClient:
    return BrokerClient.from_token_file(broker.admin_url, str(broker.token_file))


def issue(broker: Broker) -> Tunnel:
    return asyncio.run(client(broker).issue("alice", "", ttl_seconds=600))


def current(broker: Broker, tunnel: Tunnel) -> Tunnel:
    t = asyncio.run(client(broker).get(tunnel.id))
    assert t is not None
    return t


class Job:
    """The wrapper around a stand-in notebook (python's http.server), as a batch job runs it.

    With ``bundle``, the job script hands the wrapper its credential in a here-document
    (``--credential -``), as the batch spawners do; else the deprecated environment inputs.
    """

    def __init__(self, broker: Broker, tunnel: Tunnel, tmp: Path, bundle: Optional[str] = None, **env: str) -> None:
        self.site = tmp / "site"
        self.site.mkdir(parents=True)
        self.secret = secrets.token_hex(8)
        (self.site / "hello.txt").write_text(self.secret)
        self.tmpdir = tmp / "jobtmp"
        self.tmpdir.mkdir()
        self.stderr = tmp / "job.err"
        assert tunnel.private_key
        full_env = {"PATH": os.environ["PATH"], "TMPDIR": str(self.tmpdir)}
        notebook = python_http_server(self.site)
        if bundle is None:
            full_env.update(
                {
                    "TUNNELBOT_KEY": tunnel.private_key,
                    "TUNNELBOT_KNOWN_HOSTS": tunnel.known_hosts,  # as the broker gives it: "[*]:port key"
                    "TUNNELBOT_HOST": "127.0.0.1",
                    "TUNNELBOT_SSH_PORT": str(tunnel.ssh_port),
                    "TUNNELBOT_SSH_USER": tunnel.ssh_user,
                    "TUNNELBOT_PORT": str(tunnel.port),
                }
            )
            argv = ["/bin/sh", str(WRAPPER), *notebook]
        else:
            script = tmp / "job.sh"
            script.write_text(
                "#!/bin/sh\n" + shlex.join(["exec", "/bin/sh", str(WRAPPER), "--credential", "-", *notebook]) + " " + heredoc(bundle)
            )
            script.chmod(0o700)
            argv = ["/bin/sh", str(script)]
        full_env.update(env)
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def key_files(self) -> List[Path]:
        return list(self.tmpdir.glob("tunnelbot.*/key"))

    def children(self) -> List[int]:
        return list(descendants(self.proc.pid))

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the wrapper did not exit within {timeout} s:\n{self.log()}") from None

    def stop(self) -> None:
        stop_process(self.proc)


def get_through_tunnel(port: int, job: Job, timeout: float = 20) -> bytes:
    """GET hello.txt via the hub port; retried because the notebook may still be starting."""

    def attempt() -> Optional[bytes]:
        try:
            response = http_get(port, "/hello.txt")
        except OSError:
            return None
        return response if response.startswith(b"HTTP/1.0 200") else None

    return wait_for(attempt, timeout, f"a 200 through hub port {port}", interval=0.1, detail=job.log)


@pytest.fixture
def job_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    jobs: List[Job] = []

    def make(broker: Broker, tunnel: Tunnel, bundle: Optional[str] = None, **env: str) -> Job:
        job = Job(broker, tunnel, tmp_path / f"job{len(jobs)}", bundle, **env)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.stop()


def test_tunnel_carries_bytes_survives_ssh_death_and_cleans_up(broker: Broker, job_factory) -> None:  # type: ignore[no-untyped-def]
    tunnel = issue(broker)
    job = job_factory(broker, tunnel)

    wait_for(lambda: current(broker, tunnel).connected, 20, "the tunnel to connect", interval=0.1, detail=job.log)
    allocated = f"Allocated port {tunnel.port} "
    wait_for(lambda: allocated in job.log(), 10, f"ssh to print {allocated!r}", detail=job.log)

    keys = job.key_files()
    assert len(keys) == 1
    assert stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(keys[0].parent.stat().st_mode) == 0o700

    assert job.secret.encode() in get_through_tunnel(tunnel.port, job)
    seen = current(broker, tunnel)
    assert seen.bytes_to_job > 0 and seen.bytes_from_job > len(job.secret)

    # Kill the job's ssh: the wrapper reconnects and the same hub port works again.
    (old_ssh,) = ssh_children(job.proc.pid)
    os.kill(old_ssh, signal.SIGKILL)
    wait_for(lambda: job.log().count(allocated) == 2, 30, f"a second {allocated!r}", interval=0.1, detail=job.log)
    (new_ssh,) = ssh_children(job.proc.pid)
    assert new_ssh != old_ssh
    assert "reconnecting" in job.log()
    wait_for(lambda: current(broker, tunnel).connected, 10, "the tunnel to be up again")
    assert job.secret.encode() in get_through_tunnel(tunnel.port, job)

    # TERM stops ssh and the notebook and removes the key.
    children = job.children()
    assert new_ssh in children and len(children) >= 2
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit(20) == 143
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the wrapper's children to exit")
    assert job.key_files() == [] and list(job.tmpdir.iterdir()) == []
    wait_for(lambda: not current(broker, tunnel).connected, 10, "the broker to see the session end")
    assert current(broker, tunnel).state == "active"


def notebook_pids(job: Job) -> List[int]:
    """The stand-in notebook's processes (http.server), not the wrapper's own helpers."""
    found = []
    for pid in descendants(job.proc.pid):
        try:
            if b"http.server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_revoked_tunnel_makes_the_wrapper_stop_with_77(broker: Broker, job_factory) -> None:  # type: ignore[no-untyped-def]
    """The broker's "credential revoked" disconnect is final: no retries, the notebook is stopped."""
    tunnel = issue(broker)
    job = job_factory(broker, tunnel, render_bundle(tunnel, "127.0.0.1", [], max_attempts=1000))
    wait_for(lambda: current(broker, tunnel).connected, 20, "the tunnel to connect", interval=0.1, detail=job.log)
    children = job.children()
    assert asyncio.run(client(broker).revoke(tunnel.id))
    assert job.wait_exit(30) == 77
    assert "the broker refused the credential" in job.log() and "credential revoked" in job.log()
    assert "reconnecting" not in job.log()
    assert "refused the credential" in describe_exit(77)
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the notebook and ssh to exit")
    assert list(job.tmpdir.iterdir()) == []


def test_refused_login_makes_the_wrapper_stop_with_77(broker: Broker, job_factory) -> None:  # type: ignore[no-untyped-def]
    """A credential the broker no longer takes: ssh's "Permission denied (publickey" is final."""
    tunnel = issue(broker)
    assert asyncio.run(client(broker).revoke(tunnel.id))
    job = job_factory(broker, tunnel, render_bundle(tunnel, "127.0.0.1", []))
    assert job.wait_exit(30) == 77
    assert "Permission denied (publickey" in job.log() and "reconnecting" not in job.log()
    assert list(job.tmpdir.iterdir()) == []


def test_broker_outage_longer_than_the_old_give_up_time(tunnelbot_bin: str, tmp_path: Path, job_factory) -> None:  # type: ignore[no-untyped-def]
    """A stopped broker is retried past the old 10-attempt limit; once it is back (same ports and
    state), the tunnel is up again within 15 s and the notebook never noticed."""
    broker = start_broker(tunnelbot_bin, tmp_path / "broker")
    try:
        tunnel = issue(broker)
        assert tunnel.expires_at  # so the wrapper retries until then, whatever max_attempts says
        job = job_factory(broker, tunnel, render_bundle(tunnel, "127.0.0.1", [], max_backoff=1))
        wait_for(lambda: current(broker, tunnel).connected, 20, "the tunnel to connect", interval=0.1, detail=job.log)
        assert job.secret.encode() in get_through_tunnel(tunnel.port, job)
        notebook = notebook_pids(job)
        assert notebook

        stop_process(broker.proc)
        before = job.log().count("reconnecting in")
        # More failed attempts in a row than the old limit of 10.
        wait_for(
            lambda: job.log().count("reconnecting in") - before >= 12,
            60,
            "12 failed attempts while the broker is down",
            interval=0.1,
            detail=job.log,
        )
        assert job.proc.poll() is None, job.log()
        assert all(pid_alive(p) for p in notebook)
        assert "broker shutting down" in job.log()  # told apart from a refusal

        admin_port = int(broker.admin_url.rsplit(":", 1)[1])
        broker = start_broker(tunnelbot_bin, broker.dir, ssh_port=broker.ssh_port, admin_port=admin_port)
        wait_for(lambda: current(broker, tunnel).connected, 15, "the tunnel to be connected again", interval=0.1, detail=job.log)
        assert job.secret.encode() in get_through_tunnel(tunnel.port, job)
        assert job.proc.poll() is None and all(pid_alive(p) for p in notebook)
    finally:
        stop_process(broker.proc)


def test_retrying_stops_at_the_credentials_expiry(broker: Broker, job_factory) -> None:  # type: ignore[no-untyped-def]
    tunnel = issue(broker)
    stop_process(broker.proc)  # unreachable from the start
    soon = datetime.now(timezone.utc) + timedelta(seconds=3)
    expiring = dataclasses.replace(tunnel, expires_at=soon.strftime("%Y-%m-%dT%H:%M:%SZ"))
    job = job_factory(broker, tunnel, render_bundle(expiring, "127.0.0.1", [], max_backoff=1, max_attempts=1000))
    children = job.children()
    assert job.wait_exit(30) == 69
    log = job.log()
    assert "reconnecting in" in log  # retried until then
    assert f"the credential expired at {int(soon.timestamp())}; giving up" in log
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the notebook to exit")
    assert list(job.tmpdir.iterdir()) == []


def test_unexpected_host_key_is_refused(broker: Broker, job_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=30)
    wrong = f"[*]:{broker.ssh_port} " + " ".join(other.with_suffix(".pub").read_text().split()[:2])
    tunnel = issue(broker)
    job = job_factory(broker, tunnel, TUNNELBOT_KNOWN_HOSTS=wrong, TUNNELBOT_MAX_ATTEMPTS="1")
    assert job.wait_exit(30) == 69
    assert "Host key verification failed" in job.log() or "HOST IDENTIFICATION HAS CHANGED" in job.log()
    assert not current(broker, tunnel).connected
    assert current(broker, tunnel).bytes_to_job == 0
    assert list(job.tmpdir.iterdir()) == []


def test_key_file_input(broker: Broker, job_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tunnel = issue(broker)
    assert tunnel.private_key
    key = tmp_path / "job.key"
    key.write_text(tunnel.private_key)
    key.chmod(0o600)
    env: Dict[str, str] = {"TUNNELBOT_KEY": "", "TUNNELBOT_KEY_FILE": str(key)}
    job = job_factory(broker, tunnel, **env)
    wait_for(lambda: current(broker, tunnel).connected, 20, "the tunnel to connect", interval=0.1, detail=job.log)
    assert job.secret.encode() in get_through_tunnel(tunnel.port, job)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit(20) == 143
    assert key.exists(), "the wrapper deletes only its own copy"


def test_ssh_starts_the_key_re_exchanges(broker: Broker, job_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """ssh is told to re-key (RekeyLimit) before the broker's own 1 GiB / 1 h would make the broker
    start one: a broker-started re-exchange can drop the session under parallel downloads."""
    args_file = tmp_path / "ssh.args"
    shim = tmp_path / "ssh-shim"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{args_file}"\nexec ssh "$@"\n')
    shim.chmod(0o755)
    tunnel = issue(broker)
    job = job_factory(broker, tunnel, TUNNELBOT_SSH=str(shim), TUNNELBOT_SSH_OPTIONS="ServerAliveInterval=5")
    assert job.secret.encode() in get_through_tunnel(tunnel.port, job)
    args = args_file.read_text().splitlines()
    # The spawner's options come first, and ssh keeps the first value: they override the defaults.
    assert args.index("ServerAliveInterval=5") < args.index("ServerAliveInterval=15")
    assert "RekeyLimit=512M 30m" in args
    # AES-GCM first: about half the broker's CPU per byte of chacha20-poly1305.
    assert any(a.startswith("Ciphers=aes128-gcm@openssh.com,") for a in args)


def test_bundle_from_a_job_script_with_the_real_broker(broker: Broker, job_factory) -> None:  # type: ignore[no-untyped-def]
    """The spawners' way: render_bundle, a here-document in the job script, `--credential -`."""
    tunnel = issue(broker)
    job = job_factory(broker, tunnel, render_bundle(tunnel, "127.0.0.1", ["ServerAliveInterval=5"]))
    wait_for(lambda: current(broker, tunnel).connected, 20, "the tunnel to connect", interval=0.1, detail=job.log)
    assert job.secret.encode() in get_through_tunnel(tunnel.port, job)
    assert f"forwarding hub port {tunnel.port} (tunnel {tunnel.id})" in job.log()
    keys = job.key_files()
    assert len(keys) == 1 and stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    # Neither the wrapper's nor the notebook's environment holds the key.
    secret = (tunnel.private_key or "").splitlines()[1]
    for pid in [job.proc.pid, *job.children()]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        assert secret.encode() not in environ and secret.encode() not in cmdline
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit(20) == 143
    assert list(job.tmpdir.iterdir()) == []


def test_standby_brokers_in_the_bundle() -> None:
    """Each further broker becomes a broker= line, its address pinned to the pair's one host key."""
    tunnel = Tunnel(
        id="tb_1",
        user="alice",
        server_name="",
        port=20001,
        state="active",
        ssh_host="",
        ssh_port=2222,
        ssh_user="tunnelbot",
        known_hosts="[*]:2222 ssh-ed25519 AAAAkey",
        private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----",
    )
    bundle = render_bundle(tunnel, "hub-a", [], standby_brokers=["hub-b", "10.0.0.7:22", "[fd00::7]:2200"])
    lines = bundle.splitlines()
    assert [line for line in lines if line.startswith("broker=")] == [
        "broker=hub-b:2222",
        "broker=10.0.0.7:22",
        "broker=fd00::7:2200",
    ]
    assert [line for line in lines if line.startswith("known_hosts=")] == [
        "known_hosts=[hub-a]:2222 ssh-ed25519 AAAAkey",
        "known_hosts=[hub-b]:2222 ssh-ed25519 AAAAkey",
        "known_hosts=10.0.0.7 ssh-ed25519 AAAAkey",
        "known_hosts=[fd00::7]:2200 ssh-ed25519 AAAAkey",
    ]
    for bad in ["-oProxyCommand=x", "hub b", "hub:port", "[::1]x"]:
        with pytest.raises(ValueError):
            render_bundle(tunnel, "hub-a", [], standby_brokers=[bad])


def test_the_wrapper_tries_each_broker_in_turn(broker: Broker, job_factory) -> None:  # type: ignore[no-untyped-def]
    """A first broker that refuses connections (a dead active one) is passed over at once for
    the next in the list, which holds the tunnel."""
    # Bound but not listening: connections to it are refused, and no one else can take it.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    try:
        tunnel = issue(broker)
        dead_host = f"127.0.0.1:{dead.getsockname()[1]}"
        bundle = render_bundle(
            dataclasses.replace(tunnel, ssh_port=dead.getsockname()[1]),
            "127.0.0.1",
            [],
            standby_brokers=[f"127.0.0.1:{broker.ssh_port}"],
        )
        job = job_factory(broker, tunnel, bundle)
        wait_for(lambda: current(broker, tunnel).connected, 20, "the tunnel to connect", interval=0.1, detail=job.log)
        assert job.secret.encode() in get_through_tunnel(tunnel.port, job)
        log = job.log()
        assert f"(or 127.0.0.1:{broker.ssh_port})" in log
        assert f"ssh to {dead_host} exited with status 255; trying the next broker" in log
        assert "reconnecting in" not in log, "no pause before the next broker"
    finally:
        dead.close()
