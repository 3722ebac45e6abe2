"""The credential bundle: rendered in Python, read by the real tunnelbot-job (with a stand-in ssh)."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conftest import WRAPPER
from tunnelbot_jupyterhub import BrokerError, Tunnel, heredoc, render_bundle
from tunnelbot_jupyterhub.credential import pin_known_hosts
from tunnelbot_jupyterhub.spawner import pin_known_hosts as spawner_pin_known_hosts

KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBfakeFAKEfakeFAKEfakeFAKEfakeFAKEfakeFAKEfakeAAAAA==\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)

TUNNEL = Tunnel(
    id="tb_0123abcd",
    user="alice",
    server_name="",
    port=20005,
    state="active",
    ssh_user="tunnelbot",
    ssh_host=None,
    ssh_port=2222,
    known_hosts="[*]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample\n",
    expires_at="2026-11-24T03:00:00Z",
    private_key=KEY,
)


def test_render_bundle_lays_out_every_field() -> None:
    bundle = render_bundle(TUNNEL, "hub.example.org", ["ProxyJump=login1", "RekeyLimit=1G 1h"], max_backoff=5)
    lines = bundle.splitlines()
    assert lines[0] == "tunnelbot-credential 1" and lines[-1] == "end" and bundle.endswith("end\n")
    assert "host=hub.example.org" in lines
    assert "ssh_port=2222" in lines and "ssh_user=tunnelbot" in lines
    assert "port=20005" in lines and "tunnel=tb_0123abcd" in lines
    assert "expires_at=1795489200" in lines  # 2026-11-24T03:00:00Z
    assert lines.index("ssh_option=ProxyJump=login1") < lines.index("ssh_option=RekeyLimit=1G 1h")
    assert "known_hosts=[hub.example.org]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample" in lines
    assert "max_backoff=5" in lines
    begin = lines.index("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert lines[begin:-1] == KEY.splitlines()


def test_render_bundle_without_expiry_or_options() -> None:
    bundle = render_bundle(dataclasses.replace(TUNNEL, expires_at=""), "10.0.0.1", [])
    assert "expires_at=" not in bundle and "ssh_option=" not in bundle and "max_" not in bundle


@pytest.mark.parametrize(
    "host, options, retry, message",
    [
        ("hub", ["StrictHostKeyChecking=ask"], {}, "host-key pinning"),
        ("hub", ["userknownhostsfile /tmp/x"], {}, "host-key pinning"),
        ("hub", ["ProxyJump=a\nHostKeyAlias=b"], {}, "not an ssh option"),
        ("hub", [""], {}, "not an ssh option"),
        ("-oProxyCommand=x", [], {}, "not a host name"),
        ("hub example", [], {}, "not a host name"),
        ("hub", [], {"max_backof": 3}, "unknown retry setting"),
        ("hub", [], {"max_backoff": 0}, "at least 1"),
        ("hub", [], {"max_attempts": True}, "at least 1"),
    ],
)
def test_render_bundle_refuses_what_the_wrapper_would(
    host: str, options: List[str], retry: Dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_bundle(TUNNEL, host, options, **retry)


def test_render_bundle_needs_a_key_and_never_shows_it() -> None:
    with pytest.raises(BrokerError, match="no private key"):
        render_bundle(dataclasses.replace(TUNNEL, private_key=None), "hub", [])
    with pytest.raises(BrokerError) as info:
        render_bundle(dataclasses.replace(TUNNEL, private_key="secret-not-pem"), "hub", [])
    assert "secret-not-pem" not in str(info.value)
    assert "PRIVATE KEY" not in repr(TUNNEL)


def test_pin_known_hosts_moved_but_still_importable_from_the_spawner() -> None:
    assert spawner_pin_known_hosts is pin_known_hosts
    assert pin_known_hosts("[*]:22 ssh-ed25519 A\n", "hub", 22) == "hub ssh-ed25519 A"


def test_heredoc_is_read_back_verbatim_by_sh() -> None:
    bundle = render_bundle(TUNNEL, "hub", ["ProxyCommand=nc $HOME `id` %h %p"])
    doc = heredoc(bundle)
    first, rest = doc.split("\n", 1)
    assert first.startswith("<<'TUNNELBOT_CREDENTIAL_") and first.endswith("'")
    delimiter = first[3:-1]
    assert rest == bundle + delimiter + "\n"
    assert heredoc(bundle) != doc  # a fresh delimiter each time
    out = subprocess.run(["/bin/sh", "-c", "cat " + doc + "echo after"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == bundle + "after\n"


class FakeSsh:
    """A stand-in ssh that records its arguments and copies of the files it was given, then waits."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "fake"
        self.dir.mkdir()
        self.path = self.dir / "ssh"
        self.path.write_text(
            "#!/bin/sh\n"
            f'd="{self.dir}"\n'
            'printf "%s\\n" "$@" > "$d/args.tmp"\n'
            'prev=\nfor a; do\n'
            '  [ "$prev" = -i ] && cp "$a" "$d/key"\n'
            '  case $a in UserKnownHostsFile=*) cp "${a#*=}" "$d/known_hosts" ;; esac\n'
            '  prev=$a\ndone\n'
            'tr "\\0" "\\n" < /proc/$$/environ > "$d/environ"\n'
            'mv "$d/args.tmp" "$d/args"\n'
            "exec sleep 30\n"
        )
        self.path.chmod(0o755)

    def args(self) -> List[str]:
        return (self.dir / "args").read_text().split("\n")[:-1]


def run_job(
    tmp: Path, fake: FakeSsh, wrapper_args: List[str], script: str, stdin: Optional[str] = None
) -> "subprocess.CompletedProcess[str]":
    """tunnelbot-job ARGS sh -c SCRIPT, where SCRIPT runs once the fake ssh has started."""
    work = tmp / "jobtmp"
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(work), "TUNNELBOT_SSH": str(fake.path)}
    wait = f'while [ ! -e "{fake.dir}/args" ]; do sleep 0.05; done; '
    out = subprocess.run(
        ["/bin/sh", str(WRAPPER), *wrapper_args, "timeout", "20", "sh", "-c", wait + script],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert list(work.iterdir()) == [], "the wrapper left its private directory behind"
    return out


def test_round_trip_through_a_batch_script_here_document(tmp_path: Path) -> None:
    fake = FakeSsh(tmp_path)
    bundle = render_bundle(TUNNEL, "127.0.0.1", ["ConnectTimeout=5", "RekeyLimit=1G 1h"], max_backoff=3)
    script = tmp_path / "job.sh"
    probe = 'read -r line; echo "stdin=${line:-eof} key=${TUNNELBOT_KEY:-none}"'
    script.write_text(
        "#!/bin/sh\n"
        f"exec /bin/sh {WRAPPER} --credential - timeout 20 sh -c '"
        f'while [ ! -e "{fake.dir}/args" ]; do sleep 0.05; done; {probe}\' '
        + heredoc(bundle)
    )
    work = tmp_path / "jobtmp"
    work.mkdir()
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(work), "TUNNELBOT_SSH": str(fake.path)}
    out = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # COMMAND reads /dev/null, not the rest of the script, and never sees the key.
    assert out.stdout == "stdin=eof key=none\n"
    assert "forwarding hub port 20005 (tunnel tb_0123abcd) to 127.0.0.1:" in out.stderr
    assert (fake.dir / "key").read_text() == KEY
    assert (fake.dir / "known_hosts").read_text() == (
        "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample\n"
    )
    args = fake.args()
    assert args[:4] == ["-o", "ConnectTimeout=5", "-o", "RekeyLimit=1G 1h"]
    assert args[-3:] == ["-p", "2222", "tunnelbot@127.0.0.1"]
    # The key is in no argument and no environment of anything the wrapper runs.
    secret = KEY.splitlines()[1]
    assert not any(secret in a for a in args)
    assert secret not in (fake.dir / "environ").read_text()
    assert list(work.iterdir()) == []


def bundle_file(tmp: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp / "credential"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_credential_file_and_move(tmp_path: Path) -> None:
    fake = FakeSsh(tmp_path)
    path = bundle_file(tmp_path, render_bundle(TUNNEL, "127.0.0.1", []))
    out = run_job(tmp_path, fake, ["--credential", str(path)], "echo ok")
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr
    assert path.exists(), "--credential leaves the file alone"
    assert (fake.dir / "key").read_text() == KEY

    (fake.dir / "args").unlink()
    out = run_job(tmp_path, fake, ["--credential-move", str(path)], f'[ -e "{path}" ] && echo there || echo gone')
    assert out.returncode == 0 and out.stdout == "gone\n", out.stderr


def run_refused(tmp: Path, args: List[str], stdin: Optional[str] = None) -> "subprocess.CompletedProcess[str]":
    work = tmp / "jobtmp"
    work.mkdir(exist_ok=True)
    out = subprocess.run(
        ["/bin/sh", str(WRAPPER), *args, "sh", "-c", "echo COMMAND-RAN"],
        env={"PATH": os.environ["PATH"], "TMPDIR": str(work), "TUNNELBOT_SSH": "/bin/false"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "COMMAND-RAN" not in out.stdout
    assert list(work.iterdir()) == []
    return out


GOOD = render_bundle(TUNNEL, "127.0.0.1", [])


def edit(drop: str = "", add: str = "") -> str:
    """GOOD without its lines starting with ``drop`` and with ``add`` before the key."""
    lines = [line for line in GOOD.splitlines() if not (drop and line.startswith(drop))]
    at = lines.index("-----BEGIN OPENSSH PRIVATE KEY-----") if "-----BEGIN OPENSSH PRIVATE KEY-----" in lines else 1
    if add:
        lines.insert(at, add)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "bundle, message",
    [
        (edit(drop="end"), "no 'end' line"),
        (GOOD.replace("end\n", ""), "no 'end' line"),
        ("", "the credential is empty"),
        ("TUNNELBOT_KEY=x\n" + GOOD, "does not start with 'tunnelbot-credential 1'"),
        (GOOD.replace("tunnelbot-credential 1", "tunnelbot-credential 2"), "does not start with"),
        (edit(drop="host="), "no host"),
        (edit(drop="ssh_port="), "no ssh_port"),
        (edit(drop="ssh_user="), "no ssh_user"),
        (edit(drop="known_hosts="), "no known_hosts line"),
        (edit(drop="-----"), "the credential holds no private key"),
        (edit(drop="-----END"), "no END line"),
        (edit(drop="ssh_port=", add="ssh_port=22x"), "not a number: 22x"),
        (edit(drop="ssh_port=", add="ssh_port=99999"), "out of range"),
        (edit(add="expires_at=soon"), "not a number: soon"),
        (edit(add="max_backoff=-1"), "not a number: -1"),
        (edit(add="max_attempts=0"), "max_attempts must be at least 1"),
        (edit(drop="host=", add="host=-oProxyCommand=evil"), "not a host name"),
        (edit(drop="ssh_user=", add="ssh_user=a b"), "not a user name"),
        (edit(add="ssh_option=StrictHostKeyChecking=yes"), "may not change host-key checking"),
        (edit(add="ssh_option=UserKnownHostsFile /dev/null"), "may not change host-key checking"),
        (edit(add="ssh_option=GLOBALKNOWNHOSTSFILE=/x"), "may not change host-key checking"),
        (GOOD.replace("-----BEGIN", "end\n-----BEGIN"), "holds no private key"),
    ],
)
def test_bad_bundles_are_refused(tmp_path: Path, bundle: str, message: str) -> None:
    out = run_refused(tmp_path, ["--credential", "-"], stdin=bundle)
    assert out.returncode == 64, out.stderr
    assert message in out.stderr
    assert "PRIVATE KEY" not in out.stderr and KEY.splitlines()[1] not in out.stderr


def test_comments_blank_lines_and_unknown_fields_are_ignored(tmp_path: Path) -> None:
    fake = FakeSsh(tmp_path)
    lines = GOOD.splitlines()
    noisy = [lines[0], "", "# a comment", "  lifetime_hint=3600", "host=127.0.0.1   # the broker"]
    noisy += [f"{line}\r" for line in lines[1:] if not line.startswith("host=")] + ["ignored after end"]
    out = run_job(tmp_path, fake, ["--credential", "-"], "echo ok", stdin="\n".join(noisy) + "\n")
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr
    assert fake.args()[-1] == "tunnelbot@127.0.0.1"
    assert (fake.dir / "key").read_text() == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_loose_credential_files_are_refused(tmp_path: Path, mode: int) -> None:
    path = bundle_file(tmp_path, GOOD, mode)
    out = run_refused(tmp_path, ["--credential", str(path)])
    assert out.returncode == 64 and "accessible to group or others" in out.stderr
    assert path.exists()
    out = run_refused(tmp_path, ["--credential-move", str(path)])
    assert out.returncode == 64 and not path.exists(), "a moved secret is deleted even when refused"


def test_credential_file_must_be_a_regular_file_of_ours(tmp_path: Path) -> None:
    path = bundle_file(tmp_path, GOOD)
    link = tmp_path / "link"
    link.symlink_to(path)
    out = run_refused(tmp_path, ["--credential", str(link)])
    assert out.returncode == 64 and "not a regular file" in out.stderr
    out = run_refused(tmp_path, ["--credential", str(tmp_path / "missing")])
    assert out.returncode == 64 and "not a regular file" in out.stderr
    out = run_refused(tmp_path, ["--credential-move", "-"])
    assert out.returncode == 64 and "needs a file" in out.stderr
    alone = subprocess.run(["/bin/sh", str(WRAPPER), "--credential"], capture_output=True, text=True, timeout=30)
    assert alone.returncode == 64 and "usage" in alone.stderr
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(path, 65534, 65534)
        out = run_refused(tmp_path, ["--credential", str(path)])
        assert out.returncode == 64 and "not owned by this user" in out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
