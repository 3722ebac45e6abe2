"""TunnelbotRemoteSpawner: the host list, the form's validation, and the spawner against
real sshd processes in network namespaces (tests/remote_host.py) and the real broker.

The container runtime is a stand-in script (Singularity/Apptainer cannot be installed on
these machines; see remote_host.FAKE_RUNTIME). The notebook is a Python http.server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, List

import pytest
from traitlets.config import Config

from conftest import INSTALLED_WRAPPER, Broker, pid_alive, python_http_server, start_broker, stop_process, wait_for
from remote_host import RemoteHosts, remote_hosts  # noqa: F401  (fixture)
from tunnelbot_jupyterhub import BrokerClient
from tunnelbot_jupyterhub.remote import TunnelbotRemoteSpawner, UnknownHostKey, parse_hosts, validate_bind

# -- no remote host needed --------------------------------------------------------------


def test_host_list_skips_invalid_entries_with_a_warning() -> None:
    warnings: List[str] = []
    hosts = parse_hosts(
        " gpu1:10.0.0.1, cpu2:, :10.0.0.3 ,bad name:10.0.0.4,evil;id:,x:$(id),gpu1:10.0.0.9,,plain", warnings.append
    )
    assert [(h.name, h.address) for h in hosts] == [
        ("gpu1", "10.0.0.1"),
        ("cpu2", "cpu2"),
        ("10.0.0.3", "10.0.0.3"),
        ("plain", "plain"),
    ]
    assert len(warnings) == 4
    assert all("skipped" in w for w in warnings)
    assert any("'bad name:10.0.0.4'" in w for w in warnings)
    assert any("repeats the name 'gpu1'" in w for w in warnings)


@pytest.mark.parametrize(
    "value",
    [
        "relative/path",
        "/scratch;id",
        "/scratch$(id)",
        "/a b",
        "/data`id`",
        "/data|x",
        "/data&",
        "/data\nid",
        "/data/../etc",
        "/data:/dst:exec",
        "/data:relative",
        "/a:/b:ro:x",
        "/data'x",
        '/data"x',
        "/data,/etc",
        "~/data",
        "/" + "abc/" * 30 + ";",  # long input: refused at once, no exponential backtracking
    ],
)
def test_bind_paths_refuse_anything_but_plain_absolute_paths(value: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        validate_bind(value)


def test_bind_paths_accept_src_dst_options() -> None:
    for value in ("/scratch", "/data/project-1:/data", "/ro_data:/in/here:ro", "/x.y@z+1=2/"):
        assert validate_bind(value) == value


def bare_spawner(**traits: Any) -> TunnelbotRemoteSpawner:
    c = Config()
    for name, value in traits.items():
        setattr(c.TunnelbotRemoteSpawner, name, value)
    return TunnelbotRemoteSpawner(user=SimpleNamespace(name="alice"), config=c)


def test_form_lists_the_valid_hosts_first_selected(caplog: pytest.LogCaptureFixture) -> None:
    spawner = bare_spawner(remote_hosts="a b:1.2.3.4,node1:10.0.0.1,node2:")
    with caplog.at_level(logging.WARNING):
        form = asyncio.run(spawner.get_options_form())
    assert re.findall(r'<option value="([^"]*)"', form) == ["node1", "node2"]
    assert '<option value="node1" selected>' in form
    assert 'name="binds"' in form
    assert "'a b:1.2.3.4'" in caplog.text and "skipped" in caplog.text


def test_form_values_with_shell_metacharacters_are_refused() -> None:
    spawner = bare_spawner(remote_hosts="node1:10.0.0.1,node2:10.0.0.2")
    assert spawner.run_options_from_form({"host": ["node2"], "binds": ["/scratch, /data:/d:ro"]}) == {
        "host": "node2",
        "binds": ["/scratch", "/data:/d:ro"],
    }
    for form in (
        {"host": ["node2;id"]},
        {"host": ["node3"]},
        {"host": ["$(reboot)"]},
        {"binds": ["/scratch;id"]},
        {"binds": ["/scratch,$(id)"]},
        {"binds": ["/ok /`id`"]},
    ):
        with pytest.raises(ValueError):
            spawner.run_options_from_form(form)
    # user_options can come from the REST API without the form: start() checks them again.
    for options in ({"host": "node1 ; id"}, {"binds": ["/a:/b;id"]}, {"binds": "relative"}, {"host": ["a", "b"]}):
        spawner.user_options = options
        with pytest.raises(ValueError):
            asyncio.run(spawner.start())


# -- against real sshd processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def veth_broker(tunnelbot_bin: str, remote_hosts: RemoteHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    address = remote_hosts.hub_address
    broker = start_broker(tunnelbot_bin, tmp_path_factory.mktemp("broker"), ssh_host=address, public_host=address)
    try:
        yield broker
    finally:
        stop_process(broker.proc)


def spawner_for(
    hosts: RemoteHosts, broker: Broker, known_hosts: Path, wrapper: str = "", **options: Any
) -> TunnelbotRemoteSpawner:
    (hosts.shared / "hello.txt").write_text("hello from the remote host\n")
    (hosts.shared / "hello.txt").chmod(0o644)
    c = Config()
    c.TunnelbotSpawnerMixin.broker_url = broker.admin_url
    c.TunnelbotSpawnerMixin.broker_token_file = str(broker.token_file)
    c.TunnelbotSpawnerMixin.job_wrapper = ["/bin/sh", wrapper or str(INSTALLED_WRAPPER)]
    c.TunnelbotRemoteSpawner.remote_hosts = "not a host:," + hosts.spec()
    c.TunnelbotRemoteSpawner.known_hosts_file = str(known_hosts)
    c.TunnelbotRemoteSpawner.home_root = str(hosts.home_root)
    c.TunnelbotRemoteSpawner.container_runtime = str(hosts.runtime)
    c.TunnelbotRemoteSpawner.container_image = str(hosts.image)
    c.TunnelbotRemoteSpawner.container_binds = [str(hosts.shared)]
    c.TunnelbotRemoteSpawner.remote_command_timeout = 20.0
    c.Spawner.cmd = python_http_server(hosts.shared)
    c.Spawner.start_timeout = 60
    c.Spawner.environment = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    hub = SimpleNamespace(public_host="", api_url=f"http://{hosts.hub_address}:1/hub/api/", base_url="/hub/")
    user = SimpleNamespace(name=hosts.user, escaped_name=hosts.user, url=f"/user/{hosts.user}/")
    spawner = TunnelbotRemoteSpawner(user=user, hub=hub, config=c)
    spawner.user_options = options
    return spawner


def remote_get(port: int) -> bytes:
    from conftest import http_get

    try:
        return http_get(port, "/hello.txt")
    except OSError:
        return b""


def test_spawn_poll_restart_and_stop(remote_hosts: RemoteHosts, veth_broker: Broker) -> None:
    hosts = remote_hosts
    node1, node2 = hosts.nodes
    spawner = spawner_for(hosts, veth_broker, hosts.known_hosts, host="node2")
    try:
        ip, port = asyncio.run(spawner.start())
        assert (ip, port) == ("127.0.0.1", spawner.tunnel_port)
        assert spawner.remote_host == "node2" and spawner.remote_address == node2.address
        pid = spawner.remote_pid
        wait_for(lambda: b"hello from the remote host" in remote_get(port), 20, "a GET through the tunnel", detail=hosts.logs)
        # The job runs on node2, in its own session and process group, and nothing on node1.
        assert pid in node2.job_pids() and not node1.job_pids()
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        # The credential reached the job on stdin: no argv, environment or log shows it.
        for p in node2.job_pids():
            for what in ("cmdline", "environ"):
                try:
                    text = Path(f"/proc/{p}/{what}").read_bytes()
                except OSError:
                    continue
                assert b"PRIVATE KEY" not in text and b"tunnelbot-credential" not in text, (p, what)
        log = hosts.home / ".tunnelbot" / "jupyterhub.log"
        assert log.stat().st_mode & 0o777 == 0o600 and log.stat().st_uid == hosts.home.stat().st_uid
        text = log.read_text()
        assert f"fake-apptainer: image={hosts.image} binds={hosts.shared} command=/bin/sh" in text
        assert "PRIVATE KEY" not in text
        assert not [f for f in os.listdir("/tmp") if f.startswith("tunnelbot-launch.")]
        # Only sshd listens on the host's address; the notebook is on its loopback.
        assert [a for a in node2.listeners() if not a.startswith("127.0.0.1:")] == [f"{node2.address}:22"]
        assert asyncio.run(spawner.poll()) is None

        # A restarted hub: a new spawner from the saved state finds the same job and stops it.
        state = spawner.get_state()
        assert state["tunnelbot_remote_pid"] == pid and state["tunnelbot_remote_host"] == "node2"
        again = spawner_for(hosts, veth_broker, hosts.known_hosts)
        again.load_state(state)
        assert asyncio.run(again.poll()) is None
        tunnel_id = again.tunnel_id
        asyncio.run(again.stop())
        wait_for(lambda: not node2.job_pids(), 20, "nothing left running on node2", detail=hosts.logs)
        tunnel = asyncio.run(BrokerClient(veth_broker.admin_url, veth_broker.token).get(tunnel_id))
        assert tunnel is not None and tunnel.state == "revoked"
        assert not pid_alive(pid)
    finally:
        for node in hosts.nodes:
            for p in node.job_pids():
                os.kill(p, 9)


def test_a_stale_pid_is_reported_stopped(remote_hosts: RemoteHosts, veth_broker: Broker) -> None:
    hosts = remote_hosts
    node1 = hosts.nodes[0]
    spawner = spawner_for(hosts, veth_broker, hosts.known_hosts)  # no choice: the first host
    try:
        asyncio.run(spawner.start())
        assert spawner.remote_host == "node1"
        pid, tunnel_id = spawner.remote_pid, spawner.tunnel_id
        os.killpg(pid, 9)  # the job dies on its own
        wait_for(lambda: not node1.job_pids(), 20, "the job's processes to exit")
        assert asyncio.run(spawner.poll()) == 0
        assert spawner.remote_pid == 0 and spawner.tunnel_id == ""
        tunnel = asyncio.run(BrokerClient(veth_broker.admin_url, veth_broker.token).get(tunnel_id))
        assert tunnel is not None and tunnel.state == "revoked"
    finally:
        for p in node1.job_pids():
            os.kill(p, 9)


def test_unreachable_host_is_unknown_not_stopped(remote_hosts: RemoteHosts, veth_broker: Broker) -> None:
    spawner = spawner_for(remote_hosts, veth_broker, remote_hosts.known_hosts)
    spawner.remote_port = 2  # nothing listens there: ssh fails
    node1 = remote_hosts.nodes[0]
    spawner.load_state({"tunnelbot_remote_host": "node1", "tunnelbot_remote_address": node1.address, "tunnelbot_remote_pid": 4242})
    assert asyncio.run(spawner.poll()) is None
    assert spawner.remote_pid == 4242


def test_unknown_host_key_names_the_host(remote_hosts: RemoteHosts, veth_broker: Broker, tmp_path: Path) -> None:
    hosts = remote_hosts
    node1, node2 = hosts.nodes
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(node1.host_key_line + "\n")  # node2's key is missing
    spawner = spawner_for(hosts, veth_broker, known_hosts, host="node2")
    with pytest.raises(UnknownHostKey, match=r"host key of node2 \(10\.202\.0\.6\)") as error:
        asyncio.run(spawner.start())
    assert str(known_hosts) in str(error.value)
    assert spawner.tunnel_id == "" and not node2.job_pids()
    # A wrong key for the host is refused the same way.
    known_hosts.write_text(f"{node2.address} {node1.host_key_line.split(None, 1)[1]}\n")
    with pytest.raises(UnknownHostKey, match="node2"):
        asyncio.run(spawner.start())
    assert not node2.job_pids()


def test_a_wrapper_that_cannot_start_leaves_no_credential_behind(remote_hosts: RemoteHosts, veth_broker: Broker) -> None:
    hosts = remote_hosts
    spawner = spawner_for(hosts, veth_broker, hosts.known_hosts, wrapper="/nonexistent/tunnelbot-job", host="node1")
    with pytest.raises(RuntimeError, match="status"):
        asyncio.run(spawner.start())
    # The launch script and the credential it was handed are both gone, and the tunnel revoked.
    assert not [f for f in os.listdir("/tmp") if f.startswith("tunnelbot-launch.")]
    assert not spawner.tunnel_id
