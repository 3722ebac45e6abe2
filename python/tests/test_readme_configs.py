"""The jupyterhub_config.py examples in README.md load, and the SSH launcher one really works."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict

import pytest
from traitlets.config import Config
from traitlets.utils.importstring import import_item

from conftest import Broker, http_get, pid_alive, python_http_server, wait_for
from tunnelbot_jupyterhub import BrokerClient

README = Path(__file__).resolve().parent.parent / "README.md"


def config_block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"### `jupyterhub_config.py` for {heading}", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, heading
    return match.group(1)


def load(heading: str) -> Dict[str, Any]:
    c = Config()
    namespace: Dict[str, Any] = {"get_config": lambda: c, "__name__": "jupyterhub_config"}
    exec(compile(config_block(heading), f"README.md ({heading})", "exec"), namespace)
    namespace["c"] = c
    return namespace


def test_slurm_config_loads() -> None:
    pytest.importorskip("batchspawner")
    c = load("Slurm")["c"]
    spawner_class = import_item(c.JupyterHub.spawner_class)
    assert spawner_class.__name__ == "TunnelbotSlurmSpawner"
    spawner = spawner_class(user=SimpleNamespace(name="alice"), config=c)
    assert spawner.ssh_host == "hub.cluster.internal"
    assert spawner.walltime_seconds() == 8 * 3600
    assert spawner.batchspawner_singleuser_cmd == ""


def test_ssh_launcher_config_runs_a_job(broker: Broker, tmp_path: Path) -> None:
    namespace = load("an SSH/Singularity-style launcher")
    c = namespace["c"]
    spawner_class = c.JupyterHub.spawner_class
    assert spawner_class.__name__ == "TunnelbotSSHSpawner"

    home = tmp_path / "home"
    home.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello over ssh")
    bin_dir = os.path.dirname(sys.executable)

    class LocalSSH(spawner_class):  # type: ignore[misc, valid-type]
        """The README's class with `ssh host CMD` played by a local `sh -c`, and a test HOME."""

        def user_env(self, env: Dict[str, str]) -> Dict[str, str]:
            env = super().user_env(env)
            env["HOME"] = str(home)
            env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
            env["TMPDIR"] = str(tmp_path)
            return env

    # Overrides for this machine: the local broker and no real ssh or apptainer.
    c.TunnelbotSpawnerMixin.broker_url = broker.admin_url
    c.TunnelbotSpawnerMixin.broker_token_file = str(broker.token_file)
    c.TunnelbotSpawnerMixin.ssh_host = "127.0.0.1"
    c.SSHLauncher.ssh_command = ["/bin/sh", "-c", 'shift; exec "$@"', "fake-ssh"]
    c.Spawner.cmd = python_http_server(site)
    c.Spawner.start_timeout = 60

    me = pwd.getpwuid(os.geteuid()).pw_name  # user_env looks the user up
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:1/hub/api/", base_url="/hub/")
    user = SimpleNamespace(name=me, escaped_name=me, url=f"/user/{me}/")
    spawner = LocalSSH(user=user, hub=hub, config=c)
    try:
        ip, port = asyncio.run(spawner.start())
        assert (ip, port) == ("127.0.0.1", spawner.tunnel_port)
        assert spawner.remote_pid > 0

        def ok() -> bool:
            try:
                return b"hello over ssh" in http_get(port, "/hello.txt")
            except OSError:
                return False

        wait_for(ok, 20, "a GET through the hub port")
        assert asyncio.run(spawner.poll()) is None
        tunnel_id = spawner.tunnel_id
        remote_pid = spawner.remote_pid
        asyncio.run(spawner.stop())
        tunnel = asyncio.run(BrokerClient(broker.admin_url, broker.token).get(tunnel_id))
        assert tunnel is not None and tunnel.state == "revoked"
        wait_for(lambda: not pid_alive(remote_pid), 20, "the remote job to exit")
        assert "forwarding hub port" in (home / ".tunnelbot-job.log").read_text()
    finally:
        if spawner.proc is not None and spawner.proc.poll() is None:
            spawner.proc.kill()
            spawner.proc.wait(10)
        if spawner.remote_pid and pid_alive(spawner.remote_pid):
            os.kill(spawner.remote_pid, 9)
