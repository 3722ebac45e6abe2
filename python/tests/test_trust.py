"""Issue 13, "the notebook user cannot reach the broker's admin token": unit-level proof.

The end-to-end attack (a notebook's own token posting to /hub/api/batchspawner on a real hub)
is in test_slurm_e2e.py. Here: the handler swap holds in every import order, and the settings
that carry trust cannot change once a spawner exists.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from traitlets import TraitError

pytest.importorskip("batchspawner")

from tunnelbot_jupyterhub import TunnelbotLocalProcessSpawner  # noqa: E402

CHECK = """
import sys
{imports}
from jupyterhub import apihandlers
from batchspawner.api import BatchSpawnerAPIHandler
entries = [h for h in apihandlers.default_handlers if h[0] == "/api/batchspawner"]
assert len(entries) == 1, entries
assert entries[0][1] is not BatchSpawnerAPIHandler, entries
assert entries[0][1].__name__ == "PortOnlyBatchSpawnerAPIHandler"
print("ok")
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import tunnelbot_jupyterhub.slurm",
        "import batchspawner\nimport tunnelbot_jupyterhub",
        "import tunnelbot_jupyterhub\nimport batchspawner\nfrom tunnelbot_jupyterhub import TunnelbotSlurmSpawner",
        # How jupyterhub_config.py names the class: JupyterHub resolves the string on load.
        "from traitlets.utils.importstring import import_item\nimport_item('tunnelbot_jupyterhub.TunnelbotTorqueSpawner')",
    ],
)
def test_batchspawner_handler_is_replaced_in_any_import_order(imports: str) -> None:
    out = subprocess.run([sys.executable, "-c", CHECK.format(imports=imports)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_trust_settings_are_config_only() -> None:
    from tunnelbot_jupyterhub import TunnelbotSlurmSpawner

    s = TunnelbotSlurmSpawner(user=SimpleNamespace(name="alice"), broker_url="http://127.0.0.1:8090")
    for name, value in (
        ("broker_url", "http://127.0.0.1:1"),
        ("broker_token_file", "/tmp/x"),
        ("ssh_host", "evil.example"),
        ("ssh_options", ["ProxyCommand=touch /tmp/x"]),
        ("job_wrapper", ["/tmp/evil"]),
        ("exec_prefix", "touch /tmp/x;"),
        ("batch_script", "#!/bin/sh\nid\n"),
        ("batch_submit_cmd", "sh"),
        ("batch_query_cmd", "touch /tmp/x"),
        ("batch_cancel_cmd", "touch /tmp/x"),
        ("req_prologue", "id"),
        ("req_options", "--uid=0"),
        ("req_homedir", "/root"),
    ):
        before = getattr(s, name)
        with pytest.raises(TraitError, match="configuration only"):
            setattr(s, name, value)
        assert getattr(s, name) == before, name
    with pytest.raises(TraitError):
        s.job_id = "1; touch /tmp/x"
    s.job_id = "1234"  # what sbatch answers is still taken
    assert s.job_id == "1234"

    local = TunnelbotLocalProcessSpawner(user=SimpleNamespace(name="alice"))
    with pytest.raises(TraitError):
        local.broker_url = "http://127.0.0.1:1"


def test_port_only_handler_decides_by_spawner_class() -> None:
    from tunnelbot_jupyterhub import TunnelbotSlurmSpawner
    from tunnelbot_jupyterhub.trust import is_tunnelbot_spawner

    ours = TunnelbotSlurmSpawner(user=SimpleNamespace(name="alice"))
    assert is_tunnelbot_spawner(ours)
    assert is_tunnelbot_spawner(SimpleNamespace(child_spawner=ours))  # wrapspawner's ProfilesSpawner
    assert not is_tunnelbot_spawner(SimpleNamespace(child_spawner=None))
