"""End to end with a real Slurm: JupyterHub 6.1.1 + CHP + broker on the hub side, the job on a
compute node played by a network namespace (slurm_cluster.py), for both topologies:

- ``local``: sbatch on the hub, run as the user with sudo (the documented default);
- ``gateway``: sbatch on a login node over ssh as one shared account (a second sshd).

The notebook's own API token also attacks ``/hub/api/batchspawner`` (issue 13): nothing it
posts changes the spawner, and the admin token never reaches a listener of its choosing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from conftest import Broker, require, start_broker, stop_process, wait_for
from hub import (
    BIN_DIR,
    BrowserLike,
    HubRunner,
    Proc,
    Stack,
    _requirements,
    hub_config,
    hub_env,
    start_chp,
    stop_hubs,
    stop_rest,
)
from slurm_cluster import HUB_ADDR, JOB_USER, Gateway, SlurmCluster, missing_requirements, start_cluster, start_gateway

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_config(heading: str) -> str:
    """The README's jupyterhub_config.py for ``heading``, verbatim."""
    text = README.read_text()
    section = text.split(f"### `jupyterhub_config.py` for {heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, heading
    return match.group(1)


def _need(missing: str) -> None:
    require(missing)


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    _need(missing_requirements() or _requirements())
    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()


class Listener:
    """A TCP listener of the attacker's: records every connection it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.received: List[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self.sock.close()


@dataclass
class SlurmStack:
    stack: Stack
    config: Path
    hub_dir: Path
    hub_port: int
    start_hub: Any

    def restart_hub(self) -> None:
        stop_process(self.stack.hub.proc, timeout=30)
        self.stack.hub = self.start_hub()


def make_stack(tmp_path: Path, tunnelbot_bin: str, cluster: SlurmCluster, gateway: Optional[Gateway]) -> Iterator[SlurmStack]:
    chp_token = secrets.token_hex(32)
    env = hub_env(chp_token, SLURM_CONF=str(cluster.conf))
    procs: List[Proc] = []
    broker: Optional[Broker] = None
    ports: Dict[str, int] = {}

    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    config = hub_dir / "jupyterhub_config.py"
    username = JOB_USER if gateway is None else "alice"  # over ssh the hub user needs no Unix account
    password = secrets.token_hex(12)

    try:
        chp = start_chp(tmp_path, env, procs, ports, HUB_ADDR)
        chp_api = f"http://127.0.0.1:{ports['api']}"
        # Jobs dial the broker across the veth: its SSH listener is on the hub side's address.
        broker = start_broker(tunnelbot_bin, tmp_path / "broker", chp=chp_api,
                              extra_env={"CONFIGPROXY_AUTH_TOKEN": chp_token}, ssh_host=HUB_ADDR)
        heading = "Slurm over ssh (a gateway account)" if gateway is not None else "Slurm"
        overrides = (
            # Only this machine's addresses, paths and sizes differ from the README's config.
            hub_config(ports, chp_api, hub_dir, username, password, HUB_ADDR)
            + f"c.JupyterHub.hub_connect_ip = '{HUB_ADDR}'\n"
            f"c.TunnelbotSpawnerMixin.broker_url = '{broker.admin_url}'\n"
            f"c.TunnelbotSpawnerMixin.broker_token_file = '{broker.token_file}'\n"
            f"c.TunnelbotSpawnerMixin.ssh_host = '{HUB_ADDR}'\n"
            "c.SlurmSpawner.req_memory = '200M'\n"  # the test node has 1000M
            "c.SlurmSpawner.startup_poll_interval = 0.2\n"
            "c.Spawner.start_timeout = 90\n"
            "c.Spawner.poll_interval = 2\n"
        )
        if gateway is not None:
            overrides += (
                f"c.TunnelbotSlurmSpawner.exec_prefix = {gateway.exec_prefix!r}\n"
                f"c.TunnelbotSlurmSpawner.job_path = '{BIN_DIR}:/usr/local/bin:/usr/bin:/bin'\n"
            )
        config.write_text(readme_config(heading) + "\n# --- this test's machine\n" + overrides)

        runner = HubRunner(config, tmp_path, env, procs, ports)
        hub = runner.start_until_ready()
        stack = Stack(chp=chp, chp_port=ports["public"], chp_api=chp_api, chp_token=chp_token, broker=broker, hub=hub,
                      hub_url=f"http://127.0.0.1:{ports['public']}", username=username, password=password)
        yield SlurmStack(stack=stack, config=config, hub_dir=hub_dir, hub_port=ports["hub"],
                         start_hub=runner.start_until_ready)
    finally:
        stop_hubs(procs)
        for job in cluster.squeue():
            job_id, state = job.split()[:2]
            if state in ("PENDING", "RUNNING", "CONFIGURING"):
                cluster.slurm("scancel", job_id, check=False)
        stop_rest(procs, broker)


def notebook_token(cluster: SlurmCluster) -> str:
    """The running notebook's JUPYTERHUB_API_TOKEN, read from its process on the node."""
    for pid in cluster.netns_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"jupyterhub-singleuser" in cmdline:
            for entry in environ:
                if entry.startswith(b"JUPYTERHUB_API_TOKEN="):
                    return entry.split(b"=", 1)[1].decode()
    raise AssertionError("no jupyterhub-singleuser with an API token in the node's namespace")


def attack_batchspawner_api(s: SlurmStack, cluster: SlurmCluster, listener: Listener) -> Path:
    """The notebook's own token posts what would hijack the hub; every attempt is refused."""
    import requests

    token = notebook_token(cluster)
    marker = s.hub_dir / "exec-prefix-ran"
    url = f"{s.stack.hub_url}/hub/api/batchspawner"
    headers = {"Authorization": f"token {token}"}
    for body in (
        {"broker_url": f"http://127.0.0.1:{listener.port}"},
        {"exec_prefix": f"touch {marker};"},
        {"port": 1, "broker_url": f"http://127.0.0.1:{listener.port}"},
        {"batch_query_cmd": f"touch {marker}"},
        {"job_id": f"1; touch {marker}"},
    ):
        r = requests.post(url, headers=headers, data=json.dumps(body), timeout=10)
        assert r.status_code == 400, (body, r.status_code, r.text)
    r = requests.post(url, headers=headers, data=json.dumps({"port": 4242}), timeout=10)
    assert r.status_code == 200 and "ignored" in r.text, r.text
    return marker


@pytest.mark.parametrize("topology", ["local", "gateway"])
def test_slurm_job_through_tunnelbot(topology: str, cluster: SlurmCluster, tunnelbot_bin: str, tmp_path: Path) -> None:
    gateway = start_gateway(cluster) if topology == "gateway" else None
    stacks = make_stack(tmp_path, tunnelbot_bin, cluster, gateway)
    try:
        s = next(stacks)
        stack = s.stack
        user = stack.username
        browser = BrowserLike(stack)
        browser.login()

        detail = lambda: stack.logs() + "\n" + cluster.logs()  # noqa: E731
        if gateway is None:
            # user_options through the REST API skip the form, not the checks: this config
            # offers no wall-time choice, so none reaches a batch script, and nothing is issued.
            r = browser.hub_api("POST", f"/users/{user}/server", json={"runtime": "99:00:00", "options": "--uid=0"})
            assert r.status_code == 400 and "unknown spawn options: options" in r.text, r.text
            assert stack.tunnels() == [] and cluster.squeue() == []
            wait_for(lambda: browser.server() is None, 30, "the refused server to be cleared", detail=detail)

        # Empty options, not none: JupyterHub would reuse the refused options of the last request.
        r = browser.hub_api("POST", f"/users/{user}/server", json={"user_options": {}})
        assert r.status_code in (201, 202), r.text
        wait_for(lambda: (browser.server() or {}).get("ready"), 120, "the server to be ready", 0.2, detail=detail)
        job_user = JOB_USER if gateway is None else "tbgateway"
        (job,) = cluster.running_jobs()
        assert job.endswith(f" {job_user}"), job
        job_id = job.split()[0]
        # As a browser: an authenticated page sends it through the hub's OAuth, which ends with
        # the server's own cookie (the file need not exist).
        page = browser.session.get(f"{stack.hub_url}/user/{user}/files/none.txt", timeout=30)
        assert any("/hub/api/oauth2/authorize" in h.url for h in page.history), page.history
        assert browser.status() == 200

        (tunnel,) = [t for t in stack.tunnels() if t["state"] == "active"]
        assert tunnel["connected"] and tunnel["peer"].startswith("10.201.0.2:"), tunnel
        route = stack.routes()[f"/user/{user}"]
        assert route["target"] == f"http://127.0.0.1:{tunnel['port']}"
        # The README's 8 h wall time is the job's limit, and the tunnel's lifetime with the margin.
        assert "TimeLimit=08:00:00" in cluster.slurm("scontrol", "-o", "show", "job", job_id).stdout
        # Renewals (while start() waited, and from every poll) keep it that far from the last one.
        renewed = datetime.fromisoformat((tunnel["renewed_at"] or tunnel["created_at"]).replace("Z", "+00:00"))
        expires = datetime.fromisoformat(tunnel["expires_at"].replace("Z", "+00:00"))
        assert (expires - renewed).total_seconds() == pytest.approx(8 * 3600 + 900, abs=5)
        assert tunnel["lease_seconds"] == 600

        # The credential was in no argv, no environment and no hub log line.
        hub_log = stack.hub.text()
        assert "BEGIN OPENSSH PRIVATE KEY" not in hub_log and "tunnelbot-credential" not in hub_log
        for pid in cluster.netns_pids():
            try:
                blob = Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert b"PRIVATE KEY" not in blob and b"TUNNELBOT_KEY" not in blob, pid

        listener = Listener()
        marker = attack_batchspawner_api(s, cluster, listener) if gateway is None else None

        # A hub restart (cleanup_servers = False): the job and its tunnel live on. The new hub
        # polls every server at start and then every 2 s (poll_interval).
        s.restart_hub()
        wait_for(lambda: browser.status() == 200, 60, "the server to answer after the hub restart", 0.5, detail=detail)
        assert cluster.running_jobs() == [job]
        listener.close()
        assert listener.received == [], "the hub sent something to the notebook's listener"
        assert marker is None or not marker.exists()
        assert stack.broker.token not in stack.hub.text()

        r = browser.hub_api("DELETE", f"/users/{user}/server")
        assert r.status_code in (202, 204), r.text
        wait_for(lambda: browser.server() is None, 60, "the server to stop", 0.2, detail=detail)
        wait_for(lambda: f"/user/{user}" not in stack.routes(), 15, "the CHP route to go", detail=detail)
        final = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
        assert final["state"] == "revoked" and not final["connected"]
        wait_for(lambda: not cluster.running_jobs(), 30, "scancel to end the job", 0.2, detail=detail)
        assert "Cancelling job " + job_id in stack.hub.text() or "scancel" in stack.hub.text()
        wait_for(lambda: not cluster.netns_pids(), 30, "nothing left in the node's namespace", 0.2,
                 detail=lambda: str(cluster.netns_pids()))
        assert browser.status() != 200
    finally:
        stacks.close()
        if gateway is not None:
            gateway.stop()


def test_a_failed_start_names_the_wrappers_reason(cluster: SlurmCluster, tunnelbot_bin: str, tmp_path: Path) -> None:
    """A job whose wrapper is missing on the node: the user reads 127 and the wrapper's name."""
    import requests

    stacks = make_stack(tmp_path, tunnelbot_bin, cluster, None)
    try:
        s = next(stacks)
        with open(s.config, "a") as f:
            f.write("c.TunnelbotSpawnerMixin.job_wrapper = ['/nonexistent/tunnelbot-job']\n")
        s.restart_hub()
        browser = BrowserLike(s.stack)
        browser.login()
        user = s.stack.username
        r = browser.hub_api("POST", f"/users/{user}/server")
        assert r.status_code in (201, 202, 500), r.text

        def failed() -> Optional[str]:
            progress = requests.get(f"{s.stack.hub_url}/hub/api/users/{user}/server/progress",
                                    cookies=browser.session.cookies, timeout=30)
            return progress.text if "failed" in progress.text.lower() else None

        text = wait_for(failed, 90, "the spawn to fail", 0.5, detail=s.stack.logs)
        assert "status 127" in text and "tunnelbot-job" in text, text
        assert "No job identification provided" not in s.stack.hub.text()
        assert not cluster.running_jobs()
        (tunnel,) = s.stack.tunnels()
        assert tunnel["state"] == "revoked"
    finally:
        stacks.close()
