"""Closes batchspawner's ``/hub/api/batchspawner`` hole for every spawner in the hub.

batchspawner 1.3.0 registers ``POST /hub/api/batchspawner`` when it is imported. With nothing
but a notebook's own ``JUPYTERHUB_API_TOKEN``, that handler sets **any** attribute of the
caller's spawner: ``exec_prefix`` (a command the hub runs as root), ``broker_url`` (where the
hub then sends the broker's admin token), ``batch_script``, ``job_id``...

:func:`guard_batchspawner_api` swaps it, in JupyterHub's handler list, for
:class:`PortOnlyBatchSpawnerAPIHandler`, which accepts one field, ``port`` (an integer port
number, which is all ``batchspawner-singleuser`` ever sends), and only for spawners that are
not tunnelbot's: ours take the port from the tunnel and ignore what a job says. A plain
batchspawner class in the same hub (a ProfilesSpawner profile, say) keeps working.

It must run before JupyterHub builds its handlers (``JupyterHub.init_handlers``), which the
import of our batch classes from ``jupyterhub_config.py`` guarantees: importing
``tunnelbot_jupyterhub.batch`` or ``.slurm`` calls it, and so does importing the package when
batchspawner is already loaded.
"""

from __future__ import annotations

import json
import sys
from typing import Any, List, Tuple

from jupyterhub.apihandlers import APIHandler
from tornado import web

__all__ = ["PortOnlyBatchSpawnerAPIHandler", "guard_batchspawner_api", "is_tunnelbot_spawner"]

_PATH = r"/api/batchspawner"


def is_tunnelbot_spawner(spawner: Any) -> bool:
    """True for our spawners, also when wrapped (wrapspawner's ``child_spawner``)."""
    from .spawner import TunnelbotSpawnerMixin

    for candidate in (spawner, getattr(spawner, "child_spawner", None)):
        if isinstance(candidate, TunnelbotSpawnerMixin):
            return True
    return False


class PortOnlyBatchSpawnerAPIHandler(APIHandler):
    """``POST /hub/api/batchspawner`` that can set nothing but a plain spawner's port."""

    @web.authenticated
    def post(self) -> None:
        user = self.current_user
        token = self.get_auth_token()
        spawner = None
        for candidate in getattr(user, "spawners", {}).values():
            if candidate.api_token == token:
                spawner = candidate
                break
        if spawner is None:
            raise web.HTTPError(403, "no server of yours uses this token")
        data = self.get_json_body()
        if not isinstance(data, dict) or set(data) != {"port"}:
            raise web.HTTPError(400, 'only {"port": N} is accepted here')
        port = data["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise web.HTTPError(400, "port must be an integer from 1 to 65535")
        if is_tunnelbot_spawner(spawner):
            # The hub reaches this server through its tunnel's hub port: nothing to set.
            self.set_status(200)
            self.finish(json.dumps({"message": "ignored: this server is reached through tunnelbot"}))
            return
        spawner.port = port
        self.set_status(201)
        self.finish(json.dumps({"message": "BatchSpawner data configured"}))


def guard_batchspawner_api() -> bool:
    """Replace batchspawner's handler in JupyterHub's API handler list; True if one was found.

    Idempotent. Does nothing (returns False) when batchspawner's API module is not loaded.
    """
    if "batchspawner.api" not in sys.modules:
        return False
    from jupyterhub import apihandlers

    handlers: List[Tuple[Any, ...]] = apihandlers.default_handlers
    replacement = PortOnlyBatchSpawnerAPIHandler
    found = False
    for i, entry in enumerate(handlers):
        if entry[0] == _PATH:
            found = True
            if entry[1] is not replacement:
                handlers[i] = (_PATH, replacement)
    if not found:
        handlers.append((_PATH, replacement))
    return True
