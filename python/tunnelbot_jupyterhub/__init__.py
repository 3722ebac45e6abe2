"""JupyterHub integration for the tunnelbot SSH reverse-tunnel broker.

``TunnelbotSlurmSpawner`` needs batchspawner and is imported only when first used, so
this package imports without it.
"""

from __future__ import annotations

from typing import Any

from .broker import BrokerClient, BrokerError, Tunnel
from .credential import heredoc, render_bundle
from .remote import TunnelbotRemoteSpawner
from .spawner import TunnelbotLocalProcessSpawner, TunnelbotSpawnerMixin
from .wrapper import job_wrapper_path

__all__ = [
    "BrokerClient",
    "BrokerError",
    "Tunnel",
    "TunnelbotLocalProcessSpawner",
    "TunnelbotRemoteSpawner",
    "TunnelbotSlurmSpawner",
    "TunnelbotSpawnerMixin",
    "heredoc",
    "job_wrapper_path",
    "render_bundle",
]


def __getattr__(name: str) -> Any:
    if name == "TunnelbotSlurmSpawner":
        from .slurm import TunnelbotSlurmSpawner

        return TunnelbotSlurmSpawner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
