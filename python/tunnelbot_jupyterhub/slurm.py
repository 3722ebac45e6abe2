"""batchspawner's SlurmSpawner through a tunnelbot tunnel (needs batchspawner).

Works as written for both topologies: ``sbatch`` on the hub (run as the user with sudo), and
``sbatch`` on a login node over ssh as one shared gateway account
(``exec_prefix = "ssh -T -o BatchMode=yes gateway@login"``). See batch.py for how the credential
reaches the job.
"""

from __future__ import annotations

import re
from typing import Optional

from batchspawner import SlurmSpawner
from traitlets import Unicode

from .batch import TunnelbotBatchMixin

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


class TunnelbotSlurmSpawner(TunnelbotBatchMixin, SlurmSpawner):
    """SlurmSpawner whose jobs are reached through tunnelbot.

    The job runs ``tunnelbot-job --credential - jupyterhub-singleuser`` with the credential
    on the wrapper's stdin. The tunnel's lifetime follows the job's ``--time``.
    """

    batch_script = Unicode(
        """#!/bin/sh
#SBATCH --job-name=spawner-jupyterhub
#SBATCH --output={% if homedir %}{{homedir}}/{% endif %}jupyterhub_slurmspawner_%j.log
{% if homedir %}#SBATCH --chdir={{homedir}}
{% endif %}#SBATCH --export={{keepvars}}
{% if partition  %}#SBATCH --partition={{partition}}
{% endif %}{% if runtime    %}#SBATCH --time={{runtime}}
{% endif %}{% if memory     %}#SBATCH --mem={{memory}}
{% endif %}{% if gres       %}#SBATCH --gres={{gres}}
{% endif %}{% if nprocs     %}#SBATCH --cpus-per-task={{nprocs}}
{% endif %}{% if reservation%}#SBATCH --reservation={{reservation}}
{% endif %}{% if options    %}#SBATCH {{options}}
{% endif %}
{{prologue}}
{% if srun %}{{srun}} {% endif %}{{cmd}}
status=$?
{{epilogue}}
exit "$status"
""",
        help="""The job script (jinja2). {{cmd}} is the wrapper's command line followed by the
        credential as a here-document; {{prologue}} starts with the job's environment.""",
    ).tag(config=True)

    req_srun = Unicode(
        "srun --export=ALL",
        help="""Runs the job's command as a job step ('' for none). --export=ALL: the step gets the
        environment the script exported (sbatch's --export would otherwise leave out PATH).""",
    ).tag(config=True)

    # No space and no quote: the command is parsed by two shells over ssh (exec_prefix).
    batch_query_cmd = Unicode(
        "squeue -h -j {job_id} -o %T:%B",
        help="Prints STATE:HOST for the job; survives the two shells of a submission over ssh.",
    ).tag(config=True)

    state_exechost_re = Unicode(
        r":((?:[\w_-]+\.?)+)$",
        help="Finds the node in batch_query_cmd's output.",
    ).tag(config=True)

    state_pending_re = Unicode(
        r"^(?:PENDING|CONFIGURING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|RESIZING|SUSPENDED)",
        help="""Job states that will run (again): a requeued job (scontrol requeue, a node
        failure) keeps its server, and re-runs its script with the same tunnel and port.""",
    ).tag(config=True)

    job_gone_re = Unicode(
        r"Invalid job id specified",
        help="squeue's error for a job Slurm does not know (definitely gone).",
    ).tag(config=True)

    exit_status_cmd = Unicode(
        "scontrol -o show job {job_id}",
        help="Prints the ended job's record; its ExitCode=STATUS:SIGNAL is what the user is told.",
    ).tag(config=True)

    def parse_walltime(self, value: str) -> Optional[int]:
        return parse_slurm_time(value)

    def parse_exit_status(self, output: str) -> Optional[int]:
        match = re.search(r"\bExitCode=(\d+):(\d+)", output)
        if not match:
            return None
        status, signal = int(match.group(1)), int(match.group(2))
        return 128 + signal if signal else status
