"""End to end with JupyterHub's traefik proxy: a real redis-server and traefik (started here,
by PID), JupyterHub 6.1.1 with ``TraefikRedisProxy`` (should_start=False) on them, and the
broker writing its routes into the same Redis (``[routes] backend = "traefik-redis"``).

The hub must take the broker's route for its own: ``get_all_routes()`` lists it under the
user, ``check_routes`` neither deletes nor re-adds it, and stopping the server removes it.
Needs REDIS_SERVER_BIN (or redis-server on PATH), TRAEFIK_BIN, TUNNELBOT_BIN, and
``jupyterhub-traefik-proxy`` with ``redis`` in this Python (python/ci.sh installs them).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from conftest import Broker, free_port, require, start_broker, wait_for
from hub import (  # noqa: F401  (requirements: a fixture)
    BrowserLike,
    HubDir,
    HubRunner,
    Proc,
    Stack,
    broker_lines,
    hub_config,
    hub_env,
    launch,
    requirements,
    start_until_ready,
    stop_hubs,
    stop_rest,
)

pytestmark = pytest.mark.e2e


def _missing() -> str:
    for var in ("TRAEFIK_BIN",):
        if not os.environ.get(var):
            return f"{var} is not set (scripts/test.sh exports it; scripts/setup-redis-traefik.sh installs it)"
    if not (os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")):
        return "redis-server not found (scripts/setup-redis-traefik.sh installs it)"
    try:
        import jupyterhub_traefik_proxy  # noqa: F401
        import redis  # noqa: F401
    except ImportError as e:
        return f"jupyterhub-traefik-proxy and redis are not installed in this Python ({e})"
    return ""


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_redis(tmp_path: Path, procs: List[Proc], ports: Dict[str, int]) -> Proc:
    binary = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server") or "redis-server"

    def start(attempt: int) -> Proc:
        ports["redis"] = free_port()
        p = launch(
            [binary, "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(tmp_path)],
            tmp_path / f"redis{attempt}.log", dict(os.environ), tmp_path,
        )
        procs.append(p)
        return p

    return start_until_ready("redis-server", start, lambda p: _connects(ports["redis"]), 30)


def start_traefik(tmp_path: Path, procs: List[Proc], ports: Dict[str, int]) -> Proc:
    """traefik with TraefikRedisProxy's entrypoints (``http`` public, ``auth_api`` for its API),
    its Redis provider on our Redis, and no throttle between provider changes."""

    def start(attempt: int) -> Proc:
        ports.update(public=free_port(), traefik_api=free_port())
        config = tmp_path / "traefik.toml"
        config.write_text(
            f'[entryPoints.http]\naddress = "127.0.0.1:{ports["public"]}"\n'
            f'[entryPoints.auth_api]\naddress = "127.0.0.1:{ports["traefik_api"]}"\n'
            "[api]\n"
            '[log]\nlevel = "INFO"\n'
            '[providers]\nprovidersThrottleDuration = "0s"\n'
            f'[providers.redis]\nendpoints = ["127.0.0.1:{ports["redis"]}"]\nrootKey = "traefik"\n'
        )
        p = launch([os.environ["TRAEFIK_BIN"], f"--configfile={config}"], tmp_path / f"traefik{attempt}.log",
                   dict(os.environ), tmp_path)
        procs.append(p)
        return p

    return start_until_ready(
        "traefik", start, lambda p: _connects(ports["public"]) and _connects(ports["traefik_api"]), 30
    )


class Routes:
    """JupyterHub's own view of the table: TraefikRedisProxy.get_all_routes() on the same Redis."""

    def __init__(self, redis_port: int, traefik_api: int, api_password: str) -> None:
        self.args = dict(
            redis_url=f"redis://127.0.0.1:{redis_port}",
            traefik_api_url=f"http://127.0.0.1:{traefik_api}",
            traefik_api_username="api",
            traefik_api_password=api_password,
            should_start=False,
            # A reader only: the hub already wrote traefik's API config.
            enable_setup_dynamic_config=False,
        )

    def all(self) -> Dict[str, Any]:
        from jupyterhub_traefik_proxy.redis import TraefikRedisProxy

        async def go() -> Dict[str, Any]:
            proxy = TraefikRedisProxy(**self.args)
            try:
                routes: Dict[str, Any] = await proxy.get_all_routes()
                return routes
            finally:
                await proxy.redis.aclose()

        return asyncio.run(go())

    def keys(self, pattern: str) -> Dict[str, str]:
        import redis

        r = redis.Redis.from_url(str(self.args["redis_url"]), decode_responses=True)
        try:
            return {k: r.get(k) for k in r.keys(pattern)}
        finally:
            r.close()


@pytest.fixture
def traefik_stack(requirements: None, tunnelbot_bin: str, tmp_path: Path) -> Iterator[tuple[Stack, Routes, str, int]]:
    require(_missing())
    procs: List[Proc] = []
    broker: Optional[Broker] = None
    ports: Dict[str, int] = {}
    api_password = secrets.token_hex(16)
    proxy_token = secrets.token_hex(32)
    env = hub_env("unused-by-traefik")
    try:
        start_redis(tmp_path, procs, ports)
        traefik = start_traefik(tmp_path, procs, ports)
        broker = start_broker(
            tunnelbot_bin,
            tmp_path / "broker",
            routes=(
                '[routes]\nbackend = "traefik-redis"\nreconcile_interval = "1s"\n'
                f'[traefik_redis]\nurl = "redis://127.0.0.1:{ports["redis"]}/"\n'
            ),
        )
        hubdir = HubDir(tmp_path, "hello through traefik")
        username, password, hub_dir, config = hubdir.username, hubdir.password, hubdir.path, hubdir.config

        def write_config() -> None:
            assert broker is not None
            config.write_text(
                "c = get_config()  # noqa\n"
                + hub_config(ports, "http://127.0.0.1:1", hub_dir, username, password)
                + "c.JupyterHub.proxy_class = 'traefik_redis'\n"
                "c.TraefikRedisProxy.should_start = False\n"
                f"c.TraefikRedisProxy.redis_url = 'redis://127.0.0.1:{ports['redis']}'\n"
                f"c.TraefikRedisProxy.traefik_api_url = 'http://127.0.0.1:{ports['traefik_api']}'\n"
                "c.TraefikRedisProxy.traefik_api_username = 'api'\n"
                f"c.TraefikRedisProxy.traefik_api_password = '{api_password}'\n"
                # A service with the proxy scope: the test makes the hub run check_routes now.
                f"c.JupyterHub.services = [{{'name': 'checker', 'api_token': '{proxy_token}'}}]\n"
                "c.JupyterHub.load_roles = [{'name': 'checker', 'scopes': ['proxy'], 'services': ['checker']}]\n"
                + broker_lines(broker)
                + hubdir.job_lines()
            )

        ports["hub"] = free_port()
        hub = HubRunner(config, tmp_path, env, procs, ports, write_config).start_until_ready()
        stack = Stack(
            chp=traefik, chp_port=ports["public"], chp_api="", chp_token="", broker=broker, hub=hub,
            hub_url=f"http://127.0.0.1:{ports['public']}", username=username, password=password,
        )
        yield stack, Routes(ports["redis"], ports["traefik_api"], api_password), proxy_token, ports["hub"]
    finally:
        stop_hubs(procs)
        stop_rest(procs, broker)


def test_jupyterhub_traefik_redis_proxy_takes_the_brokers_route(traefik_stack: tuple[Stack, Routes, str, int]) -> None:
    import requests

    stack, routes, proxy_token, hub_port = traefik_stack
    user = stack.username
    spec = f"/user/{user}/"
    browser = BrowserLike(stack)
    browser.login()
    browser.start_server(stack.logs)

    # Through traefik's entrypoint, the hub's OAuth dance included.
    page = browser.session.get(f"{stack.hub_url}/user/{user}/files/hello.txt", timeout=30)
    assert page.status_code == 200 and page.text == "hello through traefik", (page.status_code, page.url)
    (tunnel,) = [t for t in stack.tunnels() if t["state"] == "active"]
    target = f"http://127.0.0.1:{tunnel['port']}"
    wait_for(lambda: next(t for t in stack.tunnels() if t["id"] == tunnel["id"])["route"] == "registered", 15,
             "the broker to report its route registered", detail=stack.logs)

    # The hub reads the broker's route as the user's: its own data, and our stamp beside it.
    expected = {"routespec": spec, "target": target, "data": {"user": user, "server_name": "", "tunnelbot": "true"}}
    assert routes.all().get(spec) == expected, routes.all()
    route_keys = routes.keys(f"*{spec.replace('/', '_2F')}*")
    assert len(route_keys) == 12, route_keys

    # The hub checks its routes now (as it does every 5 minutes): nothing to add, update or delete.
    log_before = len(stack.hub.text())
    r = requests.post(f"http://127.0.0.1:{hub_port}/hub/api/proxy", headers={"Authorization": f"token {proxy_token}"},
                      timeout=30)
    assert r.status_code == 200, r.text
    # (The handler awaits check_routes before it answers.)
    checked = stack.hub.text()[log_before:]
    for complaint in ("Adding missing route", "Updating route", "Deleting stale route"):
        assert complaint not in checked, checked
    table = routes.all()
    assert table.get(spec) == expected and [s for s, v in table.items() if v["data"].get("user") == user] == [spec]
    assert routes.keys(f"*{spec.replace('/', '_2F')}*") == route_keys
    assert browser.status() == 200

    # Stop: the route goes from both trees, and traefik no longer reaches the server.
    r = browser.hub_api("DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: browser.server() is None, 60, "the server to stop", detail=stack.logs)
    wait_for(lambda: spec not in routes.all(), 15, "the route to go", detail=stack.logs)
    wait_for(lambda: not routes.keys(f"*{spec.replace('/', '_2F')}*"), 15, "every key of the route to go")
    final = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
    assert final["state"] == "revoked" and not final["connected"]
    assert browser.status() != 200
