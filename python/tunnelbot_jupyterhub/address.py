"""Where the hub reaches a tunnel: the broker's ``tunnel_host`` checked, and the hub's server
record moved to it when a standby broker takes over.

The route target of a tunnel is ``http://<tunnel_host>:<port>``, where ``tunnel_host`` is the
ACTIVE broker's ``tunnels.public_host``. JupyterHub keeps the address ``start()`` returned as
the server's ``ip``/``port`` and, at each ``check_routes`` pass, writes any route whose target
differs back to it; its own requests to the server use it too. After a failover the new
broker's target differs, so the hub must take it over or the two keep rewriting each other.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Tuple
from urllib.parse import urlsplit

from .broker import Tunnel

__all__ = ["follow_server_address", "server_address"]


def server_address(tunnel: Tunnel) -> Optional[Tuple[str, int]]:
    """(ip, port) as JupyterHub's ``Server`` holds them for the tunnel's route target
    ``http://<tunnel_host>:<port>`` (an IPv6 address without its brackets); None when the
    broker's answer is not one host and port (a scheme, path, user info or white space in
    ``tunnel_host``, a port out of range), so a bad answer never becomes the hub's address."""
    host = tunnel.tunnel_host or "127.0.0.1"  # a broker older than the field routes to loopback
    port = tunnel.port
    if not 0 < port < 65536 or not host or any(c.isspace() or c in "@/?#\\%" for c in host):
        return None
    try:
        parts = urlsplit(f"http://{host}:{port}")
        parsed_port = parts.port
    except ValueError:
        return None
    # No user info, path, query or fragment (refused above), and exactly one port: the
    # netloc must read back as host:port.
    if parts.netloc != f"{host}:{port}" or parts.path or parts.query or parts.fragment or parsed_port != port:
        return None
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare != host:
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            return None
    elif ":" in host or "[" in host or "]" in host:
        return None
    # Not parts.hostname: it lowercases, and the route target (the broker's string) must equal
    # the hub's Server.host exactly or check_routes rewrites it.
    return bare, port


def follow_server_address(spawner: Any, tunnel_id: str, tunnel: Optional[Tunnel]) -> bool:
    """Point ``spawner.server`` at the address the broker routes ``tunnel_id`` to, when it moved.

    Only the broker's own answer for this tunnel id counts (never anything a notebook sends),
    only while the tunnel is active, and never during a spawn: the hub then stores what
    ``start()`` returns. The ORM row is committed as JupyterHub commits a server's address
    (``Server.ip``/``port`` write through to it, then the session's ``commit()``). True when
    the address changed.
    """
    if tunnel is None or tunnel.id != tunnel_id or not tunnel.active:
        return False
    if getattr(spawner, "tunnel_id", tunnel_id) != tunnel_id:  # a leftover's answer: not this server's
        return False
    address = server_address(tunnel)
    if address is None:
        refused = (tunnel_id, tunnel.tunnel_host, tunnel.port)
        if getattr(spawner, "_tunnelbot_refused_address", None) != refused:  # once, not every poll
            spawner._tunnelbot_refused_address = refused
            spawner.log.warning(
                "tunnelbot: ignoring the broker's address %r port %r for tunnel %s",
                tunnel.tunnel_host,
                tunnel.port,
                tunnel_id,
            )
        return False
    ip, port = address
    spawner.tunnel_host, spawner.tunnel_port = tunnel.tunnel_host or "127.0.0.1", port
    if getattr(spawner, "_spawn_pending", False):
        return False
    server = spawner.server
    if server is None or (server.ip, server.port) == (ip, port):
        return False
    old = server.host
    server.ip, server.port = ip, port
    orm_spawner = getattr(spawner, "orm_spawner", None)
    if orm_spawner is not None:
        orm_spawner.state = spawner.get_state()  # the hub's own save_state, for a hub restart
    _commit(server.orm_server)
    spawner.log.warning(
        "tunnelbot: the broker moved tunnel %s of %s (failover): server %s -> %s",
        tunnel_id,
        spawner._log_name,
        old,
        server.host,
    )
    return True


def _commit(orm_object: Any) -> None:
    """Commit the session ``orm_object`` lives in, as Spawner.server's setter finds it."""
    if orm_object is None:
        return
    from sqlalchemy import inspect

    session = inspect(orm_object).session
    if session is not None:
        session.commit()
