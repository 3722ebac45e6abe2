"""TunnelbotSpawnerMixin with the real broker and wrapper, over a minimal launcher.

The launcher stands in for any spawner that runs ``self.cmd`` somewhere else: it runs
it as a plain child process and knows nothing about tunnels.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from jupyterhub.spawner import Spawner

from conftest import Broker, http_get, pid_alive, python_http_server, ssh_children, wait_for
from tunnelbot_jupyterhub import BrokerClient, TunnelbotSpawnerMixin


class PlainLauncher(Spawner):
    """Runs the job as a local child; state is its pid, like LocalProcessSpawner's."""

    proc: Optional["subprocess.Popen[bytes]"] = None
    pid = 0
    workdir = Path("/tmp")

    def get_env(self) -> Dict[str, str]:
        bin_dir = os.path.dirname(sys.executable)  # where pip put tunnelbot-job
        return {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "TMPDIR": str(self.workdir),
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:0/user/{self.user.name}/",
        }

    async def start(self) -> Tuple[str, int]:
        with open(self.workdir / "job.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd + self.get_args(), env=self.get_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.pid = self.proc.pid
        return ("192.0.2.1", 9)  # a node address the hub must never see

    async def poll(self) -> Optional[int]:
        if self.proc is not None:
            status = self.proc.poll()
        else:
            status = None if self.pid and pid_alive(self.pid) else 0
        if status is not None:
            self.clear_state()
        return status

    async def stop(self, now: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, 20)

    def get_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = super().get_state()
        if self.pid:
            state["pid"] = self.pid
        return state

    def load_state(self, state: Dict[str, Any]) -> None:
        super().load_state(state)
        self.pid = state.get("pid", 0)

    def clear_state(self) -> None:
        super().clear_state()
        self.pid = 0


class TunnelSpawner(TunnelbotSpawnerMixin, PlainLauncher):
    pass


_started: List[TunnelSpawner] = []


@pytest.fixture(autouse=True)
def _stop_leftover_jobs() -> Iterator[None]:
    yield
    while _started:
        proc = _started.pop().proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(20)


def make_spawner(broker: Broker, tmp_path: Path, cmd: List[str], **traits: Any) -> TunnelSpawner:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "hello.txt").write_text("hello through the tunnel")
    settings: Dict[str, Any] = {
        "cmd": cmd or python_http_server(site),
        "broker_url": broker.admin_url,
        "broker_token_file": str(broker.token_file),
        "ssh_host": "127.0.0.1",
        "connect_timeout": 30,
        **traits,
    }
    spawner = TunnelSpawner(user=SimpleNamespace(name="alice"), **settings)
    spawner.workdir = tmp_path
    _started.append(spawner)
    return spawner


def client(broker: Broker) -> BrokerClient:
    return BrokerClient.from_token_file(broker.admin_url, str(broker.token_file))


def job_log(tmp_path: Path) -> str:
    log = tmp_path / "job.log"
    return log.read_text(errors="replace") if log.exists() else ""


def test_start_poll_stop(broker: Broker, tmp_path: Path) -> None:
    spawner = make_spawner(broker, tmp_path, [])
    ip, port = asyncio.run(spawner.start())
    assert ip == "127.0.0.1"
    assert port == spawner.tunnel_port
    tunnel = asyncio.run(client(broker).get(spawner.tunnel_id))
    assert tunnel is not None and tunnel.connected and tunnel.port == port
    assert tunnel.user == "alice" and tunnel.server_name == ""
    assert spawner.cmd == python_http_server(tmp_path / "site"), "the wrapper prefix is not left behind"
    assert "Allocated port %d " % port in job_log(tmp_path)

    def ok() -> bool:
        try:  # the notebook may not listen yet when the tunnel is up
            return b"hello through the tunnel" in http_get(port, "/hello.txt")
        except OSError:
            return False

    wait_for(ok, 20, "a GET through the hub port")
    assert asyncio.run(spawner.poll()) is None
    state = spawner.get_state()
    assert state["tunnelbot_tunnel_id"] == tunnel.id and state["tunnelbot_port"] == port

    assert spawner.proc is not None
    children = ssh_children(spawner.proc.pid)
    assert children
    asyncio.run(spawner.stop())
    after = asyncio.run(client(broker).get(tunnel.id))
    assert after is not None and after.state == "revoked"
    assert spawner.proc.poll() is not None
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the job's ssh to exit")
    assert not list(tmp_path.glob("tunnelbot.*")), "the job's key directory is removed"


def test_a_job_that_dies_first_fails_the_start_with_its_reason(broker: Broker, tmp_path: Path) -> None:
    spawner = make_spawner(broker, tmp_path, ["sh", "-c", "exit 3"])
    with pytest.raises(RuntimeError, match=r"ended before its tunnel came up \(status 3\)"):
        asyncio.run(spawner.start())
    assert spawner.tunnel_id == ""
    (tunnel,) = asyncio.run(client(broker).list())
    assert tunnel.state == "revoked"


def test_a_tunnel_that_never_connects_times_out_and_is_cleaned_up(broker: Broker, tmp_path: Path) -> None:
    # ProxyCommand=false makes every ssh attempt fail at once, as an unreachable hub would.
    spawner = make_spawner(broker, tmp_path, [], ssh_options=["ProxyCommand=false"], connect_timeout=2)
    with pytest.raises(TimeoutError, match="did not connect within 2 s"):
        asyncio.run(spawner.start())
    assert spawner.proc is not None and spawner.proc.poll() is not None, "the job is stopped"
    (tunnel,) = asyncio.run(client(broker).list())
    assert tunnel.state == "revoked"


def test_revoked_tunnel_ends_the_server_and_its_job(broker: Broker, tmp_path: Path) -> None:
    spawner = make_spawner(broker, tmp_path, [])
    asyncio.run(spawner.start())
    tunnel_id = spawner.tunnel_id
    assert asyncio.run(client(broker).revoke(tunnel_id))
    # 1: the broker said revoked first; 77: the wrapper had already exited on the refusal.
    assert asyncio.run(spawner.poll()) in (1, 77)
    assert spawner.tunnel_id == "" and spawner.get_state() == {}
    assert spawner.proc is not None and spawner.proc.poll() is not None


def test_a_restarted_hub_polls_the_same_tunnel(broker: Broker, tmp_path: Path) -> None:
    first = make_spawner(broker, tmp_path, [])
    asyncio.run(first.start())
    state = first.get_state()
    # A new spawner object, as after a hub restart: only the saved state links it to the job.
    second = make_spawner(broker, tmp_path, [])
    second.load_state(state)
    assert asyncio.run(second.poll()) is None
    assert first.proc is not None
    first.proc.terminate()
    first.proc.wait(20)
    # The job is gone (the launcher sees its pid dead): the tunnel is released too.
    assert asyncio.run(second.poll()) == 0
    after = asyncio.run(client(broker).get(state["tunnelbot_tunnel_id"]))
    assert after is not None and after.state == "revoked"
    assert second.get_state() == {}


def test_broker_outage_does_not_kill_servers(broker: Broker, tmp_path: Path) -> None:
    spawner = make_spawner(broker, tmp_path, [])
    asyncio.run(spawner.start())
    # The same server as seen by a hub whose broker cannot be reached (broker_url is config-only).
    unreachable = make_spawner(broker, tmp_path, [], broker_url="http://127.0.0.1:1")  # nothing listens there
    unreachable.load_state(spawner.get_state())
    unreachable.proc = spawner.proc
    assert asyncio.run(unreachable.poll()) is None
    asyncio.run(spawner.stop())
