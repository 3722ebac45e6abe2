"""End to end: a real JupyterHub 6.1.1, CHP and broker; a browser-like client on CHP's port.

Needs CHP_BIN (configurable-http-proxy) and TUNNELBOT_BIN; JupyterHub and
jupyterhub-singleuser must be installed next to this Python. Select with ``-m e2e``.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from conftest import Broker, descendants, pid_alive, start_broker, wait_for
from hub import (  # noqa: F401  (requirements: a fixture)
    BrowserLike,
    HubDir,
    HubRunner,
    Proc,
    Stack,
    broker_lines,
    hub_config,
    hub_env,
    requirements,
    start_chp,
    stop_hubs,
    stop_rest,
)

pytestmark = pytest.mark.e2e

@pytest.fixture
def stack(requirements: None, tunnelbot_bin: str, tmp_path: Path) -> Iterator[Stack]:
    chp_token = secrets.token_hex(32)
    env = hub_env(chp_token)
    procs: List[Proc] = []
    broker: Optional[Broker] = None
    ports: Dict[str, int] = {}

    try:
        chp = start_chp(tmp_path, env, procs, ports)
        chp_api = f"http://127.0.0.1:{ports['api']}"
        broker = start_broker(tunnelbot_bin, tmp_path / "broker", chp=chp_api, extra_env={"CONFIGPROXY_AUTH_TOKEN": chp_token})

        hubdir = HubDir(tmp_path)
        username, password, hub_dir, config = hubdir.username, hubdir.password, hubdir.path, hubdir.config

        def write_config() -> None:
            assert broker is not None
            config.write_text(
                "c = get_config()  # noqa\n"
                + hub_config(ports, chp_api, hub_dir, username, password)
                + broker_lines(broker)
                + hubdir.job_lines()
            )

        hub = HubRunner(config, tmp_path, env, procs, ports, write_config).start_until_ready()
        yield Stack(
            chp=chp,
            chp_port=ports["public"],
            chp_api=chp_api,
            chp_token=chp_token,
            broker=broker,
            hub=hub,
            hub_url=f"http://127.0.0.1:{ports['public']}",
            username=username,
            password=password,
        )
    finally:
        stop_hubs(procs)
        stop_rest(procs, broker)


def test_jupyterhub_server_through_tunnelbot(stack: Stack) -> None:
    user = stack.username
    browser = BrowserLike(stack)
    browser.login()

    browser.start_server(stack.logs)

    # Open a file on the server as a browser would: the hub's OAuth redirects end with the
    # server's own cookie.
    page = browser.session.get(f"{stack.hub_url}/user/{user}/files/hello.txt", timeout=30)
    assert page.status_code == 200 and page.text == "hello from the job", (page.status_code, page.url)
    assert any("/hub/api/oauth2/authorize" in h.url for h in page.history), page.history
    assert browser.status() == 200
    assert "last_activity" in browser.session.get(f"{stack.hub_url}/user/{user}/api/status", timeout=10).json()

    (tunnel,) = [t for t in stack.tunnels() if t["state"] == "active"]
    assert tunnel["user"] == user and tunnel["server_name"] == "" and tunnel["connected"]
    target = f"http://127.0.0.1:{tunnel['port']}"

    def route_target() -> Optional[str]:
        route = stack.routes().get(f"/user/{user}")
        return route.get("target") if route else None

    assert route_target() == target
    route = stack.routes()[f"/user/{user}"]
    assert route.get("jupyterhub") is True and route.get("user") == user and route.get("server_name") == ""
    wait_for(lambda: next(t for t in stack.tunnels() if t["id"] == tunnel["id"])["route"] == "registered", 15,
             "the broker to report its CHP route registered", detail=stack.logs)

    # The job's ssh dies: the wrapper reconnects on the same hub port and the URL works again.
    hub_pid = stack.hub.proc.pid
    (old_ssh,) = [pid for pid, name in descendants(hub_pid).items() if name == "ssh"]
    os.kill(old_ssh, signal.SIGKILL)

    def reconnected() -> bool:
        ssh = [pid for pid, name in descendants(hub_pid).items() if name == "ssh"]
        return bool(ssh) and old_ssh not in ssh and browser.status() == 200

    wait_for(reconnected, 60, "the job to reconnect and the server to answer again", 0.2, detail=stack.logs)
    again = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
    assert again["connected"] and again["port"] == tunnel["port"] and again["state"] == "active"
    wait_for(lambda: route_target() == target, 15, "the route to point at the same hub port", detail=stack.logs)

    # Stop the server: the route goes and the tunnel is revoked.
    jobs = list(descendants(hub_pid))
    r = browser.hub_api("DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: browser.server() is None, 60, "the server to stop", detail=stack.logs)
    wait_for(lambda: route_target() is None, 15, "the CHP route to go", detail=stack.logs)
    final = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
    assert final["state"] == "revoked" and not final["connected"]
    wait_for(lambda: not any(pid_alive(p) for p in jobs), 30, "the job's processes to exit")
    assert browser.status() != 200
