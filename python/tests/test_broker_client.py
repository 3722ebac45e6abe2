"""BrokerClient against the real broker's admin API."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

import pytest

from conftest import Broker
from tunnelbot_jupyterhub import BrokerClient, BrokerError

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def client(broker: Broker) -> BrokerClient:
    return BrokerClient.from_token_file(broker.admin_url, str(broker.token_file))


def test_issue_get_list_revoke(broker: Broker) -> None:
    c = client(broker)
    t = run(c.issue("alice", "gpu", ttl_seconds=600))
    assert t.id and t.user == "alice" and t.server_name == "gpu"
    assert t.state == "active" and not t.connected and t.route == "disabled"
    assert t.ssh_port == broker.ssh_port, "the tunnel object must name the port jobs connect to"
    assert t.private_key and "PRIVATE KEY" in t.private_key
    assert t.known_hosts.split()[0] == f"[*]:{broker.ssh_port}"

    again = run(c.get(t.id))
    assert again is not None and again.id == t.id and again.port == t.port
    assert again.private_key is None, "the private key is returned once only"
    assert t.id in [x.id for x in run(c.list())]

    assert run(c.revoke(t.id)) is True
    gone = run(c.get(t.id))
    assert gone is not None and gone.state == "revoked"
    assert run(c.revoke(t.id)) is True, "revoking an ended tunnel is 204"


def test_each_tunnel_reserves_its_own_port(broker: Broker) -> None:
    c = client(broker)
    ports = {run(c.issue("alice", f"s{i}")).port for i in range(3)}
    assert len(ports) == 3


def test_unknown_ids_are_gone(broker: Broker) -> None:
    c = client(broker)
    assert run(c.get("tb_does_not_exist")) is None
    assert run(c.revoke("tb_does_not_exist")) is False


def test_wrong_token_is_refused(broker: Broker) -> None:
    with pytest.raises(BrokerError) as info:
        run(BrokerClient(broker.admin_url, "not-the-token").list())
    assert info.value.status in (401, 403)
    assert "not-the-token" not in str(info.value)


def test_unknown_fields_are_refused(broker: Broker) -> None:
    # Admin API v1 has no proxy_spec: the broker derives the route from [chp] base_url.
    with pytest.raises(BrokerError) as info:
        run(client(broker).issue("alice", "", proxy_spec="/user/alice/"))
    assert info.value.status == 400


def test_health_needs_no_token(broker: Broker) -> None:
    from tornado.httpclient import AsyncHTTPClient

    async def get(path: str) -> Any:
        return await AsyncHTTPClient().fetch(broker.admin_url + path, raise_error=False)

    assert run(get("/healthz")).code == 200
    assert run(get("/readyz")).code == 200
