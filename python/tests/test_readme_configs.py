"""The jupyterhub_config.py examples in README.md load and configure the packaged spawners."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict

import pytest
from traitlets.config import Config
from traitlets.utils.importstring import import_item

from tunnelbot_jupyterhub import TunnelbotRemoteSpawner

README = Path(__file__).resolve().parent.parent / "README.md"


def config_block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"### `jupyterhub_config.py` for {heading}", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, heading
    return match.group(1)


def load(heading: str) -> Dict[str, Any]:
    c = Config()
    namespace: Dict[str, Any] = {"get_config": lambda: c, "__name__": "jupyterhub_config"}
    exec(compile(config_block(heading), f"README.md ({heading})", "exec"), namespace)
    namespace["c"] = c
    return namespace


def test_slurm_config_loads() -> None:
    pytest.importorskip("batchspawner")
    c = load("Slurm")["c"]
    spawner_class = import_item(c.JupyterHub.spawner_class)
    assert spawner_class.__name__ == "TunnelbotSlurmSpawner"
    spawner = spawner_class(user=SimpleNamespace(name="alice"), config=c)
    assert spawner.ssh_host == "hub.cluster.internal"
    assert spawner.walltime_seconds() == 8 * 3600
    assert spawner.batchspawner_singleuser_cmd == ""


def test_remote_hosts_config_loads(caplog: pytest.LogCaptureFixture) -> None:
    """The remote-host block configures the packaged spawner (the class is not pasted).

    tests/test_remote_e2e.py runs the same settings against real sshd hosts.
    """
    block = config_block("remote hosts over SSH")
    assert not re.search(r"^class ", block, re.M)
    c = load("remote hosts over SSH")["c"]
    spawner_class = import_item(c.JupyterHub.spawner_class)
    assert spawner_class is TunnelbotRemoteSpawner
    spawner = spawner_class(user=SimpleNamespace(name="alice"), config=c)
    with caplog.at_level(logging.WARNING):
        hosts = spawner.hosts()
    assert [(h.name, h.address) for h in hosts] == [
        ("gpu1", "10.1.0.11"),
        ("gpu2", "10.1.0.12"),
        ("bigmem.cluster.internal", "bigmem.cluster.internal"),
    ]
    assert not caplog.records
    assert spawner.ssh_identity.format(home_root=spawner.home_root, username="alice") == "/home/alice/.ssh/id_ed25519"
    assert spawner._job_argv([]) == [
        "apptainer", "exec", "--bind", "/shared,/scratch", "/shared/images/notebook.sif", "jupyterhub-singleuser"
    ]
    assert spawner.ssh_host == "hub.cluster.internal" and spawner.known_hosts_file


@pytest.mark.parametrize("readme", [README, README.parent.parent / "README.md"])
def test_every_example_config_keeps_jobs_across_a_hub_restart(readme: Path) -> None:
    text = readme.read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# jupyterhub_config.py")]
    assert len(blocks) >= 3, readme  # full configs, not fragments
    for block in blocks:
        assert "c.JupyterHub.cleanup_servers = False" in block, block[:200]
