"""batchspawner's spawners through tunnelbot tunnels (needs batchspawner).

Every class here runs ``tunnelbot-job --credential - <Spawner.cmd>`` inside the batch script,
with the job's credential bundle as a here-document on the wrapper's standard input: never in
argv, never in the environment, never in the hub's log (the script is not logged). The job's
environment (JupyterHub's variables) is exported by the script itself, so it reaches the job
also when the script is submitted over ssh to a login node (``exec_prefix = "ssh gateway@login"``),
where nothing of the hub's environment travels.

``batchspawner-singleuser`` is not used: the wrapper picks the node port, and the hub reaches
the server through the tunnel's hub port.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shlex
import sys
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any, Dict, Iterator, List, Optional

import batchspawner
from batchspawner.batchspawner import JobStatus, format_template
from traitlets import Bool, Float, List as ListTrait, TraitError, Unicode, default, validate

from .broker import BrokerClient, Tunnel
from .credential import heredoc
from .form import SpawnFormMixin
from .spawner import TunnelbotSpawnerMixin, describe_exit, seal_traits
from .trust import guard_batchspawner_api

__all__ = [
    "TunnelbotBatchMixin",
    "TunnelbotCondorSpawner",
    "TunnelbotGridengineSpawner",
    "TunnelbotLsfSpawner",
    "TunnelbotPBSSpawner",
    "TunnelbotTorqueSpawner",
    "parse_clock_time",
    "parse_lsf_time",
]

guard_batchspawner_api()

# batchspawner settings that decide what runs where, as whom: config only (see trust.py).
_SEALED_BATCH = (
    "exec_prefix",
    "batch_script",
    "batch_submit_cmd",
    "batch_query_cmd",
    "batch_cancel_cmd",
    "batchspawner_singleuser_cmd",
    "req_homedir",
    "req_username",
    "req_keepvars",
    "req_keepvars_extra",
    "req_options",
    "req_prologue",
    "req_epilogue",
    "req_srun",
    "job_path",
    "submit_env_keep",
    "exit_status_cmd",
    "job_gone_re",
)

# What a job id may look like before it is put into a command line (Slurm: 123 or 123_4,
# PBS: 123.server, LSF/SGE/HTCondor: digits).
_JOB_ID = re.compile(r"^[A-Za-z0-9_.\[\]-]*$")

_UNREACHABLE = "tunnelbot: the login node did not answer"

_CLOCK = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+)$")
_LSF = re.compile(r"^(?:(\d+):)?(\d+)$")


def parse_clock_time(value: str) -> Optional[int]:
    """Seconds in a PBS/Torque ``walltime`` or SGE ``h_rt`` value: ``[[H:]M:]S`` or seconds."""
    match = _CLOCK.match(value.strip())
    if not match:
        return None
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return (hours * 60 + minutes) * 60 + seconds


def parse_lsf_time(value: str) -> Optional[int]:
    """Seconds in an LSF ``bsub -W`` value: ``[H:]M``."""
    match = _LSF.match(value.strip())
    if not match:
        return None
    hours, minutes = (int(g) if g else 0 for g in match.groups())
    return (hours * 60 + minutes) * 60


def _is_remote(exec_prefix: str) -> bool:
    words = exec_prefix.split()
    return bool(words) and PurePosixPath(words[0]).name in ("ssh", "autossh")


class TunnelbotBatchMixin(SpawnFormMixin, TunnelbotSpawnerMixin):
    """Mix in before a batchspawner class: ``class X(TunnelbotBatchMixin, SomeBatchSpawner)``."""

    exec_prefix = Unicode(
        "sudo -E -u {username}",
        help="""How the hub runs the scheduler's commands (submit, query, cancel). The default
        runs them locally as the user (sudo). For a login node reached over ssh as one shared
        account (the gateway topology): "ssh -T -o BatchMode=yes gateway@login". Then nothing of
        the hub's environment reaches the job except what the batch script exports, the job's
        PATH is the login account's, and req_homedir defaults to empty (the account's home).""",
    ).tag(config=True)

    req_homedir = Unicode(
        help="""The job's working directory and where its log goes. Default: the hub user's
        home from the hub's passwd (local submission); empty for submission over ssh (the
        directory sbatch runs in: the gateway account's home).""",
    ).tag(config=True)

    @default("req_homedir")
    def _default_req_homedir(self) -> str:
        if self.submit_remote:
            return ""
        try:
            return pwd.getpwnam(self.user.name).pw_dir
        except KeyError:
            return ""

    job_path = Unicode(
        help="""PATH the batch script sets for the job. JupyterHub 6 no longer passes PATH to
        spawners. Default, local submission: the hub's Python's bin directory (where pip put
        tunnelbot-job and jupyterhub-singleuser) ahead of the hub's own PATH; over ssh: empty,
        the login environment's PATH stays. Set it when the nodes see the software elsewhere.""",
    ).tag(config=True)

    @default("job_path")
    def _default_job_path(self) -> str:
        if self.submit_remote:
            return ""
        return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])

    submit_env_keep = ListTrait(
        Unicode(),
        ["PATH", "LANG", "LC_ALL", "SLURM_CONF", "PBS_SERVER", "SGE_ROOT", "SGE_CELL", "LSF_ENVDIR", "CONDOR_CONFIG"],
        help="""Variables of the hub's own environment given to the scheduler commands it runs
        (sbatch, qsub, ssh...), so they are found under JupyterHub 6. Not given to the job.""",
    ).tag(config=True)

    exit_status_cmd = Unicode(
        "",
        help="""Command (formatted like batch_query_cmd) that prints an ended job's exit status,
        so a failed start names the wrapper's reason. Empty: not available for this scheduler.""",
    ).tag(config=True)

    job_gone_re = Unicode(
        "",
        help="""Regex on the error of a failed batch_query_cmd that means the scheduler
        definitely does not know the job (Slurm: "Invalid job id specified"). Only that, or a
        query that succeeds and shows the job neither pending nor running, ends a server: any
        other failure, a query that times out (query_timeout) or one cut off by the hub's own
        shutdown means "unknown", and the server counts as running. Empty: no error is
        definite.""",
    ).tag(config=True)

    query_timeout = Float(
        30.0,
        help="""Seconds one status query (batch_query_cmd) may take; a slower one is killed and
        the job's state is unknown (the server counts as running), never gone.""",
    ).tag(config=True)

    submit_remote = Bool(
        help="Whether exec_prefix runs the scheduler's commands over ssh (derived from exec_prefix).",
    )

    @default("submit_remote")
    def _default_submit_remote(self) -> bool:
        return _is_remote(self.exec_prefix)

    @default("batchspawner_singleuser_cmd")
    def _default_batchspawner_singleuser_cmd(self) -> str:
        return ""

    @validate(*_SEALED_BATCH)
    def _validate_sealed_batch(self, proposal: Dict[str, Any]) -> Any:
        return seal_traits(self, proposal)

    @validate("job_id")
    def _validate_job_id(self, proposal: Dict[str, Any]) -> str:
        value = str(proposal["value"])
        if not _JOB_ID.match(value):
            raise TraitError("not a job id")
        return value

    _tunnelbot_bundle: Optional[str] = None
    _tunnelbot_job_id: str = ""

    def user_env(self, env: Dict[str, str]) -> Dict[str, str]:
        # batchspawner sets USER/HOME/SHELL from the hub's passwd; over ssh the job runs as the
        # login account, which its login environment describes (the hub user may not exist here).
        parent = getattr(super(), "user_env", None)
        if self.submit_remote or parent is None:
            return env
        try:
            pwd.getpwnam(self.user.name)
        except KeyError:
            return env
        result: Dict[str, str] = parent(env)
        return result

    # --- the job's command line and script --------------------------------------------

    @contextmanager
    def _wrapped_cmd(self, bundle: str) -> Iterator[None]:
        # The base start() submits the script; the bundle goes into it, nowhere else.
        self._tunnelbot_bundle = bundle
        try:
            yield
        finally:
            self._tunnelbot_bundle = None

    def job_argv(self) -> List[str]:
        """The job's command: wrapper, credential on stdin, Spawner.cmd and its arguments."""
        return self.wrapper_argv(["--credential", "-"]) + self.image_argv() + list(self.cmd) + list(self.get_args())

    def cmd_formatted_for_batch(self) -> str:
        line = " ".join(shlex.quote(arg) for arg in self.job_argv())
        if self._tunnelbot_bundle is None:
            return line  # outside start(): what would run, without a credential
        return line + " " + heredoc(self._tunnelbot_bundle).rstrip("\n")

    def job_environment(self) -> Dict[str, str]:
        """What the batch script exports for the job (JupyterHub's variables, PATH)."""
        env: Dict[str, str] = dict(self.get_env())
        if self.job_path:
            env["PATH"] = self.job_path
        return {k: v for k, v in env.items() if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)}

    def script_prologue(self, env: Dict[str, str]) -> str:
        """Shell lines before the job's command: its environment and a clear wrapper check."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
        wrapper = self.job_wrapper[0] if self.job_wrapper else "tunnelbot-job"
        quoted = shlex.quote(wrapper)
        lines.append(
            f"command -v {quoted} >/dev/null 2>&1 || {{ echo "
            + shlex.quote(f"tunnelbot: the job wrapper {wrapper} was not found on this node (PATH=")
            + '"$PATH"'
            + shlex.quote("); set c.TunnelbotSpawnerMixin.job_wrapper to its absolute path")
            + " >&2; exit 127; }"
        )
        return "\n".join(lines) + "\n"

    def submit_env(self) -> Dict[str, str]:
        """The environment of the submit command: the job's, plus the hub's submit_env_keep."""
        env = dict(self.get_env())
        for name in self.submit_env_keep:
            if name in os.environ and name not in env:
                env[name] = os.environ[name]
        return env

    def _command(self, template: str, **extra: str) -> str:
        subvars = self.get_req_subvars()
        subvars.update(extra)
        return " ".join((format_template(self.exec_prefix, **subvars), format_template(template, **subvars)))

    async def submit_batch_script(self) -> str:
        # batchspawner's own version logs the script and the environment at debug level and
        # lets user_options overwrite any template variable; this one does neither.
        subvars = self.get_req_subvars()
        subvars.update(self.form_subvars())
        cmd = self._command(self.batch_submit_cmd, **self.form_subvars())
        subvars["cmd"] = self.cmd_formatted_for_batch()
        subvars["prologue"] = self.script_prologue(self.job_environment()) + str(subvars.get("prologue") or "")
        script = await self._get_batch_script(**subvars)
        self.log.info("tunnelbot: submitting the job of %s with: %s", self._log_name, cmd)
        out = await self.run_command(cmd, input=script, env=self.submit_env())
        try:
            self.job_id = self.parse_job_id(out)
        except Exception:
            self.log.error("tunnelbot: cannot read a job id in the submit command's output: %r", out[-500:])
            self.job_id = ""
        self._tunnelbot_job_id = self.job_id
        self.log.info("tunnelbot: job %s submitted for %s", self.job_id, self._log_name)
        return str(self.job_id)

    # --- scheduler commands ----------------------------------------------------------------

    async def run_command(self, cmd: str, input: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> str:
        """batchspawner's run_command, except that a cancelled call (hub shutdown) stays a
        cancellation and an unreachable login node is "unknown", never "the job is gone"."""
        proc = await asyncio.create_subprocess_shell(
            cmd,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await proc.communicate(input.encode() if input else None)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
            raise
        if proc.returncode != 0:
            message = err.decode(errors="replace").strip()
            if self.submit_remote and proc.returncode == 255:
                raise RuntimeError(f"{_UNREACHABLE}: {message}")
            self.log.error("tunnelbot: %s exited with %s: %s", cmd.split()[0], proc.returncode, message)
            raise RuntimeError(message or f"exit status {proc.returncode}")
        return out.decode(errors="replace").strip()

    def state_isunknown(self) -> bool:
        if str(self.job_status or "").startswith(_UNREACHABLE):
            return True
        return bool(super().state_isunknown())

    async def query_job_status(self) -> JobStatus:
        """batchspawner's query, except that only a definite answer means "gone": a query that
        fails (unless its error matches job_gone_re), times out or is cancelled is UNKNOWN."""
        if not self.job_id:
            self.job_status = ""
            return JobStatus.NOTFOUND
        cmd = self._command(self.batch_query_cmd, job_id=str(self.job_id))
        try:
            self.job_status = await asyncio.wait_for(self.run_command(cmd), self.query_timeout)
        except asyncio.TimeoutError:
            self.log.warning("tunnelbot: the status query of job %s took over %g s; state unknown",
                             self.job_id, self.query_timeout)
            return JobStatus.UNKNOWN
        except Exception as e:
            message = str(e)
            if self.job_gone_re and re.search(self.job_gone_re, message):
                self.job_status = message
                return JobStatus.NOTFOUND
            self.log.warning("tunnelbot: cannot query job %s (state unknown): %s", self.job_id, message[-300:])
            self.job_status = f"{_UNREACHABLE}: {message}" if message.startswith(_UNREACHABLE) else message
            return JobStatus.UNKNOWN
        if self.state_isrunning():
            return JobStatus.RUNNING
        if self.state_ispending():
            return JobStatus.PENDING
        if self.state_isunknown():
            return JobStatus.UNKNOWN
        return JobStatus.NOTFOUND

    # --- failures the user can read ------------------------------------------------------

    async def job_exit_status(self, job_id: str) -> Optional[int]:
        """An ended job's exit status from the scheduler, or None if it cannot tell."""
        if not self.exit_status_cmd or not job_id or not _JOB_ID.match(job_id):
            return None
        try:
            out = await self.run_command(self._command(self.exit_status_cmd, job_id=job_id))
        except Exception as e:
            self.log.warning("tunnelbot: cannot read the exit status of job %s: %s", job_id, e)
            return None
        return self.parse_exit_status(str(out))

    def parse_exit_status(self, output: str) -> Optional[int]:
        match = re.search(r"\b(\d+)\s*$", output.strip())
        return int(match.group(1)) if match else None

    async def _wait_connected(self, broker: BrokerClient, tunnel: Tunnel, launch: "asyncio.Future[Any]") -> None:
        try:
            await super()._wait_connected(broker, tunnel, launch)
        except (RuntimeError, TimeoutError) as e:
            job_id = self._tunnelbot_job_id
            status = None
            if job_id and (not self.job_id or await self.query_job_status() == JobStatus.NOTFOUND):
                status = await self.job_exit_status(job_id)
            if status is None:
                if isinstance(e, RuntimeError) and "disappeared" in str(e) and job_id:
                    raise RuntimeError(
                        f"job {job_id} ended before its tunnel came up; its log on the cluster says why"
                    ) from None
                raise
            raise RuntimeError(f"job {job_id} ended before its tunnel came up ({describe_exit(status)})") from None

    async def _job_exit_status_while_starting(self) -> Optional[int]:
        # batchspawner's start() stops watching the job once it runs; a job that dies
        # before its tunnel is up would otherwise show only as a timeout.
        if not self.job_id:
            return None
        status = await self.query_job_status()
        if status in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.UNKNOWN):
            return None
        code = await self.job_exit_status(self.job_id)
        return 1 if code is None else code

    def _job_launched(self) -> bool:
        return bool(self.job_id)

    async def cancel_batch_job(self) -> None:
        if not self.job_id:  # nothing submitted, or already cleared: no bare `scancel`
            return
        await super().cancel_batch_job()

    # --- wall time -----------------------------------------------------------------------

    def parse_walltime(self, value: str) -> Optional[int]:
        return parse_clock_time(value)

    def walltime_seconds(self) -> Optional[int]:
        runtime = self.form_subvars().get("runtime") or self.req_runtime
        return self.parse_walltime(str(runtime)) if runtime else None


_SHELL_TAIL = """
{prologue}
{cmd}
status=$?
{epilogue}
exit "$status"
"""
# The same tail for the jinja2 templates (one blank line after the directives).
_JINJA_TAIL = """
{{prologue}}
{{cmd}}
status=$?
{{epilogue}}
exit "$status"
"""
_JINJA_HELP = "The job script (jinja2 template; {{cmd}} carries the credential on stdin)."


class TunnelbotTorqueSpawner(TunnelbotBatchMixin, batchspawner.TorqueSpawner):
    """Torque through tunnelbot (``#PBS -l walltime=[[H:]M:]S``)."""

    job_gone_re = Unicode(
        r"Unknown Job Id",
        help="The query's error for a job the scheduler does not know (definitely gone).",
    ).tag(config=True)

    batch_script = Unicode(
        """#!/bin/sh
#PBS -q {queue}@{host}
#PBS -l walltime={runtime}
#PBS -l nodes=1:ppn={nprocs}
#PBS -l mem={memory}
#PBS -N jupyterhub-singleuser
#PBS -v {keepvars}
#PBS {options}
"""
        + _SHELL_TAIL,
        help="The job script (str.format template; {cmd} carries the credential on stdin).",
    ).tag(config=True)


class TunnelbotPBSSpawner(TunnelbotBatchMixin, batchspawner.PBSSpawner):
    """PBS Pro through tunnelbot (``#PBS -l walltime=[[H:]M:]S``)."""

    job_gone_re = Unicode(
        r"Unknown Job Id",
        help="The query's error for a job the scheduler does not know (definitely gone).",
    ).tag(config=True)

    batch_script = Unicode(
        """#!/bin/sh
{% if queue or host %}#PBS -q {% if queue  %}{{queue}}{% endif %}\
{% if host %}@{{host}}{% endif %}{% endif %}
{% if runtime %}#PBS -l walltime={{runtime}}
{% endif %}#PBS -l select=1:ncpus={{nprocs}}:mem={{memory}}
#PBS -N jupyterhub-singleuser
{% if homedir %}#PBS -o {{homedir}}/.jupyterhub.pbs.out
#PBS -e {{homedir}}/.jupyterhub.pbs.err
{% endif %}#PBS -v {{keepvars}}
{% if options %}#PBS {{options}}{% endif %}
"""
        + _JINJA_TAIL,
        help=_JINJA_HELP,
    ).tag(config=True)


class TunnelbotGridengineSpawner(TunnelbotBatchMixin, batchspawner.GridengineSpawner):
    """SGE/UGE through tunnelbot (``-l h_rt=[[H:]M:]S``)."""

    job_gone_re = Unicode(
        r"do not exist",
        help="The query's error for a job the scheduler does not know (definitely gone).",
    ).tag(config=True)

    batch_script = Unicode(
        """#!/bin/sh
#$ -S /bin/sh
#$ -j yes
#$ -N spawner-jupyterhub
{% if homedir %}#$ -o {{homedir}}/.jupyterhub.sge.out
{% endif %}{% if runtime %}#$ -l h_rt={{runtime}}
{% endif %}#$ -v {{keepvars}}
{% if options %}#$ {{options}}{% endif %}
"""
        + _JINJA_TAIL,
        help=_JINJA_HELP,
    ).tag(config=True)


class TunnelbotLsfSpawner(TunnelbotBatchMixin, batchspawner.LsfSpawner):
    """LSF through tunnelbot (``#BSUB -W [H:]M``)."""

    job_gone_re = Unicode(
        r"is not found",
        help="The query's error for a job the scheduler does not know (definitely gone).",
    ).tag(config=True)

    batch_script = Unicode(
        """#!/bin/sh
#BSUB -R "span[hosts=1]"
{% if queue %}#BSUB -q {{queue}}
{% endif %}{% if runtime %}#BSUB -W {{runtime}}
{% endif %}{% if nprocs %}#BSUB -n {{nprocs}}
{% endif %}#BSUB -J spawner-jupyterhub
{% if homedir %}#BSUB -o {{homedir}}/.jupyterhub.lsf.out
#BSUB -e {{homedir}}/.jupyterhub.lsf.err
{% endif %}{% if options %}#BSUB {{options}}{% endif %}
"""
        + _JINJA_TAIL,
        help=_JINJA_HELP,
    ).tag(config=True)

    def parse_walltime(self, value: str) -> Optional[int]:
        return parse_lsf_time(value)


class TunnelbotCondorSpawner(TunnelbotBatchMixin, batchspawner.CondorSpawner):
    """HTCondor through tunnelbot.

    A submit description cannot carry a here-document, so the submit side is a small shell
    script (``batch_submit_cmd = "/bin/sh -s"``): it puts the bundle into a private 0600 file
    in the submitting account's home (which the job's node shares, as batchspawner's Condor
    setup already assumes) and the job's wrapper deletes it as soon as it has read it
    (``--credential-move``). HTCondor has no wall time: the tunnel gets ``default_lifetime``.
    """

    batch_submit_cmd = Unicode(
        "/bin/sh -s",
        help="Runs the batch script (a shell script that calls condor_submit) on the submit host.",
    ).tag(config=True)

    batch_script = Unicode(
        """set -eu
umask 077
dir=$(mktemp -d "{% if homedir %}{{homedir}}{% else %}${HOME:-/tmp}{% endif %}/.tunnelbot-cred.XXXXXXXX")
{{credential}}
sed "s#@TUNNELBOT_DIR@#$dir#g" <<'TUNNELBOT_SUBMIT_DESCRIPTION' | condor_submit
Executable = /bin/sh
{% if memory %}RequestMemory = {{memory}}
{% endif %}{% if nprocs %}RequestCpus = {{nprocs}}
{% endif %}Arguments = "-c '. @TUNNELBOT_DIR@/env; rm -f @TUNNELBOT_DIR@/env; exec {{cmd}}'"
{% if homedir %}Remote_Initialdir = {{homedir}}
Output = {{homedir}}/.jupyterhub.condor.out
Error = {{homedir}}/.jupyterhub.condor.err
{% endif %}ShouldTransferFiles = False
GetEnv = False
{{options}}
Queue
TUNNELBOT_SUBMIT_DESCRIPTION
""",
        help="The submit-side shell script (jinja2 template) that runs condor_submit.",
    ).tag(config=True)

    def cmd_formatted_for_batch(self) -> str:
        argv = self.wrapper_argv(["--credential-move", "@TUNNELBOT_DIR@/credential"]) + self.image_argv()
        line = " ".join(shlex.quote(a) for a in argv + list(self.cmd) + list(self.get_args()))
        # HTCondor's Arguments syntax: inside "...", ' and " are doubled.
        return line.replace('"', '""').replace("'", "''")

    async def _get_batch_script(self, **subvars: Any) -> str:
        # Condor's Arguments cannot hold several lines: the job's environment and the wrapper
        # check go into a private file next to the credential, which the job sources.
        prologue = str(subvars.pop("prologue", ""))
        subvars["credential"] = "\n".join(
            [
                'cat >"$dir"/credential ' + heredoc(self._tunnelbot_bundle or "end\n").rstrip("\n"),
                'cat >"$dir"/env ' + heredoc(prologue).rstrip("\n"),
            ]
        )
        return str(format_template(self.batch_script, **subvars))
