"""Managed-service mode end to end: a real JupyterHub starts the broker as a service (the
README's `c.JupyterHub.services` entry), spawns through CHP and a tunnel, and a hub restart
(which restarts the service) leaves the notebook reachable once its wrapper reconnects.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List

import pytest

from conftest import descendants, free_port, pid_alive, stop_process, wait_for
from hub import BrowserLike, HubDir, HubRunner, Proc, hub_config, hub_env, requirements, start_chp  # noqa: F401

pytestmark = pytest.mark.e2e


def _service_block() -> str:
    """The README's managed-service entry (Renewals, leases and scoped tokens section)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("**Managed-service mode.**", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "c.JupyterHub.services" in block and "cleanup_servers = False" in block
    return block


@pytest.fixture
def managed(requirements: None, tunnelbot_bin: str, tmp_path: Path) -> Iterator[Dict[str, Any]]:
    chp_token = secrets.token_hex(32)
    env = hub_env(chp_token, RUST_LOG="info")
    procs: List[Proc] = []
    ports: Dict[str, int] = {}
    start_chp(tmp_path, env, procs, ports)
    ports.update(ssh=free_port(), admin=free_port())
    chp_api = f"http://127.0.0.1:{ports['api']}"
    bdir = tmp_path / "broker"
    bdir.mkdir()
    broker_config = bdir / "tunnelbot.toml"
    # No hub API settings: the broker takes JUPYTERHUB_API_URL/TOKEN from the service's environment.
    broker_config.write_text(
        f'keys_dir = "{bdir / "keys"}"\nstate_dir = "{bdir / "state"}"\n'
        f'[ssh]\nlisten = "127.0.0.1:{ports["ssh"]}"\n'
        '[tunnels]\nbind_address = "127.0.0.1"\n'
        f'[admin]\nlisten = "127.0.0.1:{ports["admin"]}"\n'
        f'[chp]\nenabled = true\napi_url = "{chp_api}"\nreconcile_interval = "1s"\n'
        "[limits]\nmax_sessions = 1000\n"
    )
    hubdir = HubDir(tmp_path)
    username, password, hub_dir = hubdir.username, hubdir.password, hubdir.path
    block = _service_block().replace(
        '["tunnelbot", "serve", "--config", "/etc/tunnelbot/tunnelbot.toml"]',
        f'["{tunnelbot_bin}", "serve", "--config", "{broker_config}", "--ready-file", "{bdir / "ready.json"}"]',
    )
    assert str(broker_config) in block, "the README's service command changed"
    config = hub_dir / "jupyterhub_config.py"
    config.write_text(
        "import os\n"
        + block
        + "\n# --- this test's machine\n"
        + hub_config(ports, chp_api, hub_dir, username, password)
        + "c.JupyterHub.spawner_class = 'tunnelbot_jupyterhub.TunnelbotLocalProcessSpawner'\n"
        f"c.TunnelbotSpawnerMixin.broker_url = 'http://127.0.0.1:{ports['admin']}'\n"
        f"c.TunnelbotSpawnerMixin.broker_token_file = '{bdir / 'keys' / 'admin.token'}'\n"
        "c.TunnelbotSpawnerMixin.ssh_host = '127.0.0.1'\n"
        "c.TunnelbotSpawnerMixin.max_backoff = 1\n"
        "c.TunnelbotSpawnerMixin.lease_seconds = 30\n"
        "c.Spawner.poll_interval = 2\n"
        + hubdir.job_lines()
    )
    runner = HubRunner(config, tmp_path, env, procs, ports)

    state: Dict[str, Any] = {}
    try:
        state["hub"] = runner.start_until_ready()
        state.update(
            start_hub=runner.start_until_ready,
            stack=SimpleNamespace(hub_url=f"http://127.0.0.1:{ports['public']}", username=username, password=password),
            admin_url=f"http://127.0.0.1:{ports['admin']}", token_file=bdir / "keys" / "admin.token",
            chp_api=chp_api, chp_token=chp_token, procs=procs,
        )
        yield state
    finally:
        # Leave nothing running: the last hub stops its servers only when asked, so stop the
        # server's processes by PID after the hub (and with it the broker service) is gone.
        jobs: List[int] = []
        for p in reversed(procs):
            if "hub" in p.log.name:
                jobs += [pid for pid, name in descendants(p.proc.pid).items() if not name.startswith("tunnelbot")]
                stop_process(p.proc, timeout=30)
        for pid in state.get("job_pids", []) + jobs:
            if pid_alive(pid):
                try:
                    os.kill(pid, 15)
                except OSError:
                    pass
        for p in procs:
            stop_process(p.proc)


def test_managed_service_broker_survives_a_hub_restart(managed: Dict[str, Any]) -> None:
    import requests

    stack = managed["stack"]
    user = stack.username

    def logs() -> str:
        return "\n".join(f"--- {p.log.name}\n{p.text()[-5000:]}" for p in managed["procs"])

    def tunnels() -> List[Dict[str, Any]]:
        token = Path(managed["token_file"]).read_text().strip()
        r = requests.get(managed["admin_url"] + "/api/v1/tunnels", headers={"Authorization": f"Bearer {token}"},
                         timeout=5)
        r.raise_for_status()
        return list(r.json()["tunnels"])

    hub: Proc = managed["hub"]
    wait_for(lambda: any(n.startswith("tunnelbot") for n in descendants(hub.proc.pid).values()), 30,
             "the hub to start the broker service", detail=logs)
    browser = BrowserLike(stack)
    browser.login()
    browser.start_server(logs)
    page = browser.session.get(f"{stack.hub_url}/user/{user}/files/hello.txt", timeout=30)
    assert page.status_code == 200 and page.text == "hello from the job"
    assert browser.status() == 200
    (tunnel,) = [t for t in tunnels() if t["state"] == "active"]
    assert tunnel["connected"] and tunnel["lease_seconds"] == 30
    old_broker = [pid for pid, n in descendants(hub.proc.pid).items() if n.startswith("tunnelbot")]
    jobs = [pid for pid, n in descendants(hub.proc.pid).items() if not n.startswith("tunnelbot") and n != "ssh"]
    managed["job_pids"] = jobs

    # The hub stops (cleanup_servers = False: the job lives on) and stops its broker service.
    stop_process(hub.proc, timeout=30)
    wait_for(lambda: not any(pid_alive(p) for p in old_broker), 15, "the broker service to stop", detail=logs)
    assert any(pid_alive(p) for p in jobs), "the hub's restart stopped the job"
    new_hub = managed["start_hub"]()
    wait_for(lambda: any(n.startswith("tunnelbot") for n in descendants(new_hub.proc.pid).values()), 30,
             "the restarted hub to start the broker again", detail=logs)
    # The wrapper reconnects (max_backoff = 1 s) on the same hub port, and the hub finds its server.
    wait_for(lambda: browser.status() == 200, 60, "the notebook to answer again after the hub restart", 0.5,
             detail=logs)
    again = next(t for t in tunnels() if t["id"] == tunnel["id"])
    assert again["state"] == "active" and again["connected"] and again["port"] == tunnel["port"]
    # The restarted hub's polls renew the lease.
    wait_for(lambda: next(t for t in tunnels() if t["id"] == tunnel["id"])["renewed_at"] != again["renewed_at"], 30,
             "a renewal from the restarted hub's poll", 0.5, detail=logs)

    r = browser.hub_api("DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: browser.server() is None, 60, "the server to stop", detail=logs)
    final = next(t for t in tunnels() if t["id"] == tunnel["id"])
    assert final["state"] == "revoked"
    wait_for(lambda: not any(pid_alive(p) for p in jobs), 30, "the job's processes to exit")
