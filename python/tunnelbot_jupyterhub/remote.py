"""Notebooks on a host the user picks, started over SSH, optionally in a container.

The hub logs in to the chosen host as the user (``ssh -i <user's key>``, host keys checked
against the admin's known_hosts) and starts, detached in its own session and process group::

    tunnelbot-job --credential-move FILE <runtime> exec --bind <paths> <image> jupyterhub-singleuser

The remote command line carries no secret. The SSH session's stdin carries two documents:
a small launch script (the notebook's environment, including its hub API token, and the
command) and the tunnel's credential bundle. The remote side writes both into fresh 0600
files (``mktemp``) with shell builtins only, starts the script with ``setsid`` and prints
its pid; the script deletes itself, and the wrapper deletes the bundle file at once. The
notebook comes back through the broker, so the hub never connects to the remote host's
notebook port: only to its SSH port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import ipaddress
import os
import re
import secrets
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from jupyterhub.spawner import Spawner
from traitlets import Float, Integer, List as ListTrait, TraitError, Unicode, default, validate

from .broker import BrokerClient, Tunnel

from .credential import HOST_KEY_OPTIONS
from .spawner import TunnelbotSpawnerMixin, describe_exit

__all__ = [
    "RemoteHost",
    "TunnelbotRemoteSpawner",
    "UnknownHostKey",
    "parse_hosts",
    "validate_bind",
]

_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})$")
# Letters, digits and a few punctuation marks that no shell treats specially. (No nested
# quantifiers: these see user input, and must not backtrack exponentially.)
_PATH = re.compile(r"^/[A-Za-z0-9._@+=/-]*$")
_RELATIVE_PATH = re.compile(r"^[A-Za-z0-9._@+=-]+(?:/[A-Za-z0-9._@+=-]+)*$")
_USERNAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_BIND_OPTIONS = {"ro", "rw"}
_PID_LINE = re.compile(r"^tunnelbot-pid (\d+)$", re.M)
_EXIT_LINE = re.compile(r"^tunnelbot-remote: tunnelbot-job exited with status (\d+)$", re.M)


def _alive(pid: int) -> str:
    """A shell function ``alive``: does process group ``pid`` (also its session) have a live member?

    ``kill -0`` alone counts a zombie nobody has reaped yet; ps (where it understands
    ``-s``) tells those apart. Where ps cannot answer, the group counts as alive.
    """
    return (
        f"alive() {{ kill -0 -{pid} 2>/dev/null || return 1; "
        f"st=$(ps -o stat= -s {pid} 2>/dev/null) || return 0; "
        "printf '%s\\n' \"$st\" | grep -q '^ *[^Z ]'; }"
    )


class UnknownHostKey(RuntimeError):
    """ssh refused the remote host's key: it is not (or differently) in the admin's known_hosts."""


@dataclass(frozen=True)
class RemoteHost:
    """One entry of ``remote_hosts``: the name users see and the address ssh dials."""

    name: str
    address: str


def _valid_address(value: str) -> bool:
    if _HOSTNAME.match(value):
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def parse_hosts(spec: str, warn: Callable[[str], None]) -> List[RemoteHost]:
    """``"name1:addr1,name2:,:addr3"``: a name, an address, or both, comma-separated.

    A missing name is the address; a missing address is the name. Invalid entries and
    repeated names are skipped with a warning; the first valid entry is the default.
    """
    hosts: List[RemoteHost] = []
    seen = set()
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, address = entry.partition(":")
        name, address = name.strip(), address.strip()
        if not sep:
            address = name
        name = name or address
        address = address or name
        if not name or not _HOSTNAME.match(name) or not _valid_address(address):
            warn(f"tunnelbot: remote_hosts entry {entry!r} is not name:address with a valid name or address; skipped")
            continue
        if name in seen:
            warn(f"tunnelbot: remote_hosts entry {entry!r} repeats the name {name!r}; skipped")
            continue
        seen.add(name)
        hosts.append(RemoteHost(name, address))
    return hosts


def _safe_path(value: str) -> bool:
    return bool(_PATH.match(value)) and ".." not in value.split("/")


def validate_bind(value: str) -> str:
    """A container bind ``SRC[:DST[:ro|rw]]`` with absolute, plain paths; raises ValueError."""
    parts = value.split(":")
    if len(parts) > 3 or not all(_safe_path(p) for p in parts[:2]) or (
        len(parts) == 3 and parts[2] not in _BIND_OPTIONS
    ):
        raise ValueError(
            f"bind path {value!r} refused: use /absolute/path[:/path/in/container[:ro|rw]] "
            "with letters, digits and . _ - + = @ only"
        )
    return value


def _split_binds(value: Any) -> List[str]:
    if isinstance(value, str):
        items = re.split(r"[\s,]+", value)
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        if len(items) == 1:  # a form field that arrived as a one-item list
            items = re.split(r"[\s,]+", items[0])
    else:
        raise ValueError("bind paths must be a string or a list of strings")
    return [validate_bind(item) for item in items if item]


def _single(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError("expected a single value")
        value = value[0]
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _check_options(proposal: Dict[str, Any]) -> List[str]:
    options: List[str] = list(proposal["value"])
    for option in options:
        if not option or any(c.isspace() for c in option):
            raise TraitError(f"ssh option {option!r} must be one word like Name=value")
        if option.split("=", 1)[0].lower() in HOST_KEY_OPTIONS:
            raise TraitError(f"ssh option {option!r} would weaken host-key checking")
    return options


class TunnelbotRemoteSpawner(TunnelbotSpawnerMixin, Spawner):
    """Starts the notebook on a host the user picks, over SSH, reached through tunnelbot.

    The hub needs only SSH to the remote hosts; the notebook comes back through the broker.
    """

    remote_hosts = Unicode(
        "",
        help="""The hosts users may pick, as "name1:address1,name2:,:address3": a name, an
        address, or both. A missing name is the address and a missing address the name.
        Invalid entries are skipped with a warning; the first valid entry is the default.""",
    ).tag(config=True)

    remote_port = Integer(22, help="The remote hosts' SSH port.").tag(config=True)

    known_hosts_file = Unicode(
        "",
        help="""known_hosts file with the remote hosts' SSH host keys, kept by the admin
        (required). Host-key checking is always strict: a host whose key is not in this file
        is refused.""",
    ).tag(config=True)

    home_root = Unicode(
        "/home",
        help="The directory holding the users' home directories on the hub, for ssh_identity's {home_root}.",
    ).tag(config=True)

    ssh_identity = Unicode(
        "{home_root}/{username}/.ssh/id_ed25519",
        help="""The private key the hub logs in with. {username} and {home_root} are filled
        in: by default each user's own key. A path without {username} is one service
        identity for everybody (then set remote_user to the service account).""",
    ).tag(config=True)

    remote_user = Unicode(
        "{username}",
        help="The login name on the remote host; {username} is the JupyterHub user's name.",
    ).tag(config=True)

    remote_ssh_command = Unicode("ssh", help="The OpenSSH client the hub runs.").tag(config=True)

    remote_ssh_options = ListTrait(
        Unicode(),
        help="""Extra ssh options for the hub's logins to the remote hosts, each passed as
        `-o OPTION`, e.g. ["ProxyJump=gateway"]. Host-key options are refused.""",
    ).tag(config=True)

    @validate("remote_ssh_options")
    def _validate_remote_ssh_options(self, proposal: Dict[str, Any]) -> List[str]:
        return _check_options(proposal)

    remote_connect_timeout = Integer(10, help="ssh's ConnectTimeout for the hub's logins, seconds.").tag(config=True)

    remote_command_timeout = Float(
        30.0,
        help="""Seconds one remote command (launch, check, stop) may take. A check that
        times out counts as "unknown", never as the server being gone.""",
    ).tag(config=True)

    remote_log = Unicode(
        ".tunnelbot/jupyterhub{servername}.log",
        help="""The notebook's log on the remote host, created 0600 (its directory 0700).
        Relative paths are under the remote home directory. {username} and {servername}
        ("-" + the server name for named servers, else empty) are filled in.""",
    ).tag(config=True)

    container_runtime = Unicode(
        "apptainer",
        help="""The container runtime on the remote hosts: "apptainer", "singularity" or a
        path to either. Empty: no container, the command runs directly.""",
    ).tag(config=True)

    container_image = Unicode("", help="The image the notebook runs in (a path on the remote host).").tag(
        config=True
    )

    container_binds = ListTrait(
        Unicode(),
        help="""Bind paths every container gets, "/src[:/dst[:ro|rw]]"; users can add
        more in the spawn form.""",
    ).tag(config=True)

    @validate("container_binds")
    def _validate_container_binds(self, proposal: Dict[str, Any]) -> List[str]:
        try:
            return [validate_bind(b) for b in proposal["value"]]
        except ValueError as e:
            raise TraitError(str(e)) from None

    stop_timeout = Integer(
        15,
        help="Seconds the remote process group gets after TERM before it is sent KILL.",
    ).tag(config=True)

    # Persisted through get_state/load_state: a restarted hub checks the same process.
    remote_host = Unicode("")
    remote_address = Unicode("")
    remote_pid = Integer(0)

    _remote_starting: bool = False

    @default("options_form")
    def _default_options_form(self) -> Callable[[Spawner], str]:
        return TunnelbotRemoteSpawner._render_form

    @default("options_from_form")
    def _default_options_from_form(self) -> Callable[[Dict[str, List[str]]], Dict[str, Any]]:
        return self._read_form

    # -- hosts and the form -------------------------------------------------------------

    def hosts(self) -> List[RemoteHost]:
        return parse_hosts(self.remote_hosts, self.log.warning)

    @staticmethod
    def _render_form(spawner: Spawner) -> str:
        assert isinstance(spawner, TunnelbotRemoteSpawner)
        options = "\n".join(
            f'<option value="{html.escape(h.name)}"{" selected" if i == 0 else ""}>{html.escape(h.name)}</option>'
            for i, h in enumerate(spawner.hosts())
        )
        form = (
            '<label for="tunnelbot-host">Host</label>\n'
            f'<select id="tunnelbot-host" name="host" class="form-control">\n{options}\n</select>\n'
        )
        if spawner.container_runtime:
            form += (
                '<label for="tunnelbot-binds">Extra bind paths (absolute, comma-separated)</label>\n'
                '<input id="tunnelbot-binds" name="binds" class="form-control" '
                'placeholder="/scratch/project,/data:/data:ro">\n'
            )
        return form

    def _read_form(self, formdata: Dict[str, List[str]]) -> Dict[str, Any]:
        options: Dict[str, Any] = {}
        if formdata.get("host"):
            options["host"] = _single(formdata["host"])
        if formdata.get("binds"):
            options["binds"] = _split_binds(formdata["binds"])
        self._choice(options)  # refuse at once what start() would refuse
        return options

    def _choice(self, options: Dict[str, Any]) -> Tuple[RemoteHost, List[str]]:
        """The host and extra binds in user_options, validated (ValueError otherwise)."""
        hosts = self.hosts()
        if not hosts:
            raise ValueError("no valid remote host is configured (c.TunnelbotRemoteSpawner.remote_hosts)")
        host = hosts[0]
        if options.get("host"):
            name = _single(options["host"])
            matches = [h for h in hosts if h.name == name]
            if not matches:
                raise ValueError(f"host {name[:64]!r} is not one of {', '.join(h.name for h in hosts)}")
            host = matches[0]
        binds = _split_binds(options["binds"]) if options.get("binds") else []
        if binds and not self.container_runtime:
            raise ValueError("bind paths need a container runtime, and none is configured")
        return host, binds

    # -- the remote command ---------------------------------------------------------------

    def _fields(self) -> Dict[str, str]:
        name = self.user.name
        if not _USERNAME.match(name):
            raise ValueError(f"user name {name!r} cannot be used as a login name or in a path")
        return {"username": name, "home_root": self.home_root, "servername": f"-{self.name}" if self.name else ""}

    def _login(self) -> Tuple[str, str]:
        """(remote user, identity file)."""
        fields = self._fields()
        user = self.remote_user.format(**fields)
        identity = self.ssh_identity.format(**fields)
        if not _USERNAME.match(user):
            raise ValueError(f"remote user {user!r} is not a valid login name")
        if not os.path.isfile(identity):
            raise RuntimeError(f"tunnelbot: no SSH key for {self.user.name} at {identity}")
        return user, identity

    def _log_path(self) -> str:
        path = self.remote_log.format(**self._fields())
        if not (_safe_path(path) or (_RELATIVE_PATH.match(path) and ".." not in path.split("/"))):
            raise ValueError(f"remote_log {path!r} is not a plain path")
        return path

    def _ssh_argv(self, address: str, remote_command: str) -> List[str]:
        if not self.known_hosts_file:
            raise RuntimeError("tunnelbot: c.TunnelbotRemoteSpawner.known_hosts_file is not set")
        user, identity = self._login()
        argv = [
            *shlex.split(self.remote_ssh_command),
            "-T",
            "-i", identity,
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_file}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={self.remote_connect_timeout}",
            "-o", "LogLevel=ERROR",
        ]
        for option in self.remote_ssh_options:
            argv += ["-o", option]
        argv += ["-p", str(self.remote_port), "-l", user, address]
        # The login shell (whatever it is) gets one line: exec /bin/sh -c 'SCRIPT'.
        script = f"exec /bin/sh -c {shlex.quote(remote_command)}"
        assert "\n" not in script
        argv.append(script)
        return argv

    def _job_argv(self, binds: Sequence[str]) -> List[str]:
        """What the launch script execs after the wrapper, the credential file aside."""
        command = [*self.cmd, *self.get_args()]
        if not self.container_runtime:
            return command
        if not self.container_image:
            raise RuntimeError("tunnelbot: c.TunnelbotRemoteSpawner.container_image is not set")
        all_binds = [*self.container_binds, *binds]
        bind = ["--bind", ",".join(all_binds)] if all_binds else []
        return [self.container_runtime, "exec", *bind, self.container_image, *command]

    def _launch_script(self, env: Dict[str, str], binds: Sequence[str]) -> str:
        """The first document on stdin: run as `sh SCRIPT CREDENTIAL_FILE`, deletes itself."""
        lines = ['rm -f -- "$0"']
        for key, value in sorted(env.items()):
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                lines.append(f"export {key}={shlex.quote(value)}")
        wrapper = " ".join(shlex.quote(w) for w in self.job_wrapper)
        job = " ".join(shlex.quote(w) for w in self._job_argv(binds))
        lines.append(f'{wrapper} --credential-move "$1" {job}')
        lines.append("status=$?")
        # The wrapper deletes the credential as it reads it; one that never started (not found,
        # not readable) must not leave it behind.
        lines.append('rm -f -- "$1"')
        lines.append('echo "tunnelbot-remote: tunnelbot-job exited with status $status"')
        return "\n".join(lines) + "\n"

    def _remote_launcher(self, marker: str) -> str:
        """The remote command line (no secrets): store stdin's two documents, start detached."""
        log = shlex.quote(self._log_path())
        new = 'mktemp "${TMPDIR:-/tmp}/tunnelbot-launch.XXXXXXXX"'
        return "; ".join(
            [
                "umask 077",
                f"log={log}",
                'case "$log" in /*) ;; *) log="$HOME/$log" ;; esac',
                'mkdir -p -- "${log%/*}" && : >>"$log" && chmod 600 -- "$log" || exit 71',
                f"run=$({new}) || exit 71",
                f'cred=$({new}) || {{ rm -f -- "$run"; exit 71; }}',
                # Shell builtins only: the bundle never reaches an argv.
                "ok=",
                f'while IFS= read -r line; do if [ "$line" = {marker} ]; then ok=1; break; fi; '
                'printf \'%s\\n\' "$line"; done >"$run"',
                'if [ -z "$ok" ]; then rm -f -- "$run" "$cred"; echo "tunnelbot: no launch script on stdin" >&2; exit 65; fi',
                "ok=",
                'while IFS= read -r line; do printf \'%s\\n\' "$line"; '
                'if [ "$line" = end ]; then ok=1; break; fi; done >"$cred"',
                'if [ -z "$ok" ]; then rm -f -- "$run" "$cred"; echo "tunnelbot: no credential on stdin" >&2; exit 65; fi',
                'setsid /bin/sh "$run" "$cred" </dev/null >>"$log" 2>&1 & echo "tunnelbot-pid $!"',
            ]
        )

    async def _ssh(
        self, address: str, remote_command: str, stdin: bytes = b"", extra_time: float = 0.0
    ) -> Tuple[Optional[int], str, str]:
        """Run one remote command: (exit status or None on timeout, stdout, stderr)."""
        argv = self._ssh_argv(address, remote_command)
        timeout = self.remote_command_timeout + extra_time
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return None, "", f"no answer within {timeout:g} s"
        except BaseException:  # cancelled (the hub shutting down): no answer, and no ssh left behind
            if proc.returncode is None:
                proc.kill()
            raise
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def _host_key_error(self, host: str, address: str, stderr: str) -> Optional[UnknownHostKey]:
        if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            return UnknownHostKey(
                f"tunnelbot: the SSH host key of {host} ({address}) is not the one in "
                f"{self.known_hosts_file}; the admin must add the host's key there"
            )
        return None

    async def _remote_state(self, address: str, pid: int) -> Optional[bool]:
        """True: the process group lives; False: definitely gone; None: cannot tell."""
        status, out, err = await self._ssh(address, f"{_alive(pid)}; if alive; then echo running; else echo gone; fi")
        words = out.split()
        if status == 0 and words[-1:] == ["running"]:
            return True
        if status == 0 and words[-1:] == ["gone"]:
            return False
        self.log.warning(
            "tunnelbot: cannot check process %d on %s for %s (%s): %s",
            pid, address, self._log_name, "timeout" if status is None else f"ssh status {status}", err.strip()[-300:],
        )
        return None

    async def _kill_remote(self, address: str, pid: int) -> bool:
        """TERM the process group, KILL it after stop_timeout; True once it is gone."""
        rounds = max(1, int(self.stop_timeout * 5))
        script = (
            f"{_alive(pid)}; alive || {{ echo gone; exit 0; }}; kill -TERM -{pid} 2>/dev/null; i=0; "
            f'while [ "$i" -lt {rounds} ]; do alive || {{ echo stopped; exit 0; }}; '
            "sleep 0.2; i=$((i+1)); done; "
            f"kill -KILL -{pid} 2>/dev/null; echo killed"
        )
        status, out, err = await self._ssh(address, script, extra_time=self.stop_timeout)
        if status == 0 and out.split()[-1:] in (["gone"], ["stopped"], ["killed"]):
            return True
        self.log.error("tunnelbot: could not stop process %d on %s: %s", pid, address, err.strip()[-300:])
        return False

    # -- the Spawner interface --------------------------------------------------------------

    async def start(self) -> Tuple[str, int]:
        host, binds = self._choice(self.user_options or {})
        if self.remote_pid:  # left over from a spawn nobody cleaned up
            await self._kill_remote(self.remote_address, self.remote_pid)
            self.remote_pid = 0
        if self.tunnel_id:
            await self._release(self.tunnel_id)
        await self.retry_revokes()
        broker = self.broker()
        tunnel = await self.issue_tunnel(broker)
        self.tunnel_id, self.tunnel_port, self.tunnel_host = tunnel.id, tunnel.port, self.hub_side(tunnel)[0]
        self.log.info(
            "tunnelbot: tunnel %s on hub port %d for %s on %s", tunnel.id, tunnel.port, self._log_name, host.name
        )
        self._remote_starting = True
        try:
            await self._launch(host, binds, tunnel)
            await self._wait_connected_remote(broker, tunnel, host)
        except BaseException:
            self._remote_starting = False
            await self._release(tunnel.id)
            if self.remote_pid:
                try:
                    await self._kill_remote(self.remote_address, self.remote_pid)
                except Exception:
                    self.log.exception("tunnelbot: could not stop the job of %s after a failed start", self._log_name)
            raise
        finally:
            self._remote_starting = False
        return self.hub_side(tunnel)

    async def _launch(self, host: RemoteHost, binds: Sequence[str], tunnel: Tunnel) -> None:
        broker_host = self.ssh_host or tunnel.ssh_host
        if not broker_host:
            raise RuntimeError(
                "tunnelbot: the broker has no ssh.public_host; set c.TunnelbotSpawnerMixin.ssh_host "
                "to the broker's address as the remote hosts see it"
            )
        marker = f"TUNNELBOT_LAUNCH_{secrets.token_hex(8)}"
        bundle = self.credential_bundle(dataclasses.replace(tunnel, ssh_host=broker_host))
        stdin = (self._launch_script(self.get_env(), binds) + marker + "\n" + bundle).encode()
        if not bundle.endswith("\n"):
            stdin += b"\n"
        status, out, err = await self._ssh(host.address, self._remote_launcher(marker), stdin)
        del stdin, bundle
        key_error = self._host_key_error(host.name, host.address, err)
        if key_error:
            raise key_error
        match = _PID_LINE.search(out)
        if status != 0 or not match:
            reason = "no answer in time" if status is None else f"ssh exited with {status}"
            raise RuntimeError(f"tunnelbot: could not start the notebook on {host.name} ({reason}): {err.strip()[-500:]}")
        self.remote_host, self.remote_address, self.remote_pid = host.name, host.address, int(match.group(1))
        self.log.info("tunnelbot: %s runs as process group %d on %s", self._log_name, self.remote_pid, host.name)

    async def _exit_reason(self, host: RemoteHost) -> str:
        """The wrapper's exit status from the end of the remote log, as words."""
        log = shlex.quote(self._log_path())
        status, out, _ = await self._ssh(
            host.address, f'log={log}; case "$log" in /*) ;; *) log="$HOME/$log" ;; esac; tail -n 40 -- "$log"'
        )
        found = _EXIT_LINE.findall(out) if status == 0 else []
        where = f"see {self._log_path()} on {host.name}"
        return f"{describe_exit(int(found[-1]))}; {where}" if found else where

    async def _wait_connected_remote(self, broker: BrokerClient, tunnel: Tunnel, host: RemoteHost) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        next_check = loop.time() + 2.0
        while True:
            current = await self.check_tunnel(broker, tunnel.id)
            if current is None or not current.active:
                state = "unknown to the broker" if current is None else current.state
                raise RuntimeError(f"tunnelbot tunnel {tunnel.id} is {state}")
            if current.connected:
                return
            if loop.time() >= next_check:
                alive = await self._remote_state(host.address, self.remote_pid)
                if alive is False:
                    reason = await self._exit_reason(host)
                    self.remote_pid = 0
                    raise RuntimeError(f"the job on {host.name} ended before its tunnel came up ({reason})")
                next_check = loop.time() + 2.0
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"the job's tunnel did not connect within {self.connect_timeout:g} s "
                    f"(can {host.name} reach the broker's ssh_host?)"
                )
            await asyncio.sleep(min(self.connect_poll_interval, remaining))

    async def poll(self) -> Optional[int]:
        if self._remote_starting:
            return None
        if self.pending_revokes:
            await self.retry_revokes()
        if not self.remote_pid:
            return 0
        alive = await self._remote_state(self.remote_address, self.remote_pid)
        if alive is False:
            self.log.warning("tunnelbot: the job of %s on %s is gone", self._log_name, self.remote_host)
            if self.tunnel_id:
                await self._release(self.tunnel_id)
            self.clear_state()
            return 0
        if not self.tunnel_id:
            return None
        try:
            # The renewal keeps the lease (and the expiry).
            current = await self.renew_tunnel(self.broker(), self.tunnel_id)
        except Exception as e:
            # A broker restart must not look like every server dying at once.
            self.log.warning("tunnelbot: cannot check tunnel %s: %s", self.tunnel_id, e)
            return None
        if current is not None and current.active:
            return None
        state = "unknown to the broker" if current is None else current.state
        self.log.warning("tunnelbot: tunnel %s of %s is %s; stopping its job", self.tunnel_id, self._log_name, state)
        await self._release(self.tunnel_id)
        if await self._kill_remote(self.remote_address, self.remote_pid):
            self.clear_state()
        return 1

    async def stop(self, now: bool = False) -> None:
        if self.tunnel_id:
            await self._release(self.tunnel_id)
        if self.remote_pid and await self._kill_remote(self.remote_address, self.remote_pid):
            self.remote_pid = 0

    def get_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = super().get_state()
        if self.remote_pid:
            state.update(
                tunnelbot_remote_host=self.remote_host,
                tunnelbot_remote_address=self.remote_address,
                tunnelbot_remote_pid=self.remote_pid,
            )
        return state

    def load_state(self, state: Dict[str, Any]) -> None:
        super().load_state(state)
        self.remote_host = str(state.get("tunnelbot_remote_host", ""))
        self.remote_address = str(state.get("tunnelbot_remote_address", ""))
        self.remote_pid = int(state.get("tunnelbot_remote_pid", 0))
        if self.remote_pid and not _valid_address(self.remote_address):
            self.log.error("tunnelbot: ignoring the saved remote address %r of %s", self.remote_address, self._log_name)
            self.remote_host = self.remote_address = ""
            self.remote_pid = 0

    def clear_state(self) -> None:
        super().clear_state()
        self.remote_host = self.remote_address = ""
        self.remote_pid = 0
