#!/usr/bin/env python3
"""tunnelbot vs OpenSSH sshd, in one run, with the same stock `ssh` clients and backends.

Started by compare.sh (which installs the tools, raises `ulimit -n` and builds the broker);
Python 3 standard library only. Loopback (127.0.0.1 / ::1) only. Every process it starts is
tracked by PID and stopped at the end, on any exit path.

Figures (see docs/benchmark.md for the method and what limits each one):
  mem       server PSS (whole process tree, /proc/<pid>/smaps_rollup) per idle tunnel
  cpu       server CPU (utime+stime of the tree) per connect+auth+forward, 8 parallel clients
  setup     start of `ssh` -> "Allocated port" on its stderr, sequential, p50/p99
  wrk       wrk -t2 -c16 -d10s --latency against nginx (1 KiB file) through one tunnel
  bulk      iperf3 through one tunnel, 1 and 4 streams, per cipher: Gbit/s, server CPU s/GiB
  storm     K clients started at once: time until all forward, failures
"""

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

CLK = os.sysconf("SC_CLK_TCK")
KEX = "curve25519-sha256"
# As the job wrapper (python/tunnelbot_jupyterhub/tunnelbot-job) runs ssh: the client re-keys
# before the broker would (docs/benchmark.md, finding 2). Given to both servers' clients.
WRAPPER_REKEY_LIMIT = "512M 30m"
REKEY_LIMIT = WRAPPER_REKEY_LIMIT
ALLOC_RE = re.compile(rb"Allocated port (\d+) for remote forward")
GIB = 1 << 30
START = time.monotonic()


def log(*a):
    print("[%6.1fs]" % (time.monotonic() - START), *a, file=sys.stderr, flush=True)


class Abort(Exception):
    pass


# ----------------------------------------------------------------------------- deadline

class Deadline:
    """The whole run's time budget; every wait is bounded by it as well as by its own limit."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def bound(self, seconds):
        """min(seconds, time left); raises when the budget is spent."""
        left = self.left()
        if left <= 0:
            raise Abort("total time budget spent")
        return min(seconds, left)


DL = Deadline(3600)

# ----------------------------------------------------------------------------- processes

PROCS = []  # every Popen this driver started
PROCS_LOCK = threading.Lock()
PIDFILE = None  # "pid starttime" per line, so compare.sh can end leftovers if we die hard


def starttime(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            s = f.read()
        return s[s.rindex(b")") + 2:].split()[19].decode()
    except OSError:
        return None


def spawn(cmd, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.DEVNULL)
    p = subprocess.Popen(cmd, **kw)
    with PROCS_LOCK:
        PROCS.append(p)
        if PIDFILE is not None:
            st = starttime(p.pid)
            if st:
                PIDFILE.write("%d %s\n" % (p.pid, st))
                PIDFILE.flush()
    return p


def stop(procs, grace=3.0):
    """SIGTERM, wait up to `grace`, then SIGKILL; reaps them all. Only our own PIDs."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
    for p in procs:
        for f in (p.stdout, p.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
    with PROCS_LOCK:
        ids = {id(p) for p in procs}
        PROCS[:] = [p for p in PROCS if id(p) not in ids]


# ----------------------------------------------------------------------------- /proc

def read_stat(pid):
    """(ppid, utime+stime+cutime+cstime in ticks) or None when gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(b")") + 2:].split()
    return int(rest[1]), int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])


def own_cpu(pid):
    """CPU seconds of a single-threaded process (the ssh client), from /proc/<pid>/schedstat:
    nanoseconds, where /proc/<pid>/stat would round a 5 ms handshake down to 0 ticks."""
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def tree(root):
    """The PIDs of `root` and all its live descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = read_stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def proc_cpu(pid):
    """CPU seconds of one live process plus its reaped children. /proc/<pid>/stat counts in
    10 ms ticks *per process*, which rounds a 6 ms sshd session process down to 0; a
    single-threaded process is therefore read from its schedstat (ns). Reaped children's time
    (cutime+cstime) is accumulated by the kernel in ns and only the sum is rounded."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            s = f.read()
    except OSError:
        return 0.0
    rest = s[s.rindex(b")") + 2:].split()
    own = (int(rest[11]) + int(rest[12])) / CLK
    children = (int(rest[13]) + int(rest[14])) / CLK
    if int(rest[17]) == 1:  # num_threads
        try:
            with open("/proc/%d/schedstat" % pid) as f:
                own = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return own + children


def tree_cpu(root):
    """CPU seconds of the tree: each live process's own + its reaped children's. A child reaped
    by its parent moves into the parent's cutime/cstime, so nothing is counted twice."""
    return sum(proc_cpu(p) for p in tree(root))


def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle+iowait


def background_busy(seconds=1.0):
    """CPUs busy over `seconds` while this benchmark is idle: other people's work on the box."""
    t0, i0 = cpu_times()
    time.sleep(seconds)
    t1, i1 = cpu_times()
    return round((1 - (i1 - i0) / max(1, t1 - t0)) * (os.cpu_count() or 1), 2)


LOAD = {}


def note_load(phase):
    LOAD[phase] = background_busy()
    if LOAD[phase] > 0.3:
        log("note: %.2f CPUs busy with other work before %s" % (LOAD[phase], phase))


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(root):
    pids = tree(root)
    return sum(pss_kib(p) for p in pids), len(pids)


# ----------------------------------------------------------------------------- helpers

def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_port(preferred):
    for p in list(preferred) + list(range(17000, 17999)):
        if port_free(p):
            return p
    raise Abort("no free loopback port")


def wait_port(port, seconds):
    end = time.monotonic() + DL.bound(seconds)
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Abort("nothing listening on 127.0.0.1:%d after %.0fs" % (port, seconds))


def pct(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(q / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def run_out(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip()
    except Exception as e:  # noqa: BLE001 (informational only)
        return "?(%s)" % e


# ----------------------------------------------------------------------------- profiling

TB_ENV = {}  # --tb-env KEY=VALUE: extra environment for the broker (A/B experiments)
PERF_DIR = None  # --perf DIR: perf record the broker during the cpu, wrk, bulk and storm phases


class Perf:
    """`perf record` (cpu-clock: works where the hardware cycles event is not exposed) on one
    PID for the duration of a with-block; no-op unless --perf was given."""

    def __init__(self, server, label):
        self.p = None
        if PERF_DIR is None or not isinstance(server, Tunnelbot):
            return
        out = os.path.join(PERF_DIR, re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".data")
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", str(server.pid),
               "-o", out]
        if os.environ.get("PERF_CALLGRAPH"):
            cmd[2:2] = ["--call-graph", os.environ["PERF_CALLGRAPH"]]
        self.p = spawn(cmd, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            stop([self.p])


# ----------------------------------------------------------------------------- ssh clients

class Client:
    """One stock `ssh -N -R 0:127.0.0.1:<backend>` client."""

    def __init__(self, server, slot, backend, cipher=None, kex=KEX, gated=False):
        cmd = ["ssh", "-F", "/dev/null", "-N", "-T", "-i", server.key(slot),
               "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
               "-o", "ExitOnForwardFailure=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null"]
        if kex:
            cmd += ["-o", "KexAlgorithms=" + kex]
        if REKEY_LIMIT:
            cmd += ["-o", "RekeyLimit=" + REKEY_LIMIT]
        if cipher:
            cmd += ["-c", cipher]
        cmd += ["-R", "0:127.0.0.1:%d" % backend, "tunnelbot@127.0.0.1", "-p", str(server.port)]
        self.buf = b""
        self.port = None
        self.t_alloc = None
        self.cpu_at_alloc = None
        self.t0 = time.perf_counter()
        if gated:
            # Started now, but waits for release(): the storm measures the clients connecting
            # at once, not how fast this driver can fork 1,000 processes on a busy machine.
            cmd = ["sh", "-c", 'read _; exec "$0" "$@" </dev/null'] + cmd
            self.p = spawn(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        else:
            self.p = spawn(cmd, stderr=subprocess.PIPE)
        self.fd = self.p.stderr.fileno()

    def release(self):
        self.t0 = time.perf_counter()
        try:
            self.p.stdin.write(b"\n")
            self.p.stdin.close()
        except (OSError, ValueError):
            pass

    def feed(self, data):
        self.buf += data
        m = ALLOC_RE.search(self.buf)
        if m and self.port is None:
            self.t_alloc = time.perf_counter()
            self.port = int(m.group(1))
            self.cpu_at_alloc = own_cpu(self.p.pid)
        return self.port

    def wait_alloc(self, seconds):
        """Blocks until "Allocated port" (returns the port) or exit/timeout (returns None)."""
        end = time.monotonic() + seconds
        while self.port is None:
            left = end - time.monotonic()
            if left <= 0:
                return None
            sel = selectors.DefaultSelector()
            sel.register(self.fd, selectors.EVENT_READ)
            ev = sel.select(timeout=left)
            sel.close()
            if not ev:
                continue
            data = os.read(self.fd, 65536)
            if not data:
                return None
            self.feed(data)
        return self.port

    def drain(self):
        """Reads whatever the client wrote to stderr since, without blocking."""
        for _ in range(100):
            sel = selectors.DefaultSelector()
            sel.register(self.fd, selectors.EVENT_READ)
            ev = sel.select(timeout=0)
            sel.close()
            if not ev:
                return
            data = os.read(self.fd, 65536)
            if not data:
                return
            self.buf += data

    def error(self):
        lines = [l for l in self.buf.decode(errors="replace").splitlines()
                 if "Permanently added" not in l]
        return " | ".join(lines[-2:]) or "no output"

    @property
    def setup_ms(self):
        return (self.t_alloc - self.t0) * 1000.0


def mem_available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 1 << 30


MIN_FREE_MIB = 1536  # stop starting clients below this: the machine must stay usable


def connect_many(server, slots, backend, concurrency, seconds):
    """Starts one client per slot, at most `concurrency` still handshaking at once (None: all at
    once: every client is started first, held at a gate, then all are released together);
    returns (connected clients, failed clients, wall seconds to the last allocation)."""
    todo = list(slots)
    inflight = {}
    ok, failed = [], []
    sel = selectors.DefaultSelector()
    connect_many.launched_s = None
    if concurrency is None:
        held = [Client(server, slot, backend, gated=True) for slot in todo]
        todo = []
        t0 = time.perf_counter()
        for c in held:
            c.release()
            inflight[c.fd] = c
            sel.register(c.fd, selectors.EVENT_READ, c)
        connect_many.launched_s = time.perf_counter() - t0
    t0 = held[0].t0 if concurrency is None and held else time.perf_counter()
    last = t0
    end = time.monotonic() + DL.bound(seconds)
    try:
        while (todo or inflight) and time.monotonic() < end:
            while todo and (concurrency is None or len(inflight) < concurrency):
                if len(ok) % 200 == 199 and mem_available_mib() < MIN_FREE_MIB:
                    log("%s: only %d MiB available; starting no more clients"
                        % (server.name, mem_available_mib()))
                    todo = []
                    break
                c = Client(server, todo.pop(0), backend)
                inflight[c.fd] = c
                sel.register(c.fd, selectors.EVENT_READ, c)
            for key, _ in sel.select(timeout=0.2):
                c = key.data
                try:
                    data = os.read(c.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(c.fd)
                    del inflight[c.fd]
                    failed.append(c)
                elif c.feed(data) is not None:
                    sel.unregister(c.fd)
                    del inflight[c.fd]
                    ok.append(c)
                    last = max(last, c.t_alloc)
    finally:
        for c in inflight.values():
            failed.append(c)
        sel.close()
    return ok, failed, last - t0


def stop_clients(clients):
    stop([c.p for c in clients], grace=5.0)


# ----------------------------------------------------------------------------- servers

class OpenSSH:
    name = "openssh"

    def __init__(self, work, port):
        self.dir = os.path.join(work, "openssh")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)  # the tunnelbot user must read authorized_keys (StrictModes)
        self.port = port
        hk = os.path.join(self.dir, "ssh_host_ed25519_key")
        ck = os.path.join(self.dir, "client_key")
        for k in (hk, ck):
            if not os.path.exists(k):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], check=True)
        with open(ck + ".pub") as f:
            pub = f.read().strip()
        ak = os.path.join(self.dir, "authorized_keys")
        with open(ak, "w") as f:
            f.write('restrict,port-forwarding,permitlisten="localhost:*" %s\n' % pub)
        os.chmod(ak, 0o644)
        self.client_key = ck
        self.conf = os.path.join(self.dir, "sshd_config")
        with open(self.conf, "w") as f:
            f.write("\n".join([
                "# Generated by benches/compare/driver.py: the baseline of shared/notes/baseline.md",
                "Port %d" % port,
                "ListenAddress 127.0.0.1",
                "HostKey %s" % hk,
                "PidFile none",
                "AuthorizedKeysFile %s" % ak,
                "AllowUsers tunnelbot",
                "AuthenticationMethods publickey",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "AllowTcpForwarding remote",
                "PermitOpen none",
                "GatewayPorts no",
                "PermitTTY no",
                "X11Forwarding no",
                "AllowAgentForwarding no",
                "AllowStreamLocalForwarding no",
                "ForceCommand /bin/false",
                "MaxStartups 4096",
                "ClientAliveInterval 30",
                "",
            ]))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        r = subprocess.run(["/usr/sbin/sshd", "-t", "-f", self.conf], capture_output=True, text=True)
        if r.returncode != 0:
            raise Abort("sshd -t: " + r.stderr.strip())
        self.logf = open(os.path.join(self.dir, "sshd.log"), "wb")
        self.proc = spawn(["/usr/sbin/sshd", "-D", "-e", "-f", self.conf], stderr=self.logf)
        self.pid = self.proc.pid
        wait_port(port, 10)
        log("openssh: sshd pid %d on 127.0.0.1:%d" % (self.pid, port))

    def key(self, slot):
        return self.client_key

    def settle(self, seconds=15):
        """Waits until only the listening sshd is left (every session process gone)."""
        end = time.monotonic() + DL.bound(seconds)
        while time.monotonic() < end:
            if len(tree(self.pid)) <= 1:
                return True
            time.sleep(0.1)
        return False

    def close(self):
        stop([self.proc], grace=3)
        # Per-connection sshd processes setsid() and outlive the listener; end ours by PID.
        for pid in tree(self.pid)[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.logf.close()


class Tunnelbot:
    name = "tunnelbot"

    def __init__(self, work, binary, port, admin_port, ports, unauthenticated=2000):
        self.dir = os.path.join(work, "tunnelbot")
        os.makedirs(os.path.join(self.dir, "clientkeys"), exist_ok=True)
        self.port = port
        self.conf = os.path.join(self.dir, "tunnelbot.toml")
        with open(self.conf, "w") as f:
            f.write("\n".join([
                "# Generated by benches/compare/driver.py",
                'keys_dir = "%s"' % os.path.join(self.dir, "keys"),
                'state_dir = "%s"' % os.path.join(self.dir, "state"),
                "[ssh]",
                'listen = "127.0.0.1:%d"' % port,
                "[tunnels]",
                'bind_address = "127.0.0.1"',
                'ports = "%s"' % ports,
                'max_ttl = "1d"',
                "[admin]",
                'listen = "127.0.0.1:%d"' % admin_port,
                "[limits]",
                "max_sessions = 20000",
                # Every benchmark client dials from 127.0.0.1: one source, as a whole cluster
                # behind one NAT would be. Room for the whole storm at once; OpenSSH's side has
                # no such bound. (The broker refuses a config whose descriptors cannot fit.)
                "max_unauthenticated = %d" % unauthenticated,
                "max_unauthenticated_per_source = %d" % unauthenticated,
                "[chp]",
                "enabled = false",
                "",
            ]))
        ready = os.path.join(self.dir, "ready.json")
        if os.path.exists(ready):
            os.unlink(ready)
        self.logf = open(os.path.join(self.dir, "tunnelbot.log"), "wb")
        env = dict(os.environ, **TB_ENV)
        self.proc = spawn([binary, "serve", "--config", self.conf, "--ready-file", ready],
                          stderr=self.logf, cwd=self.dir, env=env)
        self.pid = self.proc.pid
        end = time.monotonic() + DL.bound(20)
        while not os.path.exists(ready) or os.path.getsize(ready) == 0:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise Abort("tunnelbot did not become ready; see %s" % self.logf.name)
            time.sleep(0.05)
        time.sleep(0.05)
        with open(ready) as f:
            r = json.load(f)
        self.admin = r["admin"]
        with open(os.path.join(self.dir, "keys", "admin.token")) as f:
            self.token = f.read().strip()
        self.keys = []
        self.issue_seconds = 0.0
        log("tunnelbot: pid %d, ssh %s, admin %s" % (self.pid, r["ssh"], self.admin))

    def _issue_range(self, first, count, out):
        host, port = self.admin.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in range(first, first + count):
            body = json.dumps({"user": "bench%05d" % i, "ttl_seconds": 86400})
            conn.request("POST", "/api/v1/tunnels", body=body, headers={
                "Authorization": "Bearer " + self.token, "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 201:
                raise Abort("issue: HTTP %d %s" % (resp.status, data[:200]))
            t = json.loads(data)
            path = os.path.join(self.dir, "clientkeys", "k%05d" % i)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(t["private_key"])
            out[i] = path
        conn.close()

    def issue(self, total, threads=4):
        """Issues credentials until `total` exist (one per client slot)."""
        have = len(self.keys)
        if total <= have:
            return
        need = total - have
        out = {}
        t0 = time.perf_counter()
        per = (need + threads - 1) // threads
        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            futs = [ex.submit(self._issue_range, have + k * per, min(per, need - k * per), out)
                    for k in range(threads) if need - k * per > 0]
            for f in futs:
                f.result(timeout=DL.bound(600))
        self.issue_seconds += time.perf_counter() - t0
        self.keys += [out[i] for i in range(have, total)]
        log("tunnelbot: %d credentials issued in %.1fs" % (need, time.perf_counter() - t0))

    def key(self, slot):
        return self.keys[slot]

    def metric(self, name):
        host, port = self.admin.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.split()[-1])
        return None

    def settle(self, seconds=15):
        end = time.monotonic() + DL.bound(seconds)
        while time.monotonic() < end:
            try:
                if self.metric("tunnelbot_ssh_sessions_active") == 0:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def close(self):
        stop([self.proc], grace=8)
        self.logf.close()


# ----------------------------------------------------------------------------- backends

class Nginx:
    def __init__(self, work, port):
        d = os.path.join(work, "nginx")
        os.makedirs(os.path.join(d, "www"), exist_ok=True)
        with open(os.path.join(d, "www", "1k.bin"), "wb") as f:
            f.write(os.urandom(1024))
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write("""# Generated by benches/compare/driver.py
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
    }}
}}
""".format(d=d, port=port))
        self.port = port
        self.proc = spawn(["nginx", "-c", conf, "-p", d], stderr=subprocess.DEVNULL)
        wait_port(port, 10)
        log("nginx: pid %d on 127.0.0.1:%d" % (self.proc.pid, port))


class Iperf:
    def __init__(self, port):
        self.port = port
        self.proc = spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, 10)
        log("iperf3 server: pid %d on 127.0.0.1:%d" % (self.proc.pid, port))


def http_get(port, timeout=10):
    """One GET of the 1 KiB file through 127.0.0.1:port; None when fine, else what went wrong."""
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /1k.bin HTTP/1.0\r\nHost: x\r\n\r\n")
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
    except OSError as e:
        return "port %d: %s after %d bytes" % (port, e, len(data))
    if data.startswith(b"HTTP/1.1 200") and len(data) > 1024:
        return None
    return "port %d: got %r" % (port, data[:40])


# ----------------------------------------------------------------------------- phases

def phase_memory(servers, nginx, ns, verify):
    """PSS of the server tree at N connected idle tunnels, N increasing, minus idle."""
    res = {}
    for s in servers:
        s.settle()
        time.sleep(1.0)
        idle, nproc = tree_pss(s.pid)
        r = {"idle_kib": idle, "points": []}
        if isinstance(s, Tunnelbot):
            r["idle_before_issue_kib"] = s.idle_before_issue_kib
            r["credential_kib"] = (idle - s.idle_before_issue_kib) / max(1, s.issued_at_idle)
            r["credentials_issued"] = s.issued_at_idle
        clients = []
        try:
            for n in ns:
                if isinstance(s, Tunnelbot) and n > len(s.keys):
                    raise Abort("not enough credentials for %d tunnels" % n)
                have = len(clients)
                ok, failed, wall = connect_many(s, range(have, n), nginx.port, 32,
                                                seconds=max(60, n * 0.2))
                clients += ok
                if failed:
                    log("%s mem: %d of %d clients failed (%s)" % (
                        s.name, len(failed), n - have, failed[0].error()))
                    stop_clients(failed)
                time.sleep(2.0)  # let every session finish its post-auth work
                pss, nproc = tree_pss(s.pid)
                per = (pss - idle) / max(1, len(clients))
                sample = clients[:: max(1, len(clients) // 50)]
                pt = {"n": n, "connected": len(clients), "pss_kib": pss, "processes": nproc,
                      "per_tunnel_kib": per, "connect_wall_s": wall,
                      "ssh_client_pss_kib_each": sum(pss_kib(c.p.pid) for c in sample)
                      / max(1, len(sample)),
                      "mem_available_mib": mem_available_mib()}
                log("%s mem: %d tunnels, tree PSS %.1f MiB in %d processes, %.1f KiB/tunnel"
                    % (s.name, len(clients), pss / 1024, nproc, per))
                res.setdefault(s.name, r)["points"].append(pt)
            if verify:
                ports = [c.port for c in clients]
                with concurrent.futures.ThreadPoolExecutor(16) as ex:
                    errs = [e for e in ex.map(http_get, ports, timeout=DL.bound(300)) if e]
                r["verified"] = len(ports) - len(errs)
                r["verify_errors"] = errs[:5]
                log("%s mem: one request through each of %d tunnels: %d OK %s"
                    % (s.name, len(ports), len(ports) - len(errs), errs[:3]))
        finally:
            stop_clients(clients)
        res[s.name] = r
    return res


def phase_setup(servers, backend, count, kex, first_slot):
    res = {}
    for s in servers:
        s.settle()
        lat, fails = [], 0
        for i in range(count):
            c = Client(s, first_slot + i, backend, kex=kex)
            if c.wait_alloc(DL.bound(30)) is None:
                fails += 1
            else:
                lat.append(c.setup_ms)
            stop([c.p], grace=5)
        r = {"n": len(lat), "failures": fails}
        if lat:
            r.update(p50_ms=statistics.median(lat), p99_ms=pct(lat, 99), min_ms=min(lat),
                     max_ms=max(lat), all_ms=[round(x, 1) for x in lat])
        res[s.name] = r
        log("%s setup (kex %s): p50 %.1f ms, p99 %.1f ms, %d failed" % (
            s.name, kex or "default", r.get("p50_ms", -1), r.get("p99_ms", -1), fails))
    return res


UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(text):
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["req_s"] = float(m.group(1))
    for q in ("50", "99"):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\b" % q, text, re.M)
        if m:
            r["p%s_ms" % q] = float(m.group(1)) * UNIT[m.group(2)]
    m = re.search(r"Socket errors: (.*)", text)
    if m:
        r["socket_errors"] = m.group(1).strip()
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["non_2xx"] = int(m.group(1))
    return r


def run_wrk(port, seconds):
    cmd = ["wrk", "-t2", "-c16", "-d%ds" % seconds, "--latency",
           "http://127.0.0.1:%d/1k.bin" % port]
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=DL.bound(seconds + 30))
    finally:
        stop([p])
    return parse_wrk(out.decode(errors="replace")), out.decode(errors="replace")


def merge(runs):
    """Median of every numeric field over repeats; other fields from the first run."""
    errors = [r["error"] for r in runs if r and "error" in r]
    runs = [r for r in runs if r and "error" not in r]
    if not runs:
        return {"error": errors[0]} if errors else {}
    out = dict(runs[0])
    if errors:
        out["errors"] = errors
    for k, v in runs[0].items():
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))
                and not isinstance(r.get(k), bool)]
        if vals and isinstance(v, (int, float)):
            out[k] = statistics.median(vals)
    if len(runs) > 1:
        out["repeats"] = len(runs)
    return out


def order(servers, rep):
    """Alternate which server goes first on each repeat."""
    return list(servers) if rep % 2 == 0 else list(reversed(servers))


def phase_wrk(servers, nginx, seconds, slot, repeats):
    runs = {"direct": []}
    for rep in range(repeats):
        r, _ = run_wrk(nginx.port, seconds)
        runs["direct"].append(r)
        log("wrk direct: %.0f req/s, p50 %.2f ms, p99 %.2f ms" % (
            r.get("req_s", 0), r.get("p50_ms", -1), r.get("p99_ms", -1)))
        for s in order(servers, rep):
            s.settle()
            c = Client(s, slot, nginx.port)
            try:
                if c.wait_alloc(DL.bound(30)) is None:
                    runs.setdefault(s.name, []).append({"error": c.error()})
                    continue
                http_get(c.port)  # warm up: the first channel open
                c0, cc0 = tree_cpu(s.pid), own_cpu(c.p.pid)
                with Perf(s, "wrk%d" % rep):
                    r, raw = run_wrk(c.port, seconds)
                cpu = tree_cpu(s.pid) - c0
                r["ssh_client_busy"] = (own_cpu(c.p.pid) - cc0) / seconds
                r["server_busy"] = cpu / seconds
                n = r.get("req_s", 0) * seconds
                r["server_cpu_s"] = cpu
                r["server_us_per_req"] = cpu / n * 1e6 if n else None
                runs.setdefault(s.name, []).append(r)
                log("wrk via %s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, server %.1f us CPU/req, "
                    "CPUs busy: server %.2f, ssh client %.2f %s"
                    % (s.name, r.get("req_s", 0), r.get("p50_ms", -1), r.get("p99_ms", -1),
                       r["server_us_per_req"] or -1, r["server_busy"], r["ssh_client_busy"],
                       r.get("socket_errors", "")))
            finally:
                stop([c.p], grace=5)
    return {k: merge(v) for k, v in runs.items()}


def _run_iperf(port, seconds, streams, reverse):
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams),
           "-J", "--connect-timeout", "5000"]
    if reverse:
        cmd.append("-R")
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=DL.bound(seconds + 30))
    finally:
        stop([p])
    try:
        j = json.loads(out)
    except ValueError:
        return {"error": out.decode(errors="replace")[-300:]}
    if "error" in j:
        return {"error": j["error"]}
    recv = j["end"]["sum_received"]
    return {"bytes": recv["bytes"], "gbit_s": recv["bits_per_second"] / 1e9,
            "seconds": recv["seconds"]}


def phase_bulk(servers, iperf, seconds, matrix, slot, repeats):
    """matrix: list of (cipher, streams, reverse). reverse=True: job -> hub (iperf3 -R)."""
    res = []
    for cipher, streams, reverse in matrix:
        row = {"cipher": cipher, "streams": streams,
               "direction": "job->hub" if reverse else "hub->job"}
        runs = {}
        for rep in range(repeats):
            for s in order(servers, rep):
                s.settle()
                c = Client(s, slot, iperf.port, cipher=cipher)
                try:
                    if c.wait_alloc(DL.bound(30)) is None:
                        runs.setdefault(s.name, []).append({"error": c.error()})
                        log("bulk %s via %s: %s" % (cipher, s.name, c.error()))
                        continue
                    c0, cc0 = tree_cpu(s.pid), own_cpu(c.p.pid)
                    with Perf(s, "bulk_%s_x%d_%s_%d" % (cipher.split("@")[0], streams,
                                                        row["direction"][:3], rep)):
                        r = _run_iperf(c.port, seconds, streams, reverse)
                    if "error" in r:
                        # Keep the evidence: what the job's ssh client said, then one retry
                        # on a fresh tunnel (counted, and reported as a failure in the JSON).
                        time.sleep(0.5)
                        c.drain()
                        row.setdefault("failures", []).append({
                            "server": s.name, "iperf3": r["error"],
                            "ssh_client_alive": c.p.poll() is None,
                            "ssh_client_stderr": c.error()})
                        log("bulk %s x%d via %s FAILED: iperf3: %s; ssh client %s: %s" % (
                            cipher, streams, s.name, r["error"],
                            "alive" if c.p.poll() is None else "exited %s" % c.p.returncode,
                            c.error()))
                        stop([c.p], grace=5)
                        s.settle()
                        c = Client(s, slot, iperf.port, cipher=cipher)
                        if c.wait_alloc(DL.bound(30)) is None:
                            continue
                        c0, cc0 = tree_cpu(s.pid), own_cpu(c.p.pid)
                        r = _run_iperf(c.port, seconds, streams, reverse)
                    cpu, ccpu = tree_cpu(s.pid) - c0, own_cpu(c.p.pid) - cc0
                    if "bytes" in r and r["bytes"]:
                        gib = r["bytes"] / GIB
                        r["server_cpu_s"] = cpu
                        r["server_s_per_gib"] = cpu / gib
                        r["client_s_per_gib"] = ccpu / gib
                    runs.setdefault(s.name, []).append(r)
                    log("bulk %s x%d %s via %s: %.2f Gbit/s, server %.2f s/GiB, ssh client "
                        "%.2f s/GiB %s" % (cipher, streams, row["direction"], s.name,
                                           r.get("gbit_s", 0), r.get("server_s_per_gib", -1),
                                           r.get("client_s_per_gib", -1), r.get("error", "")))
                finally:
                    stop([c.p], grace=5)
        for name, v in runs.items():
            row[name] = merge(v)
        res.append(row)
    return res


def phase_storm(servers, backend, k, seconds):
    res = {}
    for s in servers:
        s.settle(30)
        time.sleep(1.0)
        c0 = tree_cpu(s.pid)
        ok, failed, wall = [], [], 0.0
        try:
            with Perf(s, "storm"):
                ok, failed, wall = connect_many(s, range(k), backend, None, seconds)
            cpu = tree_cpu(s.pid) - c0
            ccpu = sum(c.cpu_at_alloc or 0 for c in ok)
            lat = [c.setup_ms for c in ok]
            r = {"clients": k, "forwarding": len(ok), "failures": k - len(ok),
                 "all_forwarding_s": wall if len(ok) == k else None,
                 "last_forwarding_s": wall, "server_cpu_s": cpu,
                 "client_cpu_s": ccpu, "setup_p50_ms": statistics.median(lat) if lat else None,
                 "setup_max_ms": max(lat) if lat else None,
                 "released_within_s": connect_many.launched_s,
                 "errors": sorted({c.error() for c in failed})[:3]}
        finally:
            stop_clients(ok + failed)
        res[s.name] = r
        log("%s storm: %d/%d forwarding, last after %.1fs, server CPU %.1fs, clients %.1fs %s"
            % (s.name, len(ok), k, wall, cpu, ccpu, r["errors"][:1]))
    return res


# ----------------------------------------------------------------------------- report

def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v, nd=1):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return "{:,.0f}".format(v)
    return ("{:.%df}" % nd).format(v)


def verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def report(R, args):
    rows = []  # (figure, openssh, tunnelbot, ratio, target, verdict)

    def add(what, o, t, target, ok, nd=1, rat=True):
        rows.append((what, fmt(o, nd), fmt(t, nd), fmt(ratio(t, o), 2) if rat else "", target,
                     verdict(ok)))

    m = R.get("memory", {})
    o_pts = {p["n"]: p for p in m.get("openssh", {}).get("points", [])}
    t_pts = {p["n"]: p for p in m.get("tunnelbot", {}).get("points", [])}
    cred = m.get("tunnelbot", {}).get("credential_kib")
    for n in sorted(set(o_pts) | set(t_pts)):
        o = o_pts.get(n, {}).get("per_tunnel_kib")
        t = t_pts.get(n, {}).get("per_tunnel_kib")
        add("memory per idle tunnel, KiB (N=%s)" % fmt(n, 0), o, t, "≤ 64 KiB",
            None if t is None else t <= 64)
        if t is not None and cred is not None:
            add("  same, plus its credential + reserved port", o, t + cred, "≤ 64 KiB",
                t + cred <= 64)
    if cred is not None:
        add("memory per issued credential (not connected), KiB", None, cred, "", None,
            rat=False)
    held = m.get("tunnelbot", {}).get("verified")
    if held is not None:
        nmax = max(t_pts) if t_pts else 0
        oh = m.get("openssh", {}).get("verified")
        onmax = max(o_pts) if o_pts else 0
        if nmax >= 10000:
            target, ok = "10,000", held >= 10000
        elif R.get("big_note"):
            target, ok = "10,000 (N capped by ulimit -n here)", None
        else:
            target, ok = "all of N (10,000 with --big)", held == nmax
        add("tunnels held, one request through each (OpenSSH of %s, tunnelbot of %s)"
            % (fmt(onmax, 0), fmt(nmax, 0)), oh, held, target, ok, nd=0, rat=False)
    c = R.get("cpu", {})
    if c:
        o = c.get("openssh", {}).get("ms_per_handshake")
        t = c.get("tunnelbot", {}).get("ms_per_handshake")
        add("server CPU per handshake, ms (%d parallel)" % args.par, o, t, "≤ 1 ms",
            None if t is None else t <= 1.0, nd=2)
        o = c.get("openssh", {}).get("per_second")
        t = c.get("tunnelbot", {}).get("per_second")
        add("handshakes/s in that run (client-bound)", o, t, "", None)
    for key, label in (("setup", "setup, curve25519"), ("setup_default_kex", "setup, default kex")):
        s = R.get(key, {})
        if not s:
            continue
        o50 = s.get("openssh", {}).get("p50_ms")
        t50 = s.get("tunnelbot", {}).get("p50_ms")
        r = ratio(t50, o50)
        add("%s p50, ms" % label, o50, t50, "≤ 0.4× OpenSSH" if key == "setup" else "",
            (None if r is None else r <= 0.4) if key == "setup" else None)
        add("%s p99, ms" % label, s.get("openssh", {}).get("p99_ms"),
            s.get("tunnelbot", {}).get("p99_ms"), "", None)
    w = R.get("wrk", {})
    if w:
        o, t = w.get("openssh", {}), w.get("tunnelbot", {})
        r = ratio(t.get("req_s"), o.get("req_s"))
        add("small requests, req/s (direct: %s)" % fmt(w.get("direct", {}).get("req_s"), 0),
            o.get("req_s"), t.get("req_s"), "≥ 5× OpenSSH", None if r is None else r >= 5, nd=0)
        add("small requests p50, ms", o.get("p50_ms"), t.get("p50_ms"), "", None, nd=2)
        add("small requests p99, ms", o.get("p99_ms"), t.get("p99_ms"), "≤ 2 ms",
            None if t.get("p99_ms") is None else t["p99_ms"] <= 2.0, nd=2)
        add("server CPU per small request, µs", o.get("server_us_per_req"),
            t.get("server_us_per_req"), "", None)
    for row in R.get("bulk", []):
        o, t = row.get("openssh", {}), row.get("tunnelbot", {})
        what = "%s ×%d %s" % (row["cipher"].split("@")[0], row["streams"], row["direction"])
        r = ratio(t.get("server_s_per_gib"), o.get("server_s_per_gib"))
        add("bulk %s: server CPU s/GiB" % what, o.get("server_s_per_gib"),
            t.get("server_s_per_gib"), "≤ 1.0× OpenSSH", None if r is None else r <= 1.0, nd=2)
        add("bulk %s: Gbit/s" % what, o.get("gbit_s"), t.get("gbit_s"), "", None, nd=2)
    fails = [f for row in R.get("bulk", []) for f in row.get("failures", [])]
    if R.get("bulk"):
        nf = {n: sum(1 for f in fails if f["server"] == n) for n in ("openssh", "tunnelbot")}
        add("bulk runs where the tunnel failed mid-test (retried)", nf["openssh"],
            nf["tunnelbot"], "0", nf["tunnelbot"] == 0, nd=0, rat=False)
    st = R.get("storm", {})
    if st:
        o, t = st.get("openssh", {}), st.get("tunnelbot", {})
        k = t.get("clients") or o.get("clients")
        big = k >= 1000
        add("storm of %s: s until all forwarding" % fmt(k, 0), o.get("all_forwarding_s"),
            t.get("all_forwarding_s"), "≤ 10 s" + ("" if big else " at 1,000 (--storm 1000)"),
            None if not big else (t.get("all_forwarding_s") is not None and
                                  t["all_forwarding_s"] <= 10), nd=2)
        add("storm of %s: failures" % fmt(k, 0), o.get("failures"), t.get("failures"), "0",
            None if t.get("failures") is None else t["failures"] == 0, nd=0, rat=False)
        add("storm of %s: server CPU s" % fmt(k, 0), o.get("server_cpu_s"), t.get("server_cpu_s"), "",
            None, nd=2)
        add("storm of %s: ssh clients' CPU s" % fmt(k, 0), o.get("client_cpu_s"), t.get("client_cpu_s"),
            "", None, nd=2, rat=False)
    lines = ["| figure | OpenSSH | tunnelbot | ratio tb/OpenSSH | target | |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append("| %s |" % " | ".join(r))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read()
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "aes_ni": " aes " in flags,
        "mem_gib": round(int(mem) / 1048576, 1), "kernel": platform.release(),
        "openssh": run_out(["ssh", "-V"]), "nginx": run_out(["nginx", "-v"]),
        "wrk": run_out(["wrk", "-v"]).splitlines()[0] if run_out(["wrk", "-v"]) else "?",
        "iperf3": run_out(["iperf3", "-v"]).splitlines()[0],
        "os": run_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="tunnelbot binary")
    ap.add_argument("--work", required=True, help="scratch directory (must not be world-writable "
                    "up to /: sshd's StrictModes checks the authorized_keys path)")
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--quick", action="store_true", help="≤ 2 minutes: small N, short runs")
    ap.add_argument("--big", action="store_true",
                    help="also 10,000 tunnels (tunnelbot only; see docs/benchmark.md)")
    ap.add_argument("--storm", type=int, default=None, help="clients in the storm (default 200)")
    ap.add_argument("--only", default="mem,cpu,setup,wrk,bulk,storm",
                    help="comma list of phases to run")
    ap.add_argument("--budget", type=float, default=None, help="hard time limit, seconds")
    ap.add_argument("--sshd-port", type=int, default=2222)
    ap.add_argument("--tb-port", type=int, default=2223)
    ap.add_argument("--tb-ports", default=None,
                    help="tunnelbot [tunnels] ports (default: sized to the largest phase)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="repeat wrk and bulk runs (server order alternates); medians reported")
    ap.add_argument("--par", type=int, default=8, help="parallel clients in the CPU phase")
    ap.add_argument("--commit", default="?")
    ap.add_argument("--bulk", default=None, metavar="CIPHER:STREAMS:job|hub,...",
                    help="bulk matrix instead of the default, e.g. chacha20:4:job,aes256:1:hub "
                    "(job: job->hub, iperf3 -R; hub: hub->job)")
    ap.add_argument("--rekey-limit", default=WRAPPER_REKEY_LIMIT, metavar="'SIZE TIME'",
                    help="the clients' RekeyLimit (default: the job wrapper's %(default)s); "
                    "'default' leaves OpenSSH's own, so the servers start re-keys (A/B of finding 2)")
    ap.add_argument("--tb-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the broker, e.g. GLIBC_TUNABLES=... (A/B tests)")
    ap.add_argument("--perf", default=None, metavar="DIR",
                    help="perf record the broker in the cpu, wrk, bulk and storm phases into DIR")
    args = ap.parse_args()

    global DL, REKEY_LIMIT
    REKEY_LIMIT = None if args.rekey_limit == "default" else args.rekey_limit
    quick = args.quick
    ns = [50] if quick else [100, 1000]
    openssh_ns = list(ns)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    big_note = None
    if args.big:
        # The broker holds 2 descriptors per connected tunnel (its reserved listener and the SSH
        # socket) plus its own ~20; the driver one per client.
        big = 10000
        # The broker's start-up check counts every port of its range (N + 201, see tb_ports),
        # as many sessions, the unauthenticated room, the admin cap (64) and 64 of its own.
        unauth = (args.storm or 200) + 100
        if 2 * (big + 201) + unauth + 128 > nofile:
            big = max(1000, ((nofile - unauth - 128) // 2 - 201) // 100 * 100)
            big_note = ("ulimit -n is %d here and cannot be raised (no CAP_SYS_RESOURCE): "
                        "N capped at %d instead of 10,000" % (nofile, big))
            log("note:", big_note)
        ns = ns + [big]
    storm = args.storm or (100 if quick else 200)
    hs = 150 if quick else 500
    setup_n = 20 if quick else 50
    wrk_s = 5 if quick else 10
    ipf_s = 5 if quick else 10
    if quick:
        matrix = [("aes256-gcm@openssh.com", 1, True), ("chacha20-poly1305@openssh.com", 1, True)]
    else:
        matrix = [(c, n, True) for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                         "chacha20-poly1305@openssh.com") for n in (1, 4)]
        matrix += [(c, 1, False) for c in ("aes256-gcm@openssh.com",
                                           "chacha20-poly1305@openssh.com")]
    if args.repeats is None:
        args.repeats = 1 if quick else 2
    if args.bulk:
        short = {"aes128": "aes128-gcm@openssh.com", "aes256": "aes256-gcm@openssh.com",
                 "chacha20": "chacha20-poly1305@openssh.com"}
        matrix = []
        for item in args.bulk.split(","):
            c, n, dirn = item.split(":")
            matrix.append((short.get(c, c), int(n), dirn == "job"))
    budget = args.budget or (150 if quick else 900) + (1200 if args.big else 0) + \
        (max(0, storm - 200) * 0.3) + (args.repeats - 1) * (len(matrix) * 2 + 3) * (ipf_s + 3)
    DL = Deadline(budget)
    phases = set(args.only.split(","))

    need_fd = 2 * max(ns + [storm]) + 100
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need_fd:
        raise SystemExit("ulimit -n is %d, need about %d (compare.sh raises it; run as root)"
                         % (resource.getrlimit(resource.RLIMIT_NOFILE)[0], need_fd))

    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    global PIDFILE, PERF_DIR
    for kv in args.tb_env:
        k, _, v = kv.partition("=")
        TB_ENV[k] = v
    if args.perf:
        PERF_DIR = os.path.abspath(args.perf)
        os.makedirs(PERF_DIR, exist_ok=True)
    PIDFILE = open(os.path.join(args.work, "pids"), "a")
    R = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "machine": machine(), "commit": args.commit,
         "mode": "quick" if quick else ("big" if args.big else "default"),
         "tunnelbot_env": TB_ENV, "nofile": nofile, "big_note": big_note,
         "client_rekey_limit": REKEY_LIMIT or "OpenSSH default",
         "params": {"n": ns, "openssh_n": openssh_ns, "handshakes": hs, "parallel": args.par,
                    "setup": setup_n, "repeats": args.repeats, "wrk_s": wrk_s, "iperf_s": ipf_s, "storm": storm,
                    "kex": KEX, "budget_s": budget}}
    log("machine:", R["machine"])
    servers = []
    try:
        for p in (args.sshd_port, args.tb_port):
            if not port_free(p):
                raise Abort("port %d is taken" % p)
        nginx = Nginx(args.work, pick_port([18080]))
        iperf = Iperf(pick_port([15201]))
        osh = OpenSSH(args.work, args.sshd_port)
        # A port per client slot and a little more: the broker refuses a range whose listeners
        # (plus sessions and unauthenticated room) cannot fit the descriptor limit.
        tb_ports = args.tb_ports or "21000-%d" % (21000 + max(ns + [storm]) + 200)
        tb = Tunnelbot(args.work, os.path.abspath(args.bin), args.tb_port,
                       pick_port([18090]), tb_ports, unauthenticated=storm + 100)
        servers = [osh, tb]
        time.sleep(1.0)
        tb.idle_before_issue_kib = tree_pss(tb.pid)[0]
        # One credential per client slot: the most any phase holds at once, plus the slots the
        # sequential phases use (setup uses fresh ones; cpu, wrk and bulk use their own).
        pool = max(ns + [storm]) if phases & {"mem", "storm"} else 0
        slot_cpu = pool
        slot_setup = slot_cpu + args.par
        slot_one = slot_setup + 2 * setup_n
        tb.issue(slot_one + 1)
        tb.issued_at_idle = len(tb.keys)
        R["issue_per_s"] = len(tb.keys) / tb.issue_seconds if tb.issue_seconds else None

        if "mem" in phases:
            note_load("mem")
            R["memory"] = phase_memory([osh], nginx, openssh_ns, verify=True)
            R["memory"].update(phase_memory([tb], nginx, ns, verify=True))
        if "cpu" in phases:
            note_load("cpu")
            R["cpu"] = phase_cpu(servers, nginx.port, hs, args.par, slot_cpu)
        if "setup" in phases:
            note_load("setup")
            R["setup"] = phase_setup(servers, nginx.port, setup_n, KEX, slot_setup)
            if not quick:
                R["setup_default_kex"] = phase_setup(servers, nginx.port, setup_n, None,
                                                     slot_setup + setup_n)
        if "wrk" in phases:
            note_load("wrk")
            R["wrk"] = phase_wrk(servers, nginx, wrk_s, slot_one, args.repeats)
        if "bulk" in phases:
            note_load("bulk")
            R["bulk"] = phase_bulk(servers, iperf, ipf_s, matrix, slot_one, args.repeats)
        if "storm" in phases:
            note_load("storm")
            R["storm"] = phase_storm(servers, nginx.port, storm, max(60, storm * 0.25))
    except (Abort, KeyboardInterrupt) as e:
        R["aborted"] = str(e) or type(e).__name__
        log("ABORTED:", R["aborted"])
    finally:
        for s in servers:
            try:
                s.close()
            except Exception as e:  # noqa: BLE001
                log("closing %s: %s" % (s.name, e))
        with PROCS_LOCK:
            rest = list(PROCS)
        stop(rest, grace=3)
    R["elapsed_s"] = time.monotonic() - START
    R["background_busy_cpus"] = LOAD
    table = report(R, args)
    m = R["machine"]
    head = ["# tunnelbot vs OpenSSH, %s (%s mode, %.0f s)" % (R["date"], R["mode"], R["elapsed_s"]),
            "",
            "Machine: %d × %s (AES-NI: %s), %s GiB, kernel %s, %s; %s; commit %s" % (
                m["nproc"], m["cpu"], "yes" if m["aes_ni"] else "no", m["mem_gib"], m["kernel"],
                m["os"], m["openssh"].split(",")[0], R["commit"]),
            "Parameters: %s" % json.dumps(R["params"]),
            "Other work on the machine (CPUs busy, sampled 1 s before each phase): %s" % (
                ", ".join("%s %.2f" % kv for kv in LOAD.items()) or "n/a"), ""]
    if R.get("big_note"):
        head += ["Note: " + R["big_note"], ""]
    if R.get("aborted"):
        head += ["**Run aborted: %s** (figures below are partial)" % R["aborted"], ""]
    md = "\n".join(head) + table + "\n"
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if R.get("aborted") else 0


def phase_cpu(servers, backend, count, par, first):
    """Server CPU per connect+auth+forward (then disconnect), `par` clients in parallel, each
    worker on its own credential (slots first..first+par-1), reconnecting sequentially."""
    res = {}
    for s in servers:
        res.update(_cpu_one(s, backend, count, par, first))
    return res


def _cpu_one(s, backend, count, par, first):
    s.settle()
    time.sleep(0.5)
    c0 = tree_cpu(s.pid)
    state = {"done": 0, "fail": 0, "client": 0.0}
    lock = threading.Lock()
    t0 = time.perf_counter()

    def worker(slot):
        for _ in range(count * 2):  # bounded even if everything fails
            with lock:
                if state["done"] + state["fail"] >= count:
                    return
                state["done"] += 1
            c = Client(s, slot, backend)
            ok = c.wait_alloc(DL.bound(30)) is not None
            with lock:
                if not ok:
                    state["done"] -= 1
                    state["fail"] += 1
                elif c.cpu_at_alloc is not None:
                    state["client"] += c.cpu_at_alloc
            stop([c.p], grace=5)

    with Perf(s, "cpu"), concurrent.futures.ThreadPoolExecutor(par) as ex:
        for f in [ex.submit(worker, first + i) for i in range(par)]:
            f.result(timeout=DL.bound(600))
    wall = time.perf_counter() - t0
    s.settle()
    time.sleep(0.5)
    cpu = tree_cpu(s.pid) - c0
    n = state["done"]
    r = {"handshakes": n, "failures": state["fail"], "server_cpu_s": cpu,
         "ms_per_handshake": cpu / max(1, n) * 1000, "wall_s": wall, "per_second": n / wall,
         "client_ms_per_handshake": state["client"] / max(1, n) * 1000}
    log("%s cpu: %d handshakes (%d failed) in %.1fs, server %.2f ms CPU each, ssh client %.1f ms"
        % (s.name, n, state["fail"], wall, r["ms_per_handshake"], r["client_ms_per_handshake"]))
    return {s.name: r}


def _on_signal(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sys.exit(main())
