"""Unit tests: no broker, no network."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import pytest
from traitlets import TraitError

from conftest import SOURCE_DIR, WRAPPER, free_port
from tunnelbot_jupyterhub import BrokerClient, BrokerError, Tunnel, TunnelbotLocalProcessSpawner
from tunnelbot_jupyterhub.broker import read_token
from tunnelbot_jupyterhub.spawner import describe_exit, pin_known_hosts

TUNNEL_JSON = {
    "id": "tb_1",
    "user": "alice",
    "server_name": "",
    "port": 20017,
    "created_at": "2026-11-23T19:00:00Z",
    "expires_at": "2026-11-24T03:00:00Z",
    "state": "active",
    "ssh_user": "tunnelbot",
    "ssh_host": None,
    "ssh_port": 2222,
    "known_hosts": "[*]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample",
    "fingerprint": "SHA256:x",
    "connected": False,
    "connected_since": None,
    "peer": None,
    "bytes_to_job": 0,
    "bytes_from_job": 0,
    "route": "disabled",
    "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nSECRET\n-----END OPENSSH PRIVATE KEY-----\n",
}


def make_spawner(**kwargs: object) -> TunnelbotLocalProcessSpawner:
    return TunnelbotLocalProcessSpawner(user=SimpleNamespace(name="alice"), **kwargs)


def test_tunnel_parses_the_documented_object_and_hides_the_key() -> None:
    t = Tunnel.from_json(TUNNEL_JSON)
    assert (t.id, t.port, t.ssh_port, t.active, t.connected, t.ssh_host) == ("tb_1", 20017, 2222, True, False, None)
    assert t.private_key and "SECRET" in t.private_key
    assert "SECRET" not in repr(t)


def test_tunnel_tolerates_new_fields_and_rejects_missing_ones() -> None:
    assert Tunnel.from_json({**TUNNEL_JSON, "something_new": 1}).id == "tb_1"
    broken = dict(TUNNEL_JSON)
    del broken["port"]
    with pytest.raises(BrokerError):
        Tunnel.from_json(broken)


def test_client_repr_and_errors_never_show_the_token(tmp_path: Path) -> None:
    client = BrokerClient("http://127.0.0.1:1/", "s3cr3t-token")
    assert "s3cr3t" not in repr(client)
    assert client.url == "http://127.0.0.1:1"


def test_read_token(tmp_path: Path) -> None:
    f = tmp_path / "admin.token"
    f.write_text("abc\n")
    assert read_token(str(f)) == "abc"
    f.write_text("")
    with pytest.raises(BrokerError, match="empty"):
        read_token(str(f))
    with pytest.raises(BrokerError, match="cannot read"):
        read_token(str(tmp_path / "missing"))
    with pytest.raises(BrokerError, match="no admin token file"):
        read_token("")


def test_unreachable_broker_is_a_broker_error() -> None:
    client = BrokerClient(f"http://127.0.0.1:{free_port()}", "t", timeout=5)
    with pytest.raises(BrokerError) as info:
        asyncio.run(client.get("tb_1"))
    assert info.value.status == 0


def test_pin_known_hosts_names_the_host_the_job_dials() -> None:
    line = "[hub.example.org]:2222 ssh-ed25519 AAAAkey"
    assert pin_known_hosts(line, "10.0.0.1", 2222) == "[10.0.0.1]:2222 ssh-ed25519 AAAAkey"
    assert pin_known_hosts("[*]:22 ssh-ed25519 AAAAkey\n", "hub", 22) == "hub ssh-ed25519 AAAAkey"
    two = "[*]:2222 ssh-ed25519 A\n[*]:2222 rsa-sha2-512 B"
    assert pin_known_hosts(two, "h", 2222).splitlines() == ["[h]:2222 ssh-ed25519 A", "[h]:2222 rsa-sha2-512 B"]
    with pytest.raises(BrokerError):
        pin_known_hosts("", "h", 2222)


def test_describe_exit() -> None:
    assert "could not bring the tunnel up" in describe_exit(69)
    assert "signal 9" in describe_exit(137)
    assert describe_exit(3) == "status 3"


def test_traits_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNELBOT_ADMIN_TOKEN_FILE", "/etc/tunnelbot/admin.token")
    s = make_spawner(start_timeout=60)
    assert s.broker_url == "http://127.0.0.1:8090"
    assert s.broker_token_file == "/etc/tunnelbot/admin.token"
    assert s.connect_timeout == 55
    assert s.job_wrapper == ["/bin/sh", str(WRAPPER)]
    assert s.tunnel_lifetime() is None
    s.default_lifetime = 3600
    assert s.tunnel_lifetime() == 3600
    for name in ("broker_url", "broker_token_file", "ssh_host", "ssh_options", "default_lifetime", "connect_timeout"):
        trait = s.traits()[name]
        assert trait.metadata.get("config") is True and trait.help, name


@pytest.mark.parametrize(
    "option", ["StrictHostKeyChecking=no", "stricthostkeychecking=accept-new", "UserKnownHostsFile=/dev/null", "a b"]
)
def test_ssh_options_cannot_weaken_pinning(option: str) -> None:
    with pytest.raises(TraitError):
        make_spawner(ssh_options=[option])


def test_the_credential_names_the_host_the_job_dials() -> None:
    s = make_spawner(ssh_options=["ConnectTimeout=5", "ProxyJump=gw"])
    tunnel = Tunnel.from_json(TUNNEL_JSON)
    with pytest.raises(RuntimeError, match="ssh_host"):
        s.credential_bundle(tunnel)  # the broker has no public_host and none is configured
    s = make_spawner(ssh_options=["ConnectTimeout=5", "ProxyJump=gw"], ssh_host="hub-internal")
    bundle = s.credential_bundle(tunnel).splitlines()
    assert "host=hub-internal" in bundle and "ssh_port=2222" in bundle and "ssh_user=tunnelbot" in bundle
    assert "known_hosts=[hub-internal]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample" in bundle
    assert "ssh_option=ProxyJump=gw" in bundle and "SECRET" in bundle


def test_state_round_trip() -> None:
    s = make_spawner()
    s.tunnel_id, s.tunnel_port = "tb_9", 20009
    state = s.get_state()
    assert state["tunnelbot_tunnel_id"] == "tb_9" and state["tunnelbot_port"] == 20009
    t = make_spawner()
    t.load_state(state)
    assert (t.tunnel_id, t.tunnel_port) == ("tb_9", 20009)
    t.clear_state()
    assert (t.tunnel_id, t.tunnel_port) == ("", 0)
    assert "tunnelbot_tunnel_id" not in t.get_state()


def test_poll_without_state_reports_not_running() -> None:
    # At hub start-up poll() may come before any start(): it must say "not running".
    assert asyncio.run(make_spawner().poll()) == 0


def test_package_imports_without_batchspawner() -> None:
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.startswith('batchspawner'): raise ImportError('blocked')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import tunnelbot_jupyterhub as t\n"
        "assert t.TunnelbotLocalProcessSpawner\n"
        "try:\n    t.TunnelbotSlurmSpawner\nexcept ImportError:\n    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"


def test_slurm_spawner_wraps_the_batch_command() -> None:
    pytest.importorskip("batchspawner")
    from tunnelbot_jupyterhub import TunnelbotSlurmSpawner
    from tunnelbot_jupyterhub.slurm import parse_slurm_time

    s = TunnelbotSlurmSpawner(user=SimpleNamespace(name="alice"), req_runtime="1-02:03:04", form_runtime_max="2-0")
    assert s.batchspawner_singleuser_cmd == ""
    assert s.walltime_seconds() == ((24 + 2) * 60 + 3) * 60 + 4
    assert s.tunnel_lifetime() == s.walltime_seconds() + s.lifetime_margin  # type: ignore[operator]
    s.user_options = {"runtime": "30"}
    assert s.walltime_seconds() == 1800
    assert s.cmd_formatted_for_batch().split() == ["tunnelbot-job", "--credential", "-", "jupyterhub-singleuser"]
    with s._wrapped_cmd("tunnelbot-credential 1\nend\n"):
        line = s.cmd_formatted_for_batch()
        assert line.startswith("tunnelbot-job --credential - jupyterhub-singleuser <<'TUNNELBOT_CREDENTIAL_")
        assert "\ntunnelbot-credential 1\nend\n" in line
    assert s.cmd == ["jupyterhub-singleuser"]
    cases: Dict[str, object] = {
        "45": 2700, "10:30": 630, "2:00:00": 7200, "3-4": 273600, "1-0:30": 88200, "UNLIMITED": None, "": None,
    }
    for value, seconds in cases.items():
        assert parse_slurm_time(value) == seconds, value


def test_wrapper_is_on_path_and_is_posix_sh() -> None:
    installed = shutil.which("tunnelbot-job", path=os.path.dirname(sys.executable))
    assert installed, "pip did not put tunnelbot-job next to the venv's python"
    assert Path(installed).read_bytes() == WRAPPER.read_bytes() == (SOURCE_DIR / "tunnelbot-job").read_bytes()
    assert WRAPPER.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(WRAPPER)], timeout=30).returncode == 0
    if shutil.which("dash"):
        assert subprocess.run(["dash", "-n", str(WRAPPER)], timeout=30).returncode == 0


def test_no_insecure_host_key_setting_anywhere() -> None:
    insecure = re.compile(r"StrictHostKeyChecking\W*(no|off|accept-new)", re.IGNORECASE)
    files = [p for p in SOURCE_DIR.parent.rglob("*") if p.is_file() and p.suffix in {"", ".py", ".md", ".sh", ".toml"}]
    files = [p for p in files if "egg-info" not in str(p) and "/build/" not in str(p) and p.name != Path(__file__).name]
    assert any(p.name == "tunnelbot-job" for p in files)
    offenders = [str(p) for p in files if insecure.search(p.read_text(errors="replace"))]
    assert not offenders
    assert "-o StrictHostKeyChecking=yes" in WRAPPER.read_text()


def run_wrapper(env: Dict[str, str], *cmd: str) -> "subprocess.CompletedProcess[str]":
    base = {"PATH": os.environ["PATH"], "TMPDIR": env.pop("TMPDIR", "/tmp")}
    return subprocess.run(
        ["/bin/sh", str(WRAPPER), *cmd], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "TUNNELBOT_HOST is not set"),
        ({"TUNNELBOT_HOST": "h"}, "TUNNELBOT_KNOWN_HOSTS is not set"),
        ({"TUNNELBOT_HOST": "h", "TUNNELBOT_KNOWN_HOSTS": "k"}, "neither TUNNELBOT_KEY nor TUNNELBOT_KEY_FILE"),
        ({"TUNNELBOT_HOST": "h", "TUNNELBOT_KNOWN_HOSTS": "k", "TUNNELBOT_KEY": "x", "TUNNELBOT_SSH_PORT": "2x"},
         "not a number"),
        ({"TUNNELBOT_HOST": "h", "TUNNELBOT_KNOWN_HOSTS": "k", "TUNNELBOT_KEY": "x",
          "TUNNELBOT_SSH_OPTIONS": "ConnectTimeout=3 StrictHostKeyChecking=accept-new"}, "may not change host-key"),
    ],
)
def test_wrapper_refuses_bad_inputs(env: Dict[str, str], message: str) -> None:
    out = run_wrapper(dict(env), "true")
    assert out.returncode == 64
    assert message in out.stderr


def test_wrapper_needs_a_command() -> None:
    out = run_wrapper({}, )
    assert out.returncode == 64 and "usage" in out.stderr


def test_wrapper_hides_the_key_from_the_command_and_cleans_up(tmp_path: Path) -> None:
    # A stand-in ssh that records how it was called, so no server is needed here.
    fake = tmp_path / "fake-ssh"
    record = tmp_path / "ssh-args"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\nexec sleep 30\n')
    fake.chmod(0o755)
    work = tmp_path / "tmp"
    work.mkdir()
    env = {
        "TUNNELBOT_HOST": "127.0.0.1",
        "TUNNELBOT_KNOWN_HOSTS": "[127.0.0.1]:2222 ssh-ed25519 AAAA",
        "TUNNELBOT_KEY": "PRIVATE",
        "TUNNELBOT_SSH_PORT": "2222",
        "TUNNELBOT_SSH": str(fake),
        "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:0/user/alice/",
        "TMPDIR": str(work),
    }
    probe = (
        'while [ ! -s "' + str(record) + '" ]; do sleep 0.05; done; '
        'echo "key=${TUNNELBOT_KEY:-none} port=$TUNNELBOT_NB_PORT url=$JUPYTERHUB_SERVICE_URL"'
    )
    out = run_wrapper(env, "timeout", "20", "sh", "-c", probe)
    assert out.returncode == 0, out.stderr
    fields = dict(f.split("=", 1) for f in out.stdout.split())
    assert fields["key"] == "none"
    nb_port = int(fields["port"])
    assert 0 < nb_port < 65536
    assert fields["url"] == f"http://127.0.0.1:{nb_port}/user/alice/"
    args = record.read_text().split("\n")
    assert args[args.index("-R") + 1] == f"0:127.0.0.1:{nb_port}"
    assert "StrictHostKeyChecking=yes" in args and "BatchMode=yes" in args and "-N" in args
    assert args[-2:] == ["tunnelbot@127.0.0.1", ""] or args[-1] == "tunnelbot@127.0.0.1"
    assert list(work.iterdir()) == []  # key directory removed
