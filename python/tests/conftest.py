"""Shared fixtures: the real broker binary as a child process, and bounded waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

import pytest

T = TypeVar("T")

from tunnelbot_jupyterhub import job_wrapper_path

SOURCE_DIR = Path(__file__).resolve().parent.parent / "tunnelbot_jupyterhub"
# The installed copy: the tests exercise what pip put in place.
WRAPPER = job_wrapper_path()
# What pip put on the venv's PATH. Tests that run the wrapper as another user use this one: the
# venv is traversable by every user (scripts/test.sh sees to it), while the source tree that
# pytest may import the package from can sit under a private folder such as /root.
INSTALLED_WRAPPER = Path(sys.executable).parent / "tunnelbot-job"


def require(missing: str) -> None:
    """Skip a test whose requirement is `missing` ("" when met); under CI, fail it instead, so an
    end-to-end test can never pass in CI by not running."""
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {missing}")
        pytest.skip(missing)


def wait_for(
    check: Callable[[], Optional[T]],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Optional[Callable[[], str]] = None,
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds.

    ``detail`` is called on failure, so logs show what happened during the wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def stop_process(proc: "subprocess.Popen[bytes]", timeout: float = 10.0) -> Optional[int]:
    """TERM, then KILL after ``timeout``; by PID only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(root: int) -> Dict[int, str]:
    """{pid: command name} of every live process below ``root``."""
    parents: Dict[int, int] = {}
    names: Dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        head, tail = stat.rsplit(")", 1)
        fields = tail.split()
        if fields[0] == "Z":
            continue
        parents[int(entry.name)] = int(fields[1])
        names[int(entry.name)] = head.split("(", 1)[1]
    found: Dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = names[pid]
                frontier.append(pid)
    return found


def ssh_children(root: int) -> List[int]:
    return sorted(pid for pid, name in descendants(root).items() if name == "ssh")


def free_port() -> int:
    """A port the OS just handed out, for children that cannot take a bound socket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    """A bare HTTP/1.0 GET on 127.0.0.1; returns the whole response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Broker:
    proc: "subprocess.Popen[bytes]"
    dir: Path
    ssh_port: int
    admin_url: str
    token_file: Path
    log: Path

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_broker(
    binary: str,
    workdir: Path,
    chp: str = "",
    extra_env: Optional[Dict[str, str]] = None,
    public_host: str = "",
    ssh_port: int = 0,
    admin_port: int = 0,
    ssh_host: str = "127.0.0.1",
    sections: Optional[Dict[str, str]] = None,
    routes: str = "",
    bind_address: str = "127.0.0.1",
) -> Broker:
    """Run ``tunnelbot serve`` on 127.0.0.1 and wait (bounded) for its ready file.

    Ports 0 (the default) let the OS pick; a restart passes the ports (and ``workdir``, with the
    keys and state) of the broker it replaces. ``ssh_host``: where jobs dial in (a test's own
    namespace-facing address, for example). ``sections``: extra TOML lines per section
    (``{"ssh": 'trusted_user_ca_keys = "..."'}``). ``routes``: whole route tables (``[routes]``
    and its backend's), in place of the ``[chp]`` table ``chp`` makes. ``bind_address``: where
    hub ports listen (and, without a ``tunnels.public_host``, the host routes name).
    """
    more = {name: (lines.rstrip("\n") + "\n") for name, lines in (sections or {}).items()}
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "tunnelbot.toml"
    public = f'public_host = "{public_host}"\n' if public_host else ""
    chp_section = routes or (f'[chp]\nenabled = true\napi_url = "{chp}"\nreconcile_interval = "1s"\n' if chp else "[chp]\nenabled = false\n")
    config.write_text(
        f'keys_dir = "{workdir / "keys"}"\n'
        f'state_dir = "{workdir / "state"}"\n'
        "[ssh]\n"
        f'listen = "{ssh_host}:{ssh_port}"\n'
        f"{public}"
        f"{more.get('ssh', '')}"
        "[tunnels]\n"
        f'bind_address = "{bind_address}"\n'
        f"{more.get('tunnels', '')}"
        "[admin]\n"
        f'listen = "127.0.0.1:{admin_port}"\n'
        f"{more.get('admin', '')}"
        f"{chp_section}"
        # The default limits need ~30,700 descriptors; a test host's hard limit may be lower.
        "[limits]\n"
        "max_sessions = 1000\n"
    )
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)  # a restart must not read the last run's
    log = workdir / "broker.log"
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("RUST_LOG", "info")
    with open(log, "ab") as out:  # a restart appends to the same log
        proc = subprocess.Popen(
            [binary, "serve", "--config", str(config), "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def is_ready() -> Optional[Dict[str, str]]:
        if proc.poll() is not None:
            raise AssertionError(f"broker exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            data: Dict[str, str] = json.loads(ready.read_text())
        except (OSError, ValueError):  # not there yet, or half written
            return None
        return data if "ssh" in data and "admin" in data else None

    try:
        addrs = wait_for(is_ready, 30, "the broker's ready file")
    except BaseException:
        stop_process(proc)
        raise
    return Broker(
        proc=proc,
        dir=workdir,
        ssh_port=int(addrs["ssh"].rsplit(":", 1)[1]),
        admin_url="http://" + addrs["admin"],
        token_file=workdir / "keys" / "admin.token",
        log=log,
    )


@pytest.fixture(scope="session")
def tunnelbot_bin() -> str:
    binary = os.environ.get("TUNNELBOT_BIN", "")
    if not binary:
        require("TUNNELBOT_BIN is not set: point it at a built tunnelbot binary to run broker tests")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"TUNNELBOT_BIN={binary} is not an executable file")
    return binary


@pytest.fixture
def broker(tunnelbot_bin: str, tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tunnelbot_bin, tmp_path / "broker")
    try:
        yield b
    finally:
        stop_process(b.proc)


def python_http_server(directory: Path) -> List[str]:
    """A stand-in notebook: serves ``directory`` on 127.0.0.1:$TUNNELBOT_NB_PORT."""
    return [
        "/bin/sh",
        "-c",
        f'exec "{sys.executable}" -m http.server --bind 127.0.0.1 --directory "{directory}" "$TUNNELBOT_NB_PORT"',
    ]
