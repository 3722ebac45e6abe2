"""The real-JupyterHub harness the end-to-end tests share: CHP and JupyterHub processes on
OS-chosen ports, the hub's config lines every test writes, the stack's teardown, and a
browser-like client that logs in and talks to the hub and the server through CHP.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from conftest import Broker, free_port, require, stop_process, wait_for

BIN_DIR = Path(sys.executable).parent
STARTUP_ATTEMPTS = 5  # fresh ports after a collision with another process


def _requirements() -> str:
    if not os.environ.get("CHP_BIN"):
        return "CHP_BIN is not set (path to configurable-http-proxy 5.3.0)"
    try:
        import jupyterhub
        import requests  # noqa: F401  (a JupyterHub dependency)
    except ImportError as e:
        return f"JupyterHub is not installed in this Python ({e})"
    if not jupyterhub.__version__.startswith("6."):
        return f"JupyterHub 6 expected, found {jupyterhub.__version__}"
    for tool in ("jupyterhub", "jupyterhub-singleuser"):
        if not (BIN_DIR / tool).exists():
            return f"{tool} is not installed next to {sys.executable}"
    return ""


@pytest.fixture(scope="module")
def requirements() -> None:
    require(_requirements())


@dataclass
class Proc:
    proc: "subprocess.Popen[bytes]"
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def launch(cmd: List[str], log: Path, env: Dict[str, str], cwd: Path) -> Proc:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    return Proc(proc, log)


def start_until_ready(name: str, start: Callable[[int], Proc], ready: Callable[[Proc], bool], timeout: float) -> Proc:
    """Start a child on OS-chosen ports; when it dies of a port collision, try fresh ports."""
    for attempt in range(STARTUP_ATTEMPTS):
        p = start(attempt)

        def up() -> bool:
            if p.proc.poll() is not None:
                return True
            return ready(p)

        wait_for(up, timeout, f"{name} to be ready", interval=0.1, detail=p.text)
        if p.proc.poll() is None:
            return p
        if "EADDRINUSE" not in p.text() and "in use" not in p.text():
            raise AssertionError(f"{name} exited with {p.proc.returncode}:\n{p.text()}")
    raise AssertionError(f"{name}: ports kept colliding after {STARTUP_ATTEMPTS} attempts")


@dataclass
class Stack:
    chp: Proc
    chp_port: int
    chp_api: str
    chp_token: str
    broker: Broker
    hub: Proc
    hub_url: str
    username: str
    password: str

    def logs(self) -> str:
        return f"--- hub\n{self.hub.text()[-6000:]}\n--- broker\n{self.broker.log_text()[-4000:]}"

    def routes(self) -> Dict[str, Any]:
        import requests

        r = requests.get(self.chp_api + "/api/routes", headers={"Authorization": f"token {self.chp_token}"}, timeout=5)
        r.raise_for_status()
        data: Dict[str, Any] = r.json()
        return data

    def tunnels(self) -> List[Dict[str, Any]]:
        import requests

        r = requests.get(
            self.broker.admin_url + "/api/v1/tunnels", headers={"Authorization": f"Bearer {self.broker.token}"}, timeout=5
        )
        r.raise_for_status()
        return list(r.json()["tunnels"])


def hub_env(chp_token: str, **extra: str) -> Dict[str, str]:
    """The environment of CHP and the hub: this Python's tools first, CHP's API token."""
    return {**os.environ, "PATH": f"{BIN_DIR}:{os.environ['PATH']}", "CONFIGPROXY_AUTH_TOKEN": chp_token, **extra}


def start_chp(tmp_path: Path, env: Dict[str, str], procs: List[Proc], ports: Dict[str, int], hub_ip: str = "127.0.0.1") -> Proc:
    """CHP on fresh ``ports`` (public, api, and the hub port its --error-target names on
    ``hub_ip``); ready once its health check and its API (with the env's token) answer."""
    import requests

    token = env["CONFIGPROXY_AUTH_TOKEN"]

    def start(attempt: int) -> Proc:
        ports.update(public=free_port(), api=free_port(), hub=free_port())
        p = launch(
            [
                os.environ["CHP_BIN"],
                "--ip", "127.0.0.1", "--port", str(ports["public"]),
                "--api-ip", "127.0.0.1", "--api-port", str(ports["api"]),
                "--error-target", f"http://{hub_ip}:{ports['hub']}/hub/error",
                "--log-level", "info",
            ],
            tmp_path / f"chp{attempt}.log",
            env,
            tmp_path,
        )
        procs.append(p)
        return p

    def ready(p: Proc) -> bool:
        try:
            health = requests.get(f"http://127.0.0.1:{ports['public']}/_chp_healthz", timeout=2)
            api = requests.get(
                f"http://127.0.0.1:{ports['api']}/api/routes", headers={"Authorization": f"token {token}"}, timeout=2
            )
        except requests.RequestException:
            return False
        return health.status_code == 200 and api.status_code == 200

    return start_until_ready("CHP", start, ready, 30)


def hub_config(
    ports: Dict[str, int], chp_api: str, hub_dir: Path, username: str, password: str, hub_ip: str = "127.0.0.1"
) -> str:
    """The jupyterhub_config.py lines every test shares: addresses, CHP, database, login."""
    return (
        f"c.JupyterHub.bind_url = 'http://127.0.0.1:{ports['public']}/'\n"
        f"c.JupyterHub.hub_bind_url = 'http://{hub_ip}:{ports['hub']}'\n"
        "c.ConfigurableHTTPProxy.should_start = False\n"
        f"c.ConfigurableHTTPProxy.api_url = '{chp_api}'\n"
        f"c.JupyterHub.db_url = 'sqlite:///{hub_dir}/jupyterhub.sqlite'\n"
        f"c.JupyterHub.cookie_secret_file = '{hub_dir}/cookie_secret'\n"
        "c.JupyterHub.authenticator_class = 'shared-password'\n"
        f"c.SharedPasswordAuthenticator.user_password = '{password}'\n"
        f"c.Authenticator.allowed_users = {{'{username}'}}\n"
    )


class HubDir:
    """A hub's working folder: ``notebooks/hello.txt`` for the job to serve, the login (this
    process's user, which LocalProcessSpawner runs jobs as, and a fresh shared password), and
    where ``jupyterhub_config.py`` and ``JUPYTER_*`` state go."""

    def __init__(self, tmp_path: Path, hello: str = "hello from the job") -> None:
        self.path = tmp_path / "hub"
        (self.path / "notebooks").mkdir(parents=True)
        (self.path / "notebooks" / "hello.txt").write_text(hello)
        self.username = pwd.getpwuid(os.geteuid()).pw_name
        self.password = secrets.token_hex(12)
        self.jupyter = self.path / "jupyter"
        self.config = self.path / "jupyterhub_config.py"

    def job_lines(self) -> str:
        """The ``c.Spawner`` lines every LocalProcessSpawner test shares: the single-user server
        from this venv serving ``notebooks/``, generous start timeouts, jupyter's runtime files
        kept out of the real home, and ``--allow-root`` when the tests run as root."""
        j = self.jupyter
        return (
            f"c.Spawner.cmd = ['{BIN_DIR / 'jupyterhub-singleuser'}']\n"
            f"c.Spawner.notebook_dir = '{self.path / 'notebooks'}'\n"
            "c.Spawner.start_timeout = 60\nc.Spawner.http_timeout = 60\n"
            f"c.Spawner.environment = {{'JUPYTER_RUNTIME_DIR': '{j}/runtime', "
            f"'JUPYTER_DATA_DIR': '{j}/data', 'JUPYTER_CONFIG_DIR': '{j}/config', "
            f"'TMPDIR': '{self.path}'}}\n"
            + ("c.Spawner.args = ['--allow-root']\n" if os.geteuid() == 0 else "")
        )


def broker_lines(broker: Broker) -> str:
    """The ``jupyterhub_config.py`` lines that make our LocalProcessSpawner the hub's, pointed at
    ``broker``'s admin API, its jobs dialling the broker's SSH on 127.0.0.1."""
    return (
        "c.JupyterHub.spawner_class = 'tunnelbot_jupyterhub.TunnelbotLocalProcessSpawner'\n"
        f"c.TunnelbotSpawnerMixin.broker_url = '{broker.admin_url}'\n"
        f"c.TunnelbotSpawnerMixin.broker_token_file = '{broker.token_file}'\n"
        "c.TunnelbotSpawnerMixin.ssh_host = '127.0.0.1'\n"
    )


class HubRunner:
    """Runs ``jupyterhub -f config`` in ``hub_dir`` (logs hub1.log, hub2.log, ...).

    ``write_config``: writes the config from ``ports``; when given, a retry after a port
    collision picks a fresh hub port and writes the config again.
    """

    def __init__(
        self,
        config: Path,
        tmp_path: Path,
        env: Dict[str, str],
        procs: List[Proc],
        ports: Dict[str, int],
        write_config: Optional[Callable[[], None]] = None,
    ) -> None:
        self.config, self.tmp_path, self.env, self.procs, self.ports = config, tmp_path, env, procs, ports
        self.write_config = write_config
        self.launches = 0

    def start(self, attempt: int = 0) -> Proc:
        if self.write_config is not None:
            if attempt:  # CHP's --error-target names the hub port; a new hub port is enough here
                self.ports["hub"] = free_port()
            self.write_config()
        self.launches += 1
        p = launch(
            [str(BIN_DIR / "jupyterhub"), "-f", str(self.config)],
            self.tmp_path / f"hub{self.launches}.log",
            self.env,
            self.config.parent,
        )
        self.procs.append(p)
        return p

    def ready(self, p: Proc) -> bool:
        import requests

        try:  # through CHP: proves the hub registered its own route
            r = requests.get(f"http://127.0.0.1:{self.ports['public']}/hub/api/", timeout=2)
        except requests.RequestException:
            return False
        return r.status_code == 200

    def start_until_ready(self) -> Proc:
        return start_until_ready("JupyterHub", self.start, self.ready, 60)


def stop_hubs(procs: List[Proc]) -> None:
    """The hubs first: they stop the servers they spawned (cleanup_servers) while the broker still runs."""
    for p in reversed(procs):
        if "hub" in p.log.name:
            stop_process(p.proc, timeout=30)


def stop_rest(procs: List[Proc], broker: Optional[Broker]) -> None:
    """After stop_hubs: the broker, then every other process."""
    if broker is not None:
        stop_process(broker.proc)
    for p in procs:
        stop_process(p.proc)


class BrowserLike:
    """A requests session that does what a browser does: cookies, XSRF, redirects."""

    def __init__(self, stack: Stack) -> None:
        import requests

        self.stack = stack
        self.session = requests.Session()

    def xsrf(self, path: str = "/hub/") -> Dict[str, str]:
        for cookie in self.session.cookies:
            if cookie.name == "_xsrf" and cookie.path == path:
                return {"X-XSRFToken": cookie.value or ""}
        return {}

    def login(self) -> None:
        base = self.stack.hub_url
        assert self.session.get(base + "/hub/login", timeout=10).status_code == 200
        xsrf = self.xsrf()["X-XSRFToken"]
        r = self.session.post(
            base + "/hub/login?next=",
            data={"username": self.stack.username, "password": self.stack.password, "_xsrf": xsrf},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 302, r.text
        assert any(c.name.startswith("jupyterhub-session-id") or c.name == "jupyterhub-hub-login" for c in self.session.cookies)

    def hub_api(self, method: str, path: str, **kwargs: Any) -> Any:
        # As fetch() would: cookie auth, the XSRF header and Sec-Fetch-Mode: cors.
        headers = {**self.xsrf(), "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"}
        return self.session.request(method, self.stack.hub_url + "/hub/api" + path, headers=headers, timeout=30, **kwargs)

    def server(self) -> Optional[Dict[str, Any]]:
        r = self.hub_api("GET", f"/users/{self.stack.username}")
        assert r.status_code == 200, r.text
        servers: Dict[str, Any] = r.json().get("servers", {})
        return servers.get("")

    def start_server(self, detail: Callable[[], str]) -> None:
        """Starts the user's default server through the hub's API, as the spawn page's button
        does, and waits (bounded) until the hub says it is ready; `detail` names the logs to
        show on a timeout."""
        r = self.hub_api("POST", f"/users/{self.stack.username}/server")
        assert r.status_code in (201, 202), r.text
        wait_for(lambda: (self.server() or {}).get("ready"), 90, "the server to be ready", 0.2, detail=detail)

    def status(self) -> int:
        """GET /user/<name>/api/status through CHP's public port."""
        import requests

        user = self.stack.username
        try:
            r = self.session.get(
                f"{self.stack.hub_url}/user/{user}/api/status", headers=self.xsrf(f"/user/{user}/"), timeout=10
            )
        except requests.RequestException:
            return 0
        return int(r.status_code)


