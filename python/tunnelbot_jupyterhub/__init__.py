"""JupyterHub integration for the tunnelbot SSH reverse-tunnel broker.

The batch classes (``TunnelbotSlurmSpawner``, ``TunnelbotTorqueSpawner``, ...) need
batchspawner and are imported only when first used, so this package imports without it.
Importing them (or this package while batchspawner is loaded) replaces batchspawner's
``/hub/api/batchspawner`` handler with one that can set nothing of ours (see trust.py).
"""

from __future__ import annotations

from typing import Any

from .broker import BrokerClient, BrokerError, Tunnel
from .credential import heredoc, render_bundle
from .remote import TunnelbotRemoteSpawner
from .spawner import TunnelbotLocalProcessSpawner, TunnelbotSpawnerMixin
from .trust import guard_batchspawner_api
from .wrapper import job_wrapper_path

_BATCH = {
    "TunnelbotSlurmSpawner": "slurm",
    "TunnelbotBatchMixin": "batch",
    "TunnelbotTorqueSpawner": "batch",
    "TunnelbotPBSSpawner": "batch",
    "TunnelbotGridengineSpawner": "batch",
    "TunnelbotLsfSpawner": "batch",
    "TunnelbotCondorSpawner": "batch",
}

__all__ = [
    "BrokerClient",
    "BrokerError",
    "Tunnel",
    "TunnelbotLocalProcessSpawner",
    "TunnelbotRemoteSpawner",
    "TunnelbotSpawnerMixin",
    "heredoc",
    "job_wrapper_path",
    "render_bundle",
    *_BATCH,
]

guard_batchspawner_api()


def __getattr__(name: str) -> Any:
    module = _BATCH.get(name)
    if module is not None:
        from importlib import import_module

        return getattr(import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
