"""Async client for the tunnelbot broker's admin API (docs/admin-api.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

__all__ = ["BrokerClient", "BrokerError", "Tunnel", "read_token"]


class BrokerError(Exception):
    """The broker refused a request or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"tunnelbot broker: {message} (HTTP {status})" if status else f"tunnelbot broker: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Tunnel:
    """A tunnel object as the admin API returns it."""

    id: str
    user: str
    server_name: str
    port: int
    state: str
    ssh_user: str
    ssh_host: Optional[str]
    ssh_port: int
    known_hosts: str
    created_at: str = ""
    expires_at: str = ""
    fingerprint: str = ""
    connected: bool = False
    connected_since: Optional[str] = None
    peer: Optional[str] = None
    bytes_to_job: int = 0
    bytes_from_job: int = 0
    route: str = "disabled"
    # The host the proxy dials to reach ``port`` (None from a broker older than the field).
    tunnel_host: Optional[str] = None
    # "key" (an issued key pair) or "certificate" (any valid certificate of the site's CA).
    auth: str = "key"
    lease_seconds: Optional[int] = None
    renewed_at: Optional[str] = None
    lease_until: Optional[str] = None
    # Only in the answer to an issue call; never shown by repr.
    private_key: Optional[str] = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.state == "active"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Tunnel":
        try:
            return cls(
                id=str(data["id"]),
                user=str(data["user"]),
                server_name=str(data.get("server_name") or ""),
                port=int(data["port"]),
                state=str(data["state"]),
                ssh_user=str(data["ssh_user"]),
                ssh_host=data.get("ssh_host"),
                ssh_port=int(data["ssh_port"]),
                known_hosts=str(data["known_hosts"]),
                created_at=str(data.get("created_at") or ""),
                expires_at=str(data.get("expires_at") or ""),
                fingerprint=str(data.get("fingerprint") or ""),
                connected=bool(data.get("connected", False)),
                connected_since=data.get("connected_since"),
                peer=data.get("peer"),
                bytes_to_job=int(data.get("bytes_to_job") or 0),
                bytes_from_job=int(data.get("bytes_from_job") or 0),
                route=str(data.get("route") or "disabled"),
                tunnel_host=data.get("tunnel_host") or None,
                auth=str(data.get("auth") or "key"),
                lease_seconds=int(data["lease_seconds"]) if data.get("lease_seconds") is not None else None,
                renewed_at=data.get("renewed_at"),
                lease_until=data.get("lease_until"),
                private_key=data.get("private_key"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BrokerError(0, f"unexpected tunnel object ({e!r})") from None


def read_token(path: str) -> str:
    """The admin token from ``path`` (the broker's ``<keys_dir>/admin.token``)."""
    if not path:
        raise BrokerError(0, "no admin token file configured")
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise BrokerError(0, f"cannot read the admin token file {path}: {e.strerror}") from None
    if not token:
        raise BrokerError(0, f"the admin token file {path} is empty")
    return token


class BrokerClient:
    """Issues, looks up and revokes tunnels. The token never appears in repr or errors."""

    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._token = token

    @classmethod
    def from_token_file(cls, url: str, token_file: str, timeout: float = 10.0) -> "BrokerClient":
        return cls(url, read_token(token_file), timeout)

    def __repr__(self) -> str:
        return f"BrokerClient(url={self.url!r})"

    async def issue(
        self,
        user: str,
        server_name: str = "",
        ttl_seconds: Optional[int] = None,
        proxy_spec: Optional[str] = None,
        public_key: Optional[str] = None,
        lease_seconds: Optional[int] = None,
        auth: Optional[str] = None,
    ) -> Tunnel:
        """A new tunnel; it carries ``private_key`` unless ``public_key`` was given or ``auth``
        is ``"certificate"`` (then any valid certificate of the site's CA for ``user`` publishes
        it). ``lease_seconds``: the tunnel expires that long after its last renewal.

        ``proxy_spec`` is sent only when given: admin API v1 refuses unknown fields and
        derives the route path itself from ``[chp] base_url``, the user and the server name.
        """
        body: Dict[str, Any] = {"user": user, "server_name": server_name}
        if ttl_seconds is not None:
            body["ttl_seconds"] = int(ttl_seconds)
        if proxy_spec is not None:
            body["proxy_spec"] = proxy_spec
        if public_key is not None:
            body["public_key"] = public_key
        if lease_seconds is not None:
            body["lease_seconds"] = int(lease_seconds)
        if auth is not None and auth != "key":
            body["auth"] = auth
        resp = await self._call("POST", "/api/v1/tunnels", body)
        if resp.code != 201:
            raise _error(resp)
        return Tunnel.from_json(_json(resp))

    async def get(self, tunnel_id: str) -> Optional[Tunnel]:
        """The tunnel, or None when the broker no longer knows it (404)."""
        resp = await self._call("GET", _tunnel_path(tunnel_id))
        if resp.code == 404:
            return None
        if resp.code != 200:
            raise _error(resp)
        return Tunnel.from_json(_json(resp))

    async def list(self) -> List[Tunnel]:
        resp = await self._call("GET", "/api/v1/tunnels")
        if resp.code != 200:
            raise _error(resp)
        return [Tunnel.from_json(t) for t in _json(resp).get("tunnels", [])]

    async def revoke(self, tunnel_id: str) -> bool:
        """Revoke; True if the broker knew the tunnel, False if it was already gone (404)."""
        resp = await self._call("DELETE", _tunnel_path(tunnel_id))
        if resp.code == 404:
            return False
        if resp.code != 204:
            raise _error(resp)
        return True

    async def renew(self, tunnel_id: str, ttl_seconds: Optional[int] = None) -> Optional[Tunnel]:
        """Extend the expiry to now + ``ttl_seconds`` (never earlier) and restart the lease.

        None when the broker does not know the tunnel (404). A tunnel that has ended (409)
        raises ``BrokerError`` with ``status`` 409.
        """
        body: Optional[Dict[str, Any]] = {"ttl_seconds": int(ttl_seconds)} if ttl_seconds else None
        resp = await self._call("POST", _tunnel_path(tunnel_id) + "/renew", body)
        if resp.code == 404:
            return None
        if resp.code != 200:
            raise _error(resp)
        return Tunnel.from_json(_json(resp))

    async def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> HTTPResponse:
        request = HTTPRequest(
            self.url + path,
            method=method,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Accept": "application/json",
                **({"Content-Type": "application/json"} if body is not None else {}),
            },
            body=json.dumps(body) if body is not None else ("" if method == "POST" else None),
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
        )
        try:
            return await AsyncHTTPClient().fetch(request, raise_error=False)
        except HTTPClientError as e:  # timeouts arrive as 599
            raise BrokerError(0, f"{method} {path}: {e.message}") from None
        except OSError as e:
            raise BrokerError(0, f"{method} {path}: cannot reach {self.url}: {e.strerror or e}") from None


def _tunnel_path(tunnel_id: str) -> str:
    return "/api/v1/tunnels/" + quote(tunnel_id, safe="")


def _json(resp: HTTPResponse) -> Dict[str, Any]:
    try:
        data = json.loads(resp.body or b"null")
    except ValueError:
        raise BrokerError(resp.code, "answer is not JSON") from None
    if not isinstance(data, dict):
        raise BrokerError(resp.code, "answer is not a JSON object")
    return data


def _error(resp: HTTPResponse) -> BrokerError:
    message = resp.reason or "unexpected answer"
    try:
        data = json.loads(resp.body or b"null")
        if isinstance(data, dict) and data.get("error"):
            message = str(data["error"])
    except ValueError:
        pass
    return BrokerError(resp.code, message)
