"""After a broker failover JupyterHub follows the new route target (README, "A standby broker").

The route target is ``http://<tunnel_host>:<port>`` with the ACTIVE broker's host. The spawner's
``poll()`` renews the tunnel, sees the new broker's ``tunnel_host`` and moves the hub's server
record there, so the hub's ``check_routes`` stops writing the old broker's address back.

The end-to-end test runs a real JupyterHub 6.1.1, CHP, ``TunnelbotLocalProcessSpawner`` and the
real broker binary. The failover is a stand-in for the Redis pair (``tests/failover.rs`` drives
that one): the active broker is SIGKILLed and a second broker process starts on the SAME state
dir and keys, with its hub ports and route host on a second loopback address (127.0.0.2) and
its SSH there too; the job's wrapper, told about it as a standby broker, reconnects to it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import Broker, start_broker, stop_process, wait_for
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
from tunnelbot_jupyterhub import Tunnel
from tunnelbot_jupyterhub.address import follow_server_address, server_address

NEW_HOST = "127.0.0.2"  # Linux answers on all of 127/8 on lo, no setup needed


def _tunnel(**fields: Any) -> Tunnel:
    base: Dict[str, Any] = dict(
        id="tb_x", user="alice", server_name="", port=20001, state="active", ssh_user="tunnelbot",
        ssh_host="hub", ssh_port=2222, known_hosts="x", tunnel_host="127.0.0.1",
    )
    base.update(fields)
    return Tunnel(**base)


@pytest.mark.parametrize(
    "host, port, expected",
    [
        ("127.0.0.2", 20001, ("127.0.0.2", 20001)),
        (None, 20001, ("127.0.0.1", 20001)),  # a broker older than the field
        ("Hub-B.example.org", 20001, ("Hub-B.example.org", 20001)),  # kept as the route names it
        ("[::1]", 20001, ("::1", 20001)),  # JupyterHub's Server holds IPv6 without brackets
        ("hub-b", 0, None),
        ("hub-b", 70000, None),
        ("evil@hub-b", 20001, None),
        ("hub-b/x", 20001, None),
        ("hub-b:1", 20001, None),
        ("hub b", 20001, None),
        ("http://hub-b", 20001, None),
        ("::1", 20001, None),  # unbracketed IPv6: not how the broker writes it
        ("[hub-b]", 20001, None),
        ("hub-b?x", 20001, None),
    ],
)
def test_server_address_accepts_only_one_host_and_port(
    host: Optional[str], port: int, expected: Optional[Tuple[str, int]]
) -> None:
    assert server_address(_tunnel(tunnel_host=host, port=port)) == expected


class _Log:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def warning(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)


def _spawner_on_sqlite(tmp_path: Path) -> Tuple[SimpleNamespace, Path]:
    """A spawner stand-in holding JupyterHub's real Server over a real ORM row in SQLite."""
    from jupyterhub import orm
    from jupyterhub.objects import Server

    db_file = tmp_path / "hub.sqlite"
    session = orm.new_session_factory(f"sqlite:///{db_file}")()
    row = orm.Server(ip="127.0.0.1", port=20001, base_url="/user/alice/")
    session.add(row)
    session.commit()
    spawner = SimpleNamespace(
        server=Server(orm_server=row), log=_Log(), _log_name="alice", orm_spawner=None, tunnel_id="tb_x",
        tunnel_host="127.0.0.1", tunnel_port=20001, _spawn_pending=False,
        db=session,  # as the hub's app holds it: a session nobody holds drops its rows
    )
    return spawner, db_file


def _committed(db_file: Path) -> List[Tuple[str, int]]:
    with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True) as db:
        return [(str(ip), int(port)) for ip, port in db.execute("SELECT ip, port FROM servers")]


def test_follow_moves_and_commits_the_server_once(tmp_path: Path) -> None:
    spawner, db_file = _spawner_on_sqlite(tmp_path)
    moved = _tunnel(tunnel_host=NEW_HOST)
    assert follow_server_address(spawner, "tb_x", moved)
    assert spawner.server.host == f"http://{NEW_HOST}:20001" and spawner.tunnel_host == NEW_HOST
    assert _committed(db_file) == [(NEW_HOST, 20001)]  # another connection sees it: committed
    assert len(spawner.log.lines) == 1 and "127.0.0.1:20001 -> http://127.0.0.2:20001" in spawner.log.lines[0]
    # The same answer again changes nothing and logs nothing.
    assert not follow_server_address(spawner, "tb_x", moved)
    assert len(spawner.log.lines) == 1


@pytest.mark.parametrize(
    "tunnel_id, tunnel, pending",
    [
        ("tb_other", _tunnel(tunnel_host=NEW_HOST), False),  # an answer for another tunnel
        ("tb_other", _tunnel(id="tb_other", tunnel_host=NEW_HOST), False),  # not this server's tunnel
        ("tb_x", _tunnel(tunnel_host=NEW_HOST, state="revoked"), False),  # ended: no route
        ("tb_x", None, False),  # unknown to the broker
        ("tb_x", _tunnel(tunnel_host="evil@host"), False),  # not one host
        ("tb_x", _tunnel(tunnel_host=NEW_HOST), True),  # during a spawn the hub takes start()'s
    ],
)
def test_follow_leaves_the_server_alone(
    tmp_path: Path, tunnel_id: str, tunnel: Optional[Tunnel], pending: bool
) -> None:
    spawner, db_file = _spawner_on_sqlite(tmp_path)
    spawner._spawn_pending = pending
    assert not follow_server_address(spawner, tunnel_id, tunnel)
    assert not follow_server_address(spawner, tunnel_id, tunnel)
    assert len(spawner.log.lines) == (1 if tunnel is not None and "@" in (tunnel.tunnel_host or "") else 0)
    assert spawner.server.host == "http://127.0.0.1:20001"
    assert _committed(db_file) == [("127.0.0.1", 20001)]


# ---- end to end --------------------------------------------------------------------------


def _free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def failover_stack(requirements: None, tunnelbot_bin: str, tmp_path: Path) -> Iterator[Dict[str, Any]]:
    chp_token = secrets.token_hex(32)
    env = hub_env(chp_token)
    procs: List[Proc] = []
    brokers: List[Broker] = []
    ports: Dict[str, int] = {}
    state: Dict[str, Any] = {"brokers": brokers}
    try:
        start_chp(tmp_path, env, procs, ports)
        chp_api = f"http://127.0.0.1:{ports['api']}"
        bdir = tmp_path / "broker"
        brokers.append(start_broker(tunnelbot_bin, bdir, chp=chp_api, extra_env={"CONFIGPROXY_AUTH_TOKEN": chp_token}))
        broker = brokers[0]
        standby_ssh = _free_port_on(NEW_HOST)
        proxy_token = secrets.token_hex(16)
        hubdir = HubDir(tmp_path)
        username, password, hub_dir, config = hubdir.username, hubdir.password, hubdir.path, hubdir.config

        def write_config() -> None:
            config.write_text(
                "c = get_config()  # noqa\n"
                + hub_config(ports, chp_api, hub_dir, username, password)
                + broker_lines(broker)
                + f"c.TunnelbotSpawnerMixin.standby_brokers = ['{NEW_HOST}:{standby_ssh}']\n"
                "c.TunnelbotSpawnerMixin.max_backoff = 1\n"
                # The test triggers check_routes itself (POST /hub/api/proxy) with this token.
                f"c.JupyterHub.services = [{{'name': 'failover-check', 'api_token': '{proxy_token}'}}]\n"
                "c.JupyterHub.load_roles = [{'name': 'failover-check', 'scopes': ['proxy'], "
                "'services': ['failover-check']}]\n"
                "c.Spawner.poll_interval = 1\n"
                + hubdir.job_lines()
            )

        hub = HubRunner(config, tmp_path, env, procs, ports, write_config).start_until_ready()
        state.update(
            stack=Stack(
                chp=procs[0], chp_port=ports["public"], chp_api=chp_api, chp_token=chp_token, broker=broker,
                hub=hub, hub_url=f"http://127.0.0.1:{ports['public']}", username=username, password=password,
            ),
            hub_db=hub_dir / "jupyterhub.sqlite",
            hub_api=f"http://127.0.0.1:{ports['hub']}/hub/api",
            proxy_token=proxy_token,
            standby_ssh=standby_ssh,
            start_standby=lambda: start_broker(
                tunnelbot_bin, bdir, chp=chp_api, extra_env={"CONFIGPROXY_AUTH_TOKEN": chp_token},
                ssh_host=NEW_HOST, ssh_port=standby_ssh, admin_port=int(broker.admin_url.rsplit(":", 1)[1]),
                bind_address=NEW_HOST, sections={"tunnels": f'public_host = "{NEW_HOST}"'},
            ),
        )
        yield state
    finally:
        stop_hubs(procs)
        for b in brokers:
            stop_process(b.proc)
        stop_rest(procs, None)


def _hub_server_row(db_file: Path, user: str) -> Tuple[str, int, Dict[str, Any]]:
    """The hub's committed (ip, port) of the user's default server, and its saved spawner state."""
    with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT servers.ip, servers.port, spawners.state FROM spawners "
            "JOIN servers ON spawners.server_id = servers.id JOIN users ON spawners.user_id = users.id "
            "WHERE users.name = ? AND spawners.name = ''",
            (user,),
        ).fetchone()
    assert row is not None, "the hub has no server row for the user"
    saved = row[2]
    return str(row[0]), int(row[1]), json.loads(saved) if isinstance(saved, (str, bytes)) else {}


@pytest.mark.e2e
def test_hub_follows_the_new_broker_after_a_failover(failover_stack: Dict[str, Any]) -> None:
    import requests

    stack: Stack = failover_stack["stack"]
    user = stack.username
    route_path = f"/user/{user}"

    def logs() -> str:
        return stack.logs()

    def route_target() -> Optional[str]:
        route = stack.routes().get(route_path)
        return route.get("target") if route else None

    def hub_updates() -> int:
        # JupyterHub 6.1.1 proxy.py check_routes logs this each time it rewrites a user's route.
        return stack.hub.text().count(f"Updating route for {route_path}")

    def check_routes() -> None:
        r = requests.post(failover_stack["hub_api"] + "/proxy",
                          headers={"Authorization": f"token {failover_stack['proxy_token']}"}, timeout=30)
        assert r.status_code == 200, r.text

    browser = BrowserLike(stack)
    browser.login()
    browser.start_server(logs)
    (tunnel,) = [t for t in stack.tunnels() if t["state"] == "active"]
    port = tunnel["port"]
    old_target, new_target = f"http://127.0.0.1:{port}", f"http://{NEW_HOST}:{port}"
    assert tunnel["tunnel_host"] == "127.0.0.1" and route_target() == old_target
    assert _hub_server_row(failover_stack["hub_db"], user)[:2] == ("127.0.0.1", port)

    # The active broker dies; the standby takes over the same state on 127.0.0.2.
    old = stack.broker
    os.kill(old.proc.pid, signal.SIGKILL)
    old.proc.wait(10)
    new = failover_stack["start_standby"]()
    failover_stack["brokers"].append(new)
    stack.broker = new
    assert new.admin_url == old.admin_url  # the hub's broker_url reaches the new active broker

    def back_on_new() -> bool:
        t = next((t for t in stack.tunnels() if t["id"] == tunnel["id"]), None)
        return bool(t and t["connected"] and t["state"] == "active" and t["tunnel_host"] == NEW_HOST)

    wait_for(back_on_new, 60, "the job's wrapper to reconnect to the new broker", 0.2, detail=logs)
    again = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
    assert again["port"] == port and again["peer"]

    # The hub's poll (every second) renews the tunnel, learns the new host and commits it.
    wait_for(lambda: _hub_server_row(failover_stack["hub_db"], user)[:2] == (NEW_HOST, port), 30,
             "the hub's server record to name the new broker's host", 0.2, detail=logs)
    saved = _hub_server_row(failover_stack["hub_db"], user)[2]
    assert saved.get("tunnelbot_host") == NEW_HOST and saved.get("tunnelbot_tunnel_id") == tunnel["id"]
    assert stack.hub.text().count(f"server {old_target} -> {new_target}") == 1, logs()

    # A check_routes pass now agrees with the new broker; two more leave the route alone.
    check_routes()
    assert route_target() == new_target
    settled = hub_updates()
    for _ in range(2):
        check_routes()
        assert route_target() == new_target
    assert hub_updates() == settled, "the hub's check_routes still rewrites the route:\n" + logs()

    # Through CHP, the notebook answers; the hub's own stop reaches the new broker.
    page = browser.session.get(f"{stack.hub_url}/user/{user}/files/hello.txt", timeout=30)
    assert page.status_code == 200 and page.text == "hello from the job", (page.status_code, page.url)
    assert browser.status() == 200
    r = browser.hub_api("DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: browser.server() is None, 60, "the server to stop", detail=logs)
    assert next(t for t in stack.tunnels() if t["id"] == tunnel["id"])["state"] == "revoked"
