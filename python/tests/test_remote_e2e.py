"""End to end: a real JupyterHub with TunnelbotRemoteSpawner, CHP, the broker, and two remote
hosts that are real sshd processes in network namespaces (tests/remote_host.py).

The user logs in, picks the second host in the spawn form and adds a bind path; the hub logs
in to that host over SSH as the user and starts tunnelbot-job in front of the container
runtime (a stand-in script: Singularity/Apptainer cannot be installed on these machines) and
jupyterhub-singleuser. The notebook comes back through the broker; the hub reaches the
host's SSH port only. Select with ``-m e2e``.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from conftest import INSTALLED_WRAPPER, Broker, require, start_broker, wait_for
from hub import BIN_DIR, BrowserLike, HubRunner, Proc, Stack, _requirements, hub_config, hub_env, start_chp, stop_hubs, stop_rest
from remote_host import RemoteHosts, remote_hosts  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


@pytest.fixture
def remote_stack(tunnelbot_bin: str, remote_hosts: RemoteHosts, tmp_path: Path) -> Iterator[Stack]:
    require(_requirements())
    hosts = remote_hosts
    hub_ip = hosts.hub_address  # the jobs call the hub's API across the veth
    chp_token = secrets.token_hex(32)
    env = hub_env(chp_token)
    procs: List[Proc] = []
    broker: Optional[Broker] = None
    ports: Dict[str, int] = {}

    try:
        chp = start_chp(tmp_path, env, procs, ports, hub_ip)
        chp_api = f"http://127.0.0.1:{ports['api']}"
        broker = start_broker(tunnelbot_bin, tmp_path / "broker", chp=chp_api,
                              extra_env={"CONFIGPROXY_AUTH_TOKEN": chp_token}, ssh_host=hub_ip, public_host=hub_ip)
        password = secrets.token_hex(12)
        hub_dir = tmp_path / "hub"
        hub_dir.mkdir()
        config = hub_dir / "jupyterhub_config.py"

        def write_config() -> None:
            assert broker is not None
            config.write_text(
                "c = get_config()  # noqa\n"
                + hub_config(ports, chp_api, hub_dir, hosts.user, password, hub_ip)
                + "c.JupyterHub.spawner_class = 'tunnelbot_jupyterhub.TunnelbotRemoteSpawner'\n"
                f"c.TunnelbotSpawnerMixin.broker_url = '{broker.admin_url}'\n"
                f"c.TunnelbotSpawnerMixin.broker_token_file = '{broker.token_file}'\n"
                # The packaged copy of the wrapper: the namespaces share this filesystem.
                f"c.TunnelbotSpawnerMixin.job_wrapper = ['/bin/sh', '{INSTALLED_WRAPPER}']\n"
                # The first entry is invalid: skipped with a warning.
                f"c.TunnelbotRemoteSpawner.remote_hosts = 'bad;entry:,{hosts.spec()}'\n"
                f"c.TunnelbotRemoteSpawner.known_hosts_file = '{hosts.known_hosts}'\n"
                f"c.TunnelbotRemoteSpawner.home_root = '{hosts.home_root}'\n"
                f"c.TunnelbotRemoteSpawner.container_runtime = '{hosts.runtime}'\n"
                f"c.TunnelbotRemoteSpawner.container_image = '{hosts.image}'\n"
                f"c.TunnelbotRemoteSpawner.container_binds = ['{hosts.shared}']\n"
                f"c.Spawner.cmd = ['{BIN_DIR / 'jupyterhub-singleuser'}']\n"
                "c.Spawner.start_timeout = 60\n"
                "c.Spawner.http_timeout = 60\n"
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
            username=hosts.user,
            password=password,
        )
    finally:
        stop_hubs(procs)
        stop_rest(procs, broker)


def test_pick_a_host_spawn_through_the_tunnel_and_stop(remote_stack: Stack, remote_hosts: RemoteHosts) -> None:
    stack, hosts = remote_stack, remote_hosts
    node1, node2 = hosts.nodes
    user = stack.username
    project = hosts.base / "project"
    project.mkdir()
    hello = hosts.home / "hello.txt"
    hello.write_text("hello from node2's home")
    os.chown(hello, hosts.home.stat().st_uid, hosts.home.stat().st_gid)

    def logs() -> str:
        return f"{stack.logs()}\n{hosts.logs()}"

    browser = BrowserLike(stack)
    browser.login()

    form = browser.session.get(f"{stack.hub_url}/hub/spawn/{user}", timeout=30)
    assert form.status_code == 200, form.text
    assert re.findall(r'<option value="([^"]*)"', form.text) == ["node1", "node2"]
    assert "remote_hosts entry 'bad;entry:'" in stack.hub.text() and "skipped" in stack.hub.text()

    # A form value with shell metacharacters is refused; nothing starts.
    refused = browser.session.post(
        f"{stack.hub_url}/hub/spawn/{user}",
        data={"host": "node2", "binds": f"{project};touch /tmp/pwned", **_xsrf(browser)},
        timeout=30,
    )
    assert "refused" in refused.text, (refused.status_code, refused.text[-2000:])
    assert browser.server() is None and not node1.job_pids() and not node2.job_pids()

    # Pick the second host and add a bind path.
    r = browser.session.post(
        f"{stack.hub_url}/hub/spawn/{user}", data={"host": "node2", "binds": str(project), **_xsrf(browser)}, timeout=30
    )
    assert r.status_code == 200, r.text[-2000:]
    wait_for(lambda: (browser.server() or {}).get("ready"), 90, "the server to be ready", 0.2, detail=logs)
    # Open a file in the notebook's root (the user's remote home) as a browser would: the
    # hub's OAuth redirects end with the server's own cookie.
    page = browser.session.get(f"{stack.hub_url}/user/{user}/files/hello.txt", timeout=30)
    assert page.status_code == 200 and page.text == "hello from node2's home", (page.status_code, page.url)
    assert browser.status() == 200

    # It runs on node2, in the stand-in container with both binds; node1 runs nothing.
    assert node2.job_pids() and not node1.job_pids()
    log = (hosts.home / ".tunnelbot" / "jupyterhub.log").read_text()
    assert f"fake-apptainer: image={hosts.image} binds={hosts.shared},{project} command={BIN_DIR / 'jupyterhub-singleuser'}" in log
    assert "PRIVATE KEY" not in log and "tunnelbot-credential" not in log
    # The hub reaches node2 only on its SSH port: the notebook listens on node2's loopback.
    assert [a for a in node2.listeners() if not a.startswith(("127.0.0.1:", "[::1]:"))] == [f"{node2.address}:22"]
    (tunnel,) = [t for t in stack.tunnels() if t["state"] == "active"]
    assert tunnel["connected"] and tunnel["peer"].startswith(node2.address + ":")
    assert stack.routes()[f"/user/{user}"]["target"] == f"http://127.0.0.1:{tunnel['port']}"

    r = browser.hub_api("DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: browser.server() is None, 60, "the server to stop", detail=logs)
    wait_for(lambda: f"/user/{user}" not in stack.routes(), 15, "the CHP route to go", detail=logs)
    final = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
    assert final["state"] == "revoked" and not final["connected"]
    # Nothing left running in either namespace but its listening sshd.
    wait_for(lambda: not node2.extra_pids() and not node1.extra_pids(), 30, "nothing left in the namespaces", detail=logs)
    assert browser.status() != 200
    assert not Path("/tmp/pwned").exists()


def _xsrf(browser: BrowserLike) -> Dict[str, str]:
    return {"_xsrf": browser.xsrf()["X-XSRFToken"]}
