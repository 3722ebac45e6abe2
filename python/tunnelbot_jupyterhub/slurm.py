"""batchspawner's SlurmSpawner through a tunnelbot tunnel (needs batchspawner)."""

from __future__ import annotations

import re
from typing import Optional

from batchspawner import SlurmSpawner
from batchspawner.batchspawner import JobStatus
from traitlets import default

from .spawner import TunnelbotSpawnerMixin

__all__ = ["TunnelbotSlurmSpawner", "parse_slurm_time"]

_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(value: str) -> Optional[int]:
    """Seconds in a Slurm ``--time`` value, or None for empty/unlimited/unparsable.

    Slurm accepts M, M:S, H:M:S, D-H, D-H:M and D-H:M:S.
    """
    match = _SLURM_TIME.match(value.strip())
    if not match:
        return None
    days, a, b, c = match.groups()
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


class TunnelbotSlurmSpawner(TunnelbotSpawnerMixin, SlurmSpawner):
    """SlurmSpawner whose jobs are reached through tunnelbot.

    The job runs ``tunnelbot-job jupyterhub-singleuser``: the wrapper picks the node-side
    port itself, so batchspawner-singleuser (which reports a node port to the hub) is not
    used. The tunnel's lifetime follows the job's ``--time``.
    """

    @default("batchspawner_singleuser_cmd")
    def _default_batchspawner_singleuser_cmd(self) -> str:
        return ""

    def walltime_seconds(self) -> Optional[int]:
        runtime = (self.user_options or {}).get("runtime") or self.req_runtime
        return parse_slurm_time(str(runtime)) if runtime else None

    async def _job_exit_status_while_starting(self) -> Optional[int]:
        # batchspawner's start() stops watching the job once it runs; a job that dies
        # before its tunnel is up would otherwise show only as a timeout.
        if not self.job_id:
            return None
        status = await self.query_job_status()
        if status in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.UNKNOWN):
            return None
        return 1
