"""End to end: a real JupyterHub 6.1.1, CHP and broker; a browser-like client on CHP's port.

Needs CHP_BIN (configurable-http-proxy) and TUNNELBOT_BIN; JupyterHub and
jupyterhub-singleuser must be installed next to this Python. Select with ``-m e2e``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from conftest import Broker, descendants, free_port, pid_alive, start_broker, stop_process, wait_for

pytestmark = pytest.mark.e2e

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
    missing = _requirements()
    if missing:
        pytest.skip(missing)


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


@pytest.fixture
def stack(requirements: None, tunnelbot_bin: str, tmp_path: Path) -> Iterator[Stack]:
    import requests

    chp_token = secrets.token_hex(32)
    base_env = {**os.environ, "PATH": f"{BIN_DIR}:{os.environ['PATH']}", "CONFIGPROXY_AUTH_TOKEN": chp_token}
    procs: List[Proc] = []
    broker: Optional[Broker] = None
    ports: Dict[str, int] = {}

    def start_chp(attempt: int) -> Proc:
        ports.update(public=free_port(), api=free_port(), hub=free_port())
        p = launch(
            [
                os.environ["CHP_BIN"],
                "--ip", "127.0.0.1", "--port", str(ports["public"]),
                "--api-ip", "127.0.0.1", "--api-port", str(ports["api"]),
                "--error-target", f"http://127.0.0.1:{ports['hub']}/hub/error",
                "--log-level", "info",
            ],
            tmp_path / f"chp{attempt}.log",
            base_env,
            tmp_path,
        )
        procs.append(p)
        return p

    def chp_ready(p: Proc) -> bool:
        try:
            health = requests.get(f"http://127.0.0.1:{ports['public']}/_chp_healthz", timeout=2)
            api = requests.get(
                f"http://127.0.0.1:{ports['api']}/api/routes", headers={"Authorization": f"token {chp_token}"}, timeout=2
            )
        except requests.RequestException:
            return False
        return health.status_code == 200 and api.status_code == 200

    try:
        chp = start_until_ready("CHP", start_chp, chp_ready, 30)
        chp_api = f"http://127.0.0.1:{ports['api']}"
        broker = start_broker(tunnelbot_bin, tmp_path / "broker", chp=chp_api, extra_env={"CONFIGPROXY_AUTH_TOKEN": chp_token})

        username = pwd.getpwuid(os.geteuid()).pw_name  # LocalProcessSpawner runs jobs as this user
        password = secrets.token_hex(12)
        hub_dir = tmp_path / "hub"
        hub_dir.mkdir()
        (hub_dir / "notebooks").mkdir()
        (hub_dir / "notebooks" / "hello.txt").write_text("hello from the job")
        jupyter = hub_dir / "jupyter"

        def start_hub(attempt: int) -> Proc:
            if attempt:  # CHP's --error-target names the hub port; a new hub port is enough here
                ports["hub"] = free_port()
            config = hub_dir / "jupyterhub_config.py"
            config.write_text(
                "c = get_config()  # noqa\n"
                f"c.JupyterHub.bind_url = 'http://127.0.0.1:{ports['public']}/'\n"
                f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{ports['hub']}'\n"
                "c.ConfigurableHTTPProxy.should_start = False\n"
                f"c.ConfigurableHTTPProxy.api_url = '{chp_api}'\n"
                f"c.JupyterHub.db_url = 'sqlite:///{hub_dir}/jupyterhub.sqlite'\n"
                f"c.JupyterHub.cookie_secret_file = '{hub_dir}/cookie_secret'\n"
                "c.JupyterHub.authenticator_class = 'shared-password'\n"
                f"c.SharedPasswordAuthenticator.user_password = '{password}'\n"
                f"c.Authenticator.allowed_users = {{'{username}'}}\n"
                "c.JupyterHub.spawner_class = 'tunnelbot_jupyterhub.TunnelbotLocalProcessSpawner'\n"
                f"c.TunnelbotSpawnerMixin.broker_url = '{broker.admin_url}'\n"
                f"c.TunnelbotSpawnerMixin.broker_token_file = '{broker.token_file}'\n"
                "c.TunnelbotSpawnerMixin.ssh_host = '127.0.0.1'\n"
                f"c.Spawner.cmd = ['{BIN_DIR / 'jupyterhub-singleuser'}']\n"
                f"c.Spawner.notebook_dir = '{hub_dir / 'notebooks'}'\n"
                "c.Spawner.start_timeout = 60\n"
                "c.Spawner.http_timeout = 60\n"
                # Keep jupyter's runtime files out of the real home directory.
                f"c.Spawner.environment = {{'JUPYTER_RUNTIME_DIR': '{jupyter}/runtime', "
                f"'JUPYTER_DATA_DIR': '{jupyter}/data', 'JUPYTER_CONFIG_DIR': '{jupyter}/config', "
                f"'TMPDIR': '{hub_dir}'}}\n"
                + ("c.Spawner.args = ['--allow-root']\n" if os.geteuid() == 0 else "")
            )
            p = launch(
                [str(BIN_DIR / "jupyterhub"), "-f", str(config)], tmp_path / f"hub{attempt}.log", base_env, hub_dir
            )
            procs.append(p)
            return p

        def hub_ready(p: Proc) -> bool:
            try:  # through CHP: proves the hub registered its own route
                r = requests.get(f"http://127.0.0.1:{ports['public']}/hub/api/", timeout=2)
            except requests.RequestException:
                return False
            return r.status_code == 200

        hub = start_until_ready("JupyterHub", start_hub, hub_ready, 60)
        yield Stack(
            chp=chp,
            chp_port=ports["public"],
            chp_api=chp_api,
            chp_token=chp_token,
            broker=broker,
            hub=hub,
            hub_url=f"http://127.0.0.1:{ports['public']}",
            username=username,
            password=password,
        )
    finally:
        # The hub first: it stops the servers it spawned (cleanup_servers) while the broker still runs.
        for p in reversed(procs):
            if "hub" in p.log.name:
                stop_process(p.proc, timeout=30)
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


def test_jupyterhub_server_through_tunnelbot(stack: Stack) -> None:
    user = stack.username
    browser = BrowserLike(stack)
    browser.login()

    r = browser.hub_api("POST", f"/users/{user}/server")
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: (browser.server() or {}).get("ready"), 90, "the server to be ready", 0.2, detail=stack.logs)

    # Open a file on the server as a browser would: the hub's OAuth redirects end with the
    # server's own cookie.
    page = browser.session.get(f"{stack.hub_url}/user/{user}/files/hello.txt", timeout=30)
    assert page.status_code == 200 and page.text == "hello from the job", (page.status_code, page.url)
    assert any("/hub/api/oauth2/authorize" in h.url for h in page.history), page.history
    assert browser.status() == 200
    assert "last_activity" in browser.session.get(f"{stack.hub_url}/user/{user}/api/status", timeout=10).json()

    (tunnel,) = [t for t in stack.tunnels() if t["state"] == "active"]
    assert tunnel["user"] == user and tunnel["server_name"] == "" and tunnel["connected"]
    target = f"http://127.0.0.1:{tunnel['port']}"

    def route_target() -> Optional[str]:
        route = stack.routes().get(f"/user/{user}")
        return route.get("target") if route else None

    assert route_target() == target
    route = stack.routes()[f"/user/{user}"]
    assert route.get("jupyterhub") is True and route.get("user") == user and route.get("server_name") == ""
    wait_for(lambda: next(t for t in stack.tunnels() if t["id"] == tunnel["id"])["route"] == "registered", 15,
             "the broker to report its CHP route registered", detail=stack.logs)

    # The job's ssh dies: the wrapper reconnects on the same hub port and the URL works again.
    hub_pid = stack.hub.proc.pid
    (old_ssh,) = [pid for pid, name in descendants(hub_pid).items() if name == "ssh"]
    os.kill(old_ssh, signal.SIGKILL)

    def reconnected() -> bool:
        ssh = [pid for pid, name in descendants(hub_pid).items() if name == "ssh"]
        return bool(ssh) and old_ssh not in ssh and browser.status() == 200

    wait_for(reconnected, 60, "the job to reconnect and the server to answer again", 0.2, detail=stack.logs)
    again = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
    assert again["connected"] and again["port"] == tunnel["port"] and again["state"] == "active"
    wait_for(lambda: route_target() == target, 15, "the route to point at the same hub port", detail=stack.logs)

    # Stop the server: the route goes and the tunnel is revoked.
    jobs = list(descendants(hub_pid))
    r = browser.hub_api("DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: browser.server() is None, 60, "the server to stop", detail=stack.logs)
    wait_for(lambda: route_target() is None, 15, "the CHP route to go", detail=stack.logs)
    final = next(t for t in stack.tunnels() if t["id"] == tunnel["id"])
    assert final["state"] == "revoked" and not final["connected"]
    wait_for(lambda: not any(pid_alive(p) for p in jobs), 30, "the job's processes to exit")
    assert browser.status() != 200
