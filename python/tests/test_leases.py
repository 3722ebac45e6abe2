"""Issue 18 with the real broker and wrapper: leases renewed from poll(), orphans that expire
within their lease, revokes retried, the proxy's host from the broker, retry settings in the
bundle, certificate tunnels (issue 17) and a hub that is not root (a spawner token).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator

import pytest
from traitlets import TraitError

from conftest import Broker, require, start_broker, stop_process, wait_for
from test_spawner import TunnelSpawner, client, job_log, make_spawner
from tunnelbot_jupyterhub import BrokerClient, Tunnel


def _tunnel(**fields: Any) -> Tunnel:
    base: Dict[str, Any] = dict(
        id="tb_x", user="alice", server_name="", port=20001, state="active", ssh_user="tunnelbot",
        ssh_host="hub", ssh_port=2222, known_hosts="[*]:2222 ssh-ed25519 AAAAC3Nza",
        created_at="2030-01-01T00:00:00Z", expires_at="2030-01-01T01:00:00Z",
        private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----",
    )
    base.update(fields)
    return Tunnel(**base)


def test_hub_side_host_comes_from_the_broker() -> None:
    spawner = TunnelSpawner(user=SimpleNamespace(name="alice"))
    assert spawner.hub_side(_tunnel(tunnel_host="10.0.0.5")) == ("10.0.0.5", 20001)
    assert spawner.hub_side(_tunnel()) == ("127.0.0.1", 20001)  # a broker older than the field
    assert Tunnel.from_json({**_json_tunnel(), "tunnel_host": "[::1]"}).tunnel_host == "[::1]"


def _json_tunnel() -> Dict[str, Any]:
    return {"id": "tb_x", "user": "alice", "port": 1, "state": "active", "ssh_user": "tunnelbot",
            "ssh_port": 22, "known_hosts": "x"}


def test_lease_must_outlast_several_polls() -> None:
    spawner = TunnelSpawner(user=SimpleNamespace(name="alice"))
    assert spawner.lease_seconds == 600 and spawner.poll_interval == 30 and spawner.tunnel_lease() == 600
    short = TunnelSpawner(user=SimpleNamespace(name="alice"), lease_seconds=60)
    with pytest.raises(ValueError, match=r"at least 3 poll intervals \(90 s"):
        short.tunnel_lease()
    assert TunnelSpawner(user=SimpleNamespace(name="alice"), lease_seconds=0).tunnel_lease() is None
    with pytest.raises(TraitError):
        TunnelSpawner(user=SimpleNamespace(name="alice"), lease_seconds=-1)
    with pytest.raises(TraitError):
        TunnelSpawner(user=SimpleNamespace(name="alice"), max_backoff=0)


def test_retry_settings_and_the_retry_horizon_go_into_the_bundle() -> None:
    spawner = TunnelSpawner(user=SimpleNamespace(name="alice"), max_backoff=3, max_attempts=7, ssh_host="hub")
    bundle = spawner.credential_bundle(_tunnel())
    assert "max_backoff=3\n" in bundle and "max_attempts=7\n" in bundle
    # A leased tunnel's expiry moves with renewals; the bundle's retry horizon is the issue-time
    # expiry plus the lifetime again (2030-01-01T02:00:00Z).
    assert "expires_at=1893463200\n" in bundle
    unleased = TunnelSpawner(user=SimpleNamespace(name="alice"), lease_seconds=0, ssh_host="hub")
    assert "expires_at=1893459600\n" in unleased.credential_bundle(_tunnel())


def test_certificate_bundle_has_no_key() -> None:
    spawner = TunnelSpawner(user=SimpleNamespace(name="alice"), ssh_host="hub", tunnel_auth="certificate",
                            job_identity_file="~/.ssh/id_ed25519", job_certificate_file="~/.ssh/id_ed25519-cert.pub")
    bundle = spawner.credential_bundle(_tunnel(private_key=None, auth="certificate"))
    assert "PRIVATE KEY" not in bundle
    assert "auth=certificate\nidentity_file=~/.ssh/id_ed25519\ncertificate_file=~/.ssh/id_ed25519-cert.pub\n" in bundle
    with pytest.raises(ValueError, match="not a file name"):
        TunnelSpawner(user=SimpleNamespace(name="alice"), ssh_host="hub", tunnel_auth="certificate",
                      job_identity_file="a b").credential_bundle(_tunnel(private_key=None))


def test_poll_renews_the_lease_and_an_orphan_expires_within_it(broker: Broker, tmp_path: Path) -> None:
    lease = 3
    spawner = make_spawner(broker, tmp_path, [], lease_seconds=lease, poll_interval=1, max_backoff=1)
    host, port = asyncio.run(spawner.start())
    assert (host, port) == ("127.0.0.1", spawner.tunnel_port)
    issued = asyncio.run(client(broker).get(spawner.tunnel_id))
    assert issued is not None and issued.lease_seconds == lease and issued.tunnel_host == "127.0.0.1"
    # The hub polls every poll_interval (1 s here) for twice the lease: the tunnel lives on.
    began = time.monotonic()
    last_until = issued.lease_until
    while time.monotonic() - began < 2 * lease:
        assert asyncio.run(spawner.poll()) is None
        current = asyncio.run(client(broker).get(spawner.tunnel_id))
        assert current is not None and current.active and current.connected, current
        assert current.renewed_at is not None and current.lease_until is not None
        assert current.lease_until >= (last_until or ""), (current.lease_until, last_until)
        last_until = current.lease_until
        time.sleep(spawner.poll_interval)  # JupyterHub's poll cadence, not a readiness wait
    # The hub's record is gone (no stop, no revoke, no more polls): the lease ends the tunnel,
    # the broker refuses the job's credential and its wrapper stops the notebook (77).
    tunnel_id = spawner.tunnel_id
    wait_for(lambda: (asyncio.run(client(broker).get(tunnel_id)) or issued).state == "expired", lease + 5,
             "the orphaned tunnel to expire within its lease", interval=0.2, detail=broker.log_text)
    assert spawner.proc is not None
    wait_for(lambda: spawner.proc is not None and spawner.proc.poll() is not None, 30, "the orphaned job to stop",
             detail=lambda: job_log(tmp_path))
    assert spawner.proc.returncode == 77, job_log(tmp_path)
    assert "lease_lapsed" in broker.log_text()


def test_a_failed_revoke_is_retried(tunnelbot_bin: str, broker: Broker, tmp_path: Path) -> None:
    spawner = make_spawner(broker, tmp_path, [], poll_interval=1, lease_seconds=30)

    async def scenario() -> Dict[str, Any]:
        await spawner.start()
        tunnel_id = spawner.tunnel_id
        stop_process(broker.proc)  # the broker is down when the hub stops the server
        await spawner.stop()
        assert spawner.pending_revokes == [tunnel_id] and spawner.tunnel_id == ""
        state: Dict[str, Any] = spawner.get_state()
        assert state["tunnelbot_pending_revokes"] == [tunnel_id]  # survives a hub restart too
        loop = asyncio.get_running_loop()
        back = await loop.run_in_executor(None, lambda: start_broker(
            tunnelbot_bin, broker.dir, ssh_port=broker.ssh_port, admin_port=int(broker.admin_url.rsplit(":", 1)[1])))
        broker.proc = back.proc
        deadline = loop.time() + 15
        while spawner.pending_revokes and loop.time() < deadline:  # the background retry
            await asyncio.sleep(0.1)
        assert not spawner.pending_revokes, "the revoke was not retried"
        after = await client(broker).get(tunnel_id)
        assert after is not None and after.state == "revoked"
        return state

    state = asyncio.run(scenario())
    # A restarted hub retries what its state still lists (already revoked: fine, and cleared).
    again = make_spawner(broker, tmp_path, [])
    again.load_state(state)
    assert again.pending_revokes
    assert asyncio.run(again.poll()) == 0
    assert not again.pending_revokes


def _ssh_keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, stdin=subprocess.DEVNULL, capture_output=True)


def test_certificate_tunnel_from_the_spawner(tunnelbot_bin: str, tmp_path: Path) -> None:
    """The site's CA signs the job user's key; the tunnel is issued with no key at all."""
    ca, user_key = tmp_path / "ca", tmp_path / "node" / "id_ed25519"
    user_key.parent.mkdir(mode=0o700)
    _ssh_keygen("-t", "ed25519", "-N", "", "-f", str(ca))
    _ssh_keygen("-t", "ed25519", "-N", "", "-f", str(user_key))
    _ssh_keygen("-s", str(ca), "-I", "job-alice", "-n", "alice", "-V", "-5m:+1h", str(user_key) + ".pub")
    cert = Path(str(user_key) + "-cert.pub")
    assert cert.exists()
    b = start_broker(tunnelbot_bin, tmp_path / "broker", sections={"ssh": f'trusted_user_ca_keys = "{ca}.pub"'})
    try:
        raw = asyncio.run(client(b).issue("alice", "direct", auth="certificate"))
        assert raw.private_key is None and raw.auth == "certificate"

        spawner = make_spawner(b, tmp_path, [], tunnel_auth="certificate", job_identity_file=str(user_key),
                               job_certificate_file=str(cert))
        _, port = asyncio.run(spawner.start())
        tunnel = asyncio.run(client(b).get(spawner.tunnel_id))
        assert tunnel is not None and tunnel.connected and tunnel.auth == "certificate" and tunnel.port == port
        bundle = spawner.credential_bundle(tunnel)
        assert "PRIVATE KEY" not in bundle and f"identity_file={user_key}\n" in bundle
        assert "job-alice" in b.log_text(), "the broker logs the certificate's key ID"
        asyncio.run(spawner.stop())
        after = asyncio.run(client(b).get(tunnel.id))
        assert after is not None and after.state == "revoked"
    finally:
        stop_process(b.proc)


# --- a hub that is not root --------------------------------------------------------------

DRIVER = r"""
import asyncio, json, sys
from tunnelbot_jupyterhub import BrokerClient, BrokerError
from tunnelbot_jupyterhub.broker import read_token

url, admin_file, spawner_file = sys.argv[1:4]
out = {}
try:
    read_token(admin_file)
    out["admin"] = "readable"
except BrokerError as e:
    out["admin"] = e.message

async def main():
    broker = BrokerClient.from_token_file(url, spawner_file)
    t = await broker.issue("alice", "", 3600, lease_seconds=60)
    out["issued"] = t.state
    out["key"] = bool(t.private_key)
    r = await broker.renew(t.id, 7200)
    out["renewed"] = bool(r and r.renewed_at)
    out["revoked"] = await broker.revoke(t.id)
    g = await broker.get(t.id)
    out["state"] = g.state if g else None

asyncio.run(main())
print(json.dumps(out))
"""


@pytest.fixture
def hub_group() -> Iterator[int]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        require("the non-root hub test needs root and setpriv")
    name = "tbhub18"
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
        gid = grp.getgrnam(name).gr_gid
    yield gid


def test_a_hub_that_is_not_root_uses_a_spawner_token(tunnelbot_bin: str, hub_group: int) -> None:
    # Under /tmp, not pytest's 0700 tmp_path: the hub's user must reach the token's folder.
    top = Path(tempfile.mkdtemp(prefix="tunnelbot-h18."))
    try:
        top.chmod(0o755)
        tokens = top / "tokens"
        b = start_broker(tunnelbot_bin, top / "broker", sections={"admin": f'tokens_dir = "{tokens}"'})
        try:
            (top / "broker").chmod(0o755)  # the config's folder; keys/ stays 0700
            made = subprocess.run(
                [tunnelbot_bin, "token", "create", "--config", str(b.dir / "tunnelbot.toml"), "--scope", "spawner",
                 "--group", grp.getgrgid(hub_group).gr_name],
                check=True, capture_output=True, text=True,
            )
            token_file = Path(made.stdout.strip().splitlines()[-1])
            assert token_file.parent == tokens and oct(token_file.stat().st_mode & 0o777) == "0o640"
            # The hub: nobody, in the token's group, with the package on its Python's path.
            driver = subprocess.run(
                ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--groups", str(hub_group), "--",
                 sys.executable, "-c", DRIVER, b.admin_url, str(b.token_file), str(token_file)],
                capture_output=True, text=True, timeout=60, cwd="/",
            )
            assert driver.returncode == 0, driver.stderr
            out = json.loads(driver.stdout)
            assert out["admin"].startswith("cannot read the admin token file"), out
            assert out == {**out, "issued": "active", "key": True, "renewed": True, "revoked": True, "state": "revoked"}
            # Without the group the scoped token is unreadable too.
            denied = subprocess.run(
                ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--",
                 sys.executable, "-c", DRIVER, b.admin_url, str(b.token_file), str(token_file)],
                capture_output=True, text=True, timeout=60, cwd="/",
            )
            assert denied.returncode != 0 and "cannot read the admin token file" in denied.stderr, denied.stderr
        finally:
            stop_process(b.proc)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_requeued_job_reruns_its_script_on_the_same_port(broker: Broker, tmp_path: Path) -> None:
    """A stand-in for `scontrol requeue`: the same bundle (the batch script's here-document) runs
    twice; between the runs the hub's polls renew the lease, and the second run gets the same
    tunnel and hub port. (Slurm holds a requeued job back for minutes: too slow for the suite.)"""
    from conftest import WRAPPER, http_get, python_http_server

    spawner = make_spawner(broker, tmp_path, [], lease_seconds=3, poll_interval=1, max_backoff=1)
    site = tmp_path / "site"
    broker_client = client(broker)

    async def issue() -> Tunnel:
        return await spawner.issue_tunnel(broker_client)

    tunnel = asyncio.run(issue())
    bundle = spawner.credential_bundle(tunnel)
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def run_script() -> "subprocess.Popen[bytes]":
        log = open(tmp_path / "requeue.log", "ab")
        proc = subprocess.Popen(["/bin/sh", str(WRAPPER), "--credential", "-", *python_http_server(site)],
                                stdin=subprocess.PIPE, stdout=log, stderr=log, env=env)
        assert proc.stdin is not None
        proc.stdin.write(bundle.encode())
        proc.stdin.close()
        return proc

    def served() -> bool:
        try:
            return b"hello through the tunnel" in http_get(tunnel.port, "/hello.txt")
        except OSError:
            return False

    def state() -> Tunnel:
        current = asyncio.run(broker_client.get(tunnel.id))
        assert current is not None
        return current

    first = run_script()
    try:
        wait_for(served, 30, "the first run to answer through the tunnel", 0.1)
    finally:
        stop_process(first)
    wait_for(lambda: not state().connected, 10, "the first run's session to end", 0.1)
    # Requeued, waiting: the hub keeps polling, and renewing, for longer than the lease.
    began = time.monotonic()
    while time.monotonic() - began < 2 * spawner.lease_seconds:
        renewed = asyncio.run(spawner.renew_tunnel(broker_client, tunnel.id))
        assert renewed is not None and renewed.active
        time.sleep(spawner.poll_interval)  # the hub's poll cadence
    second = run_script()
    try:
        wait_for(served, 30, "the requeued run to answer through the same hub port", 0.1,
                 detail=lambda: (tmp_path / "requeue.log").read_text(errors="replace"))
        again = state()
        assert again.id == tunnel.id and again.port == tunnel.port and again.connected and again.active
    finally:
        stop_process(second)
    asyncio.run(broker_client.revoke(tunnel.id))
