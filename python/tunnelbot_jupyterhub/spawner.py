"""A spawner mixin that reaches single-user servers through tunnelbot reverse tunnels.

The job runs ``tunnelbot-job <notebook command>``; the wrapper opens
``ssh -R 0:127.0.0.1:<node port>`` to the broker, which listens on the hub port P it
reserved for this spawn. ``start()`` returns ``(tunnel_host, P)`` (the host the broker says
the proxy dials, ``127.0.0.1`` from an older broker): JupyterHub (and CHP) only ever see the
hub side of the tunnel, never the node's address or port.

After a failover the new active broker routes to its own ``tunnel_host``; the renewal each
``poll()`` makes reports it, and the hub's server record follows (address.py), so JupyterHub's
``check_routes`` keeps the new route instead of writing the old broker's address back.

Leases: the tunnel is issued with ``lease_seconds`` and renewed while ``start()`` waits and
from every ``poll()``, so a tunnel whose hub record is gone (or whose revoke was lost) ends
within the lease. A revoke that fails is kept in the spawner's state and retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from jupyterhub.spawner import LocalProcessSpawner, Spawner
from traitlets import Enum, Float, Integer, List as ListTrait, TraitError, Unicode, default, validate

from .address import follow_server_address
from .broker import BrokerClient, BrokerError, Tunnel
from .credential import _unix_seconds, pin_known_hosts, render_bundle
from .wrapper import job_wrapper_path

__all__ = ["TunnelbotLocalProcessSpawner", "TunnelbotSpawnerMixin", "pin_known_hosts", "seal_traits"]

# Options that would weaken host-key pinning; the wrapper refuses them too.
_HOST_KEY_OPTIONS = {
    "stricthostkeychecking",
    "userknownhostsfile",
    "globalknownhostsfile",
    "knownhostscommand",
    "hostkeyalias",
}

# tunnelbot-job's own exit statuses (see the script's header).
_WRAPPER_EXITS = {
    64: "tunnelbot-job refused its inputs: no or a malformed credential (see the job's log)",
    69: "tunnelbot-job could not bring the tunnel up: the broker is unreachable or refused the job's key "
    "(see the job's log for ssh's error)",
    77: "the broker refused the credential (tunnel revoked, expired or unknown)",
    126: "the job command is not executable",
    127: "a command was not found: the job wrapper (tunnelbot-job) or the notebook command is not on the "
    "job's PATH; set c.TunnelbotSpawnerMixin.job_wrapper to an absolute path",
}

# Settings that carry trust: where the admin token goes, what runs on the hub or in the job.
# Once a spawner is constructed (from config), nothing may change them: not a notebook
# through batchspawner's API handler (see trust.py), not anything else at run time.
_SEALED = (
    "broker_url",
    "broker_token_file",
    "ssh_host",
    "ssh_options",
    "standby_brokers",
    "job_wrapper",
    "credential_dir",
    "tunnel_auth",
    "job_identity_file",
    "job_certificate_file",
)

# A lease must outlast this many poll intervals: one lost or slow poll must not end a tunnel.
LEASE_POLLS = 3


def seal_traits(obj: Any, proposal: Any) -> Any:
    """A traitlets validator body: refuses a new value for a sealed trait."""
    name = proposal["trait"].name
    if getattr(obj, "_tunnelbot_sealed", False) and name in obj._trait_values:
        if proposal["value"] != obj._trait_values[name]:
            raise TraitError(f"{name} is set by the hub's configuration only")
    return proposal["value"]


def describe_exit(status: int) -> str:
    """A human reason for a job's exit status."""
    reason = _WRAPPER_EXITS.get(status)
    if reason is None and status > 128:
        reason = f"killed by signal {status - 128}"
    return f"status {status}" + (f": {reason}" if reason else "")


class TunnelbotSpawnerMixin(Spawner):
    """Mix in before any spawner whose jobs the hub cannot reach directly.

    ``class MySpawner(TunnelbotSpawnerMixin, SomeSpawner)``. The base spawner's
    ``start()`` must run ``self.cmd`` (plus args) as the job, as JupyterHub's own and
    batchspawner's spawners do; the mixin prefixes it with :attr:`job_wrapper`.
    """

    broker_url = Unicode(
        "http://127.0.0.1:8090",
        help="The tunnelbot broker's admin API (its [admin] listen address).",
    ).tag(config=True)

    broker_token_file = Unicode(
        help="""File holding the token the hub calls the broker's admin API with: a spawner
        token (`tunnelbot token create --scope spawner --group GROUP`, a 0640 file readable by
        the hub's group: the way for a hub that is not root), or the broker's
        <keys_dir>/admin.token (0600, the broker's user only).

        Defaults to $TUNNELBOT_ADMIN_TOKEN_FILE. Read at each use, so the token can be
        rotated without restarting the hub.""",
    ).tag(config=True)

    @default("broker_token_file")
    def _default_broker_token_file(self) -> str:
        return os.environ.get("TUNNELBOT_ADMIN_TOKEN_FILE", "")

    broker_timeout = Float(
        10.0,
        help="Seconds one admin-API call may take.",
    ).tag(config=True)

    ssh_host = Unicode(
        "",
        help="""The broker's SSH host as the compute nodes see it.

        Empty: use the ssh_host the broker reports (its ssh.public_host); one of the two
        is required.""",
    ).tag(config=True)

    standby_brokers = ListTrait(
        Unicode(),
        help="""Further brokers of an active/standby pair, as the compute nodes see them:
        `HOST` or `HOST:PORT` (the port defaults to the broker's SSH port), e.g.
        ["hub-b.example.org"]. The job's wrapper tries ssh_host first, then these in turn,
        until one answers. Both brokers must share one host key (README, "standby broker").
        Not needed when ssh_host is one DNS name or virtual IP that follows the active broker.""",
    ).tag(config=True)

    ssh_options = ListTrait(
        Unicode(),
        help="""Extra ssh options for the job's tunnel, each passed as `-o OPTION`,
        e.g. ["ProxyJump=login1", "ConnectTimeout=10"]. Host-key options are refused:
        the broker's key is always pinned. The job's ssh ignores ssh_config files.""",
    ).tag(config=True)

    @validate("ssh_options")
    def _validate_ssh_options(self, proposal: Dict[str, Any]) -> List[str]:
        seal_traits(self, proposal)
        options: List[str] = list(proposal["value"])
        for option in options:
            if not option or any(c.isspace() for c in option):
                raise TraitError(f"ssh option {option!r} must be one word like Name=value")
            if option.split("=", 1)[0].lower() in _HOST_KEY_OPTIONS:
                raise TraitError(f"ssh option {option!r} would weaken host-key pinning")
        return options

    credential_dir = Unicode(
        "",
        help="""Where the hub drops the job's credential bundle for launchers that run the job on
        this machine (the local-process spawner): a private 0700 directory per spawn is made in
        it, holding one 0600 file owned by the job's user, which tunnelbot-job deletes as soon as
        it has read it (--credential-move). Empty: the system's temp directory. Batch spawners
        do not use it: their bundle travels inside the batch script.""",
    ).tag(config=True)

    @validate(*(name for name in _SEALED if name != "ssh_options"))
    def _validate_sealed(self, proposal: Dict[str, Any]) -> Any:
        return seal_traits(self, proposal)

    default_lifetime = Integer(
        0,
        help="""Tunnel lifetime in seconds when the job's wall time is unknown.
        0: the broker's tunnels.default_ttl.""",
    ).tag(config=True)

    lifetime_margin = Integer(
        900,
        help="""Seconds added to a known wall time: the tunnel's lifetime starts when it
        is issued, before the job waits in the queue.""",
    ).tag(config=True)

    lease_seconds = Integer(
        600,
        help="""The tunnel's lease, seconds: the broker ends a tunnel not renewed for that long.
        The hub renews it while start() waits and at every poll() (every poll_interval), so a
        tunnel whose hub record is gone, or whose revoke was lost, ends within the lease. Must
        be 0 (no lease) or at least 3 poll intervals, and no longer than the broker's
        tunnels.lease when that is set.""",
    ).tag(config=True)

    @validate("lease_seconds")
    def _validate_lease_seconds(self, proposal: Dict[str, Any]) -> int:
        value = int(proposal["value"])
        if value < 0:
            raise TraitError("lease_seconds must be 0 (no lease) or positive")
        return value

    max_backoff = Integer(
        10,
        help="""The job wrapper's longest pause between two ssh attempts, seconds (the bundle's
        max_backoff=): once the broker is back, the notebook is reachable again within about
        this long. The wrapper retries through broker outages until the credential's expiry.""",
    ).tag(config=True)

    max_attempts = Integer(
        10,
        help="""Failed ssh attempts in a row after which the job wrapper gives up, for a
        credential without an expiry (the bundle's max_attempts=).""",
    ).tag(config=True)

    @validate("max_backoff", "max_attempts")
    def _validate_retry(self, proposal: Dict[str, Any]) -> int:
        value = int(proposal["value"])
        if value < 1:
            raise TraitError(f"{proposal['trait'].name} must be at least 1")
        return value

    tunnel_auth = Enum(
        ["key", "certificate"],
        default_value="key",
        help="""How the job logs in to the broker. "key": the broker issues a key pair per
        tunnel and the private key travels in the job's credential bundle. "certificate": the
        tunnel is issued with "auth": "certificate" and no key; the job's ssh logs in with the
        user's certificate from the site's OpenSSH CA (the broker's ssh.trusted_user_ca_keys),
        found on the node at job_identity_file / job_certificate_file.""",
    ).tag(config=True)

    job_identity_file = Unicode(
        "",
        help="""Certificate tunnels: the private key on the node the job's ssh logs in with
        ("~" is the job user's home). Empty: ssh's defaults (~/.ssh/id_ed25519 and friends).""",
    ).tag(config=True)

    job_certificate_file = Unicode(
        "",
        help="""Certificate tunnels: the certificate on the node, for job_identity_file. Empty:
        ssh's default, the identity's -cert.pub next to it.""",
    ).tag(config=True)

    connect_timeout = Float(
        help="""Seconds start() waits for the job's tunnel once the job is submitted.
        Default: start_timeout minus 5, so the user sees this reason rather than a bare
        timeout.""",
    ).tag(config=True)

    @default("connect_timeout")
    def _default_connect_timeout(self) -> float:
        return max(1.0, float(self.start_timeout) - 5.0)

    connect_poll_interval = Float(
        0.5,
        help="Seconds between checks of the tunnel while start() waits for it.",
    ).tag(config=True)

    job_wrapper = ListTrait(
        Unicode(),
        default_value=["tunnelbot-job"],
        help="""The job wrapper and its leading arguments, put before Spawner.cmd. The
        default expects `tunnelbot-job` on the job's PATH (pip installs it); give an
        absolute path on a shared filesystem otherwise.""",
    ).tag(config=True)

    # Persisted through get_state/load_state so a restarted hub polls the same tunnel.
    tunnel_id = Unicode("")
    tunnel_port = Integer(0)
    tunnel_host = Unicode("")
    # Revokes that failed (broker unreachable): retried at the next start/poll/stop, and by a
    # background task; kept across clear_state() and hub restarts.
    pending_revokes = ListTrait(Unicode())

    # Traits of the base spawner that the mixin assigns to (annotations only, for mypy).
    cmd: List[str]
    port: int

    _tunnelbot_starting: bool = False
    _tunnelbot_sealed: bool = False
    _tunnelbot_last_renewal: float = 0.0
    _tunnelbot_revoke_task: "Optional[asyncio.Task[None]]" = None

    # A launcher that runs the job elsewhere (over ssh, say) sets this class attribute and
    # writes credential_stdin, during its start(), to the job's standard input.
    credential_via_stdin: bool = False
    credential_stdin: Optional[str] = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tunnelbot_sealed = True

    def broker(self) -> BrokerClient:
        return BrokerClient.from_token_file(self.broker_url, self.broker_token_file, self.broker_timeout)

    def walltime_seconds(self) -> Optional[int]:
        """The job's wall time, if the launcher knows it; batch spawners override this."""
        return None

    def tunnel_lifetime(self) -> Optional[int]:
        walltime = self.walltime_seconds()
        if walltime:
            return walltime + self.lifetime_margin
        return self.default_lifetime or None

    def tunnel_lease(self) -> Optional[int]:
        """The lease to ask for at issue (None: none); refuses one that polls cannot keep up."""
        if not self.lease_seconds:
            return None
        least = LEASE_POLLS * float(self.poll_interval)
        if self.lease_seconds < least:
            raise ValueError(
                f"tunnelbot: lease_seconds ({self.lease_seconds}) must be at least {LEASE_POLLS} poll intervals "
                f"({least:g} s with Spawner.poll_interval = {self.poll_interval:g}), or 0 for no lease"
            )
        return int(self.lease_seconds)

    async def issue_tunnel(self, broker: BrokerClient) -> Tunnel:
        """Issue this spawn's tunnel: lifetime, lease and kind of credential from the settings."""
        lease = self.tunnel_lease()
        tunnel = await broker.issue(
            self.user.name,
            self.name,
            self.tunnel_lifetime(),
            lease_seconds=lease,
            auth="certificate" if self.tunnel_auth == "certificate" else None,
        )
        self._tunnelbot_last_renewal = asyncio.get_running_loop().time()
        return tunnel

    def hub_side(self, tunnel: Tunnel) -> Tuple[str, int]:
        """(host, port) the proxy dials: the broker's tunnel_host (127.0.0.1 from an older broker)."""
        return (tunnel.tunnel_host or "127.0.0.1", tunnel.port)

    def _renewal_due(self) -> bool:
        if not self.lease_seconds:
            return True  # no lease: renew at each poll (queue waits must not eat the job's time)
        elapsed = asyncio.get_running_loop().time() - self._tunnelbot_last_renewal
        return elapsed >= min(float(self.poll_interval), self.lease_seconds / LEASE_POLLS)

    async def renew_tunnel(self, broker: BrokerClient, tunnel_id: str) -> Optional[Tunnel]:
        """Renew the tunnel (expiry now + lifetime, never earlier; the lease restarts).

        Returns the tunnel as the broker now has it; None when it is unknown. A tunnel that has
        ended comes back as it is (not active). ``BrokerError`` (status 0 or 5xx): cannot tell.
        """
        try:
            current = await broker.renew(tunnel_id, self.tunnel_lifetime())
        except BrokerError as e:
            if e.status != 409:
                raise
            return await broker.get(tunnel_id)  # ended: its state says how
        if current is None:
            # Unknown, or a broker without renewals (its 404 names no tunnel): ask.
            current = await broker.get(tunnel_id)
            if current is not None and current.active:
                self.log.warning("tunnelbot: the broker cannot renew tunnels (older than renewals); not renewing")
                return current
        if current is not None:
            self._tunnelbot_last_renewal = asyncio.get_running_loop().time()
        # Every poll renews, so this is where the hub learns that a standby broker took over.
        follow_server_address(self, tunnel_id, current)
        return current

    async def check_tunnel(self, broker: BrokerClient, tunnel_id: str) -> Optional[Tunnel]:
        """The tunnel's state, renewing it when a renewal is due."""
        if self._renewal_due():
            return await self.renew_tunnel(broker, tunnel_id)
        return await broker.get(tunnel_id)

    def job_ssh_host(self, tunnel: Tunnel) -> str:
        host = self.ssh_host or tunnel.ssh_host
        if not host:
            raise RuntimeError(
                "tunnelbot: the broker has no ssh.public_host; set c.TunnelbotSpawnerMixin.ssh_host "
                "to the broker's address as the compute nodes see it"
            )
        return host

    def credential_bundle(self, tunnel: Tunnel) -> str:
        """The job's credential bundle (a secret: never logged, never in argv or env).

        With a lease the broker's expiry moves with each renewal, but the bundle is fixed
        when the job is submitted (and re-read by a requeued job): its ``expires_at``, the
        wrapper's retry horizon, is then the issue-time expiry plus the lifetime once more,
        so a queue wait or requeue as long as the wall time does not end its retries early.
        The broker's refusal (revoked, expired, lease lapsed) still stops the wrapper at once.
        """
        certificate = self.tunnel_auth == "certificate"
        if not certificate and not tunnel.private_key:
            raise BrokerError(0, "the issue answer carries no private key")
        if self.lease_seconds and tunnel.expires_at and tunnel.created_at:
            end, start = _unix_seconds(tunnel.expires_at), _unix_seconds(tunnel.created_at)
            horizon = end + max(0, end - start)
            tunnel = dataclasses.replace(tunnel, expires_at=f"{horizon}")
        if certificate:
            tunnel = dataclasses.replace(tunnel, auth="certificate")
        return render_bundle(
            tunnel,
            self.job_ssh_host(tunnel),
            list(self.ssh_options),
            identity_file=self.job_identity_file if certificate else "",
            certificate_file=self.job_certificate_file if certificate else "",
            standby_brokers=list(self.standby_brokers),
            max_backoff=int(self.max_backoff),
            max_attempts=int(self.max_attempts),
        )

    def wrapper_argv(self, credential: List[str]) -> List[str]:
        """The job wrapper's command line up to (not including) Spawner.cmd."""
        return list(self.job_wrapper) + credential

    def _credential_owner(self) -> Optional[Tuple[int, int]]:
        """(uid, gid) the credential file must belong to; None: ours (no root)."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(self.user.name)
        except KeyError:  # a launcher that runs jobs as the hub's own user
            return None
        return entry.pw_uid, entry.pw_gid

    def _drop_credential(self, bundle: str) -> Tuple[Path, Path]:
        """A private directory holding a 0600 file with the bundle, both the job user's."""
        base = self.credential_dir or tempfile.gettempdir()
        directory = Path(tempfile.mkdtemp(prefix="tunnelbot-cred.", dir=base))  # 0700
        path = directory / "credential"
        owner = self._credential_owner()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(bundle)
            if owner is not None:
                os.chown(path, *owner)
                os.chown(directory, *owner)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return directory, path

    @contextmanager
    def _wrapped_cmd(self, bundle: str) -> Iterator[None]:
        """Spawner.cmd behind the wrapper, with the bundle in a file the wrapper deletes.

        For launchers that run self.cmd on this machine; batch spawners override this and
        put the bundle into the batch script instead. A launcher that sets
        ``credential_via_stdin = True`` gets ``--credential -`` and must feed
        :attr:`credential_stdin` to the job's standard input (e.g. as a here-document).
        """
        if self.credential_via_stdin:
            original = list(self.cmd)
            self.cmd = self.wrapper_argv(["--credential", "-"]) + original
            self.credential_stdin = bundle
            try:
                yield
            finally:
                self.cmd = original
                self.credential_stdin = None
            return
        directory, path = self._drop_credential(bundle)
        original = list(self.cmd)
        self.cmd = self.wrapper_argv(["--credential-move", str(path)]) + original
        try:
            yield
        finally:
            self.cmd = original
            shutil.rmtree(directory, ignore_errors=True)

    async def start(self) -> Tuple[str, int]:
        if self.tunnel_id:  # left over from a spawn nobody cleaned up
            await self._release(self.tunnel_id)
        await self.retry_revokes()
        broker = self.broker()
        tunnel = await self.issue_tunnel(broker)
        self.tunnel_id, self.tunnel_port, self.tunnel_host = tunnel.id, tunnel.port, self.hub_side(tunnel)[0]
        self.log.info("tunnelbot: tunnel %s on hub port %d for %s", tunnel.id, tunnel.port, self._log_name)
        self._tunnelbot_starting = True
        launch: Optional[asyncio.Future[Any]] = None
        try:
            with self._wrapped_cmd(self.credential_bundle(tunnel)):
                launch = asyncio.ensure_future(super().start())
                await self._wait_connected(broker, tunnel, launch)
        except BaseException:
            # Clear the flag first: the base stop() polls, and must see the job as it is.
            self._tunnelbot_starting = False
            await self._abort(tunnel.id, launch)
            raise
        finally:
            self._tunnelbot_starting = False
        return self.hub_side(tunnel)

    async def _job_exit_status_while_starting(self) -> Optional[int]:
        """The job's exit status while the base start() still runs; None if unknown or alive."""
        return None

    async def _wait_connected(self, broker: BrokerClient, tunnel: Tunnel, launch: "asyncio.Future[Any]") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            if launch.done():
                launch.result()  # the launcher's own error, if any
                status = await super().poll()
            else:
                status = await self._job_exit_status_while_starting()
            if status is not None:
                raise RuntimeError(f"the job ended before its tunnel came up ({describe_exit(status)})")
            current = await self.check_tunnel(broker, tunnel.id)
            if current is None or not current.active:
                state = "unknown to the broker" if current is None else current.state
                raise RuntimeError(f"tunnelbot tunnel {tunnel.id} is {state}")
            if current.connected:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"the job's tunnel did not connect within {self.connect_timeout:g} s "
                    "(is the broker's ssh_host reachable from the compute nodes?)"
                )
            await asyncio.wait([launch], timeout=min(self.connect_poll_interval, remaining))
        if not launch.done():
            # The hub talks to tunnel_host:P, so a launcher still waiting to learn the
            # node's port (batchspawner) is told P and can return.
            if not self.port:
                self.port = tunnel.port
            remaining = max(deadline - loop.time(), self.connect_poll_interval * 4)
            await asyncio.wait_for(asyncio.shield(launch), timeout=remaining)
        launch.result()

    async def _abort(self, tunnel_id: str, launch: Optional["asyncio.Future[Any]"]) -> None:
        """Undo a failed start: revoke the tunnel and stop whatever was launched."""
        await self._release(tunnel_id)
        if launch is None:
            return
        if not launch.done():
            launch.cancel()
            await asyncio.wait([launch], timeout=self.broker_timeout)
        if not self._job_launched():
            return
        try:
            await super().stop(now=True)
        except Exception as e:
            self.log.error("tunnelbot: could not stop the job of %s after a failed start: %s", self._log_name, e)

    def _job_launched(self) -> bool:
        """Whether the base spawner has something to stop (batch spawners: a job id)."""
        return True

    async def _release(self, tunnel_id: str) -> None:
        """Revoke the tunnel (already gone is fine); the job's ssh is cut off with it.

        A revoke that fails is kept in ``pending_revokes`` and retried (the next start, poll
        or stop, and a background task); meanwhile the lease ends the tunnel anyway.
        """
        if not await self._revoke(tunnel_id):
            if tunnel_id not in self.pending_revokes:
                self.pending_revokes = list(self.pending_revokes) + [tunnel_id]
            self._schedule_revoke_retry()
        if self.tunnel_id == tunnel_id:
            self.tunnel_id, self.tunnel_port, self.tunnel_host = "", 0, ""

    async def _revoke(self, tunnel_id: str) -> bool:
        """True once the broker has the tunnel revoked (or does not know it)."""
        try:
            await self.broker().revoke(tunnel_id)
        except BrokerError as e:
            # Stopping the job must not hinge on the broker: the revoke is retried.
            self.log.error("tunnelbot: could not revoke tunnel %s (will retry): %s", tunnel_id, e)
            return False
        return True

    async def retry_revokes(self) -> None:
        """Retry the revokes that failed before; those that succeed leave the state."""
        for tunnel_id in list(self.pending_revokes):
            if await self._revoke(tunnel_id):
                self.log.info("tunnelbot: revoked tunnel %s (retried)", tunnel_id)
                self.pending_revokes = [t for t in self.pending_revokes if t != tunnel_id]

    def _schedule_revoke_retry(self) -> None:
        """A background task retrying the pending revokes every poll interval, for as long as
        a lease (or 10 minutes without one): after that the broker has ended them itself."""
        if self._tunnelbot_revoke_task is not None and not self._tunnelbot_revoke_task.done():
            return

        async def retry() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (self.lease_seconds or 600)
            interval = max(1.0, min(float(self.poll_interval), 30.0))
            while self.pending_revokes and loop.time() < deadline:
                await asyncio.sleep(interval)
                await self.retry_revokes()

        try:
            self._tunnelbot_revoke_task = asyncio.ensure_future(retry())
        except RuntimeError:  # no running loop
            pass

    async def poll(self) -> Optional[int]:
        if self._tunnelbot_starting:
            return None
        if self.pending_revokes:
            await self.retry_revokes()
        tunnel_id = self.tunnel_id  # the base poll may clear_state()
        status: Optional[int] = await super().poll()
        if not tunnel_id:
            return status
        if status is not None:
            await self._release(tunnel_id)
            return status
        try:
            # The renewal keeps the lease (and the expiry, past queue waits and requeues).
            current = await self.renew_tunnel(self.broker(), tunnel_id)
        except BrokerError as e:
            # A broker restart must not look like every server dying at once.
            self.log.warning("tunnelbot: cannot check tunnel %s: %s", tunnel_id, e)
            return None
        if current is not None and current.active:
            return None
        state = "unknown to the broker" if current is None else current.state
        self.log.warning("tunnelbot: tunnel %s of %s is %s; stopping its job", tunnel_id, self._log_name, state)
        await self._release(tunnel_id)
        try:
            # The hub will not call stop() once poll() reports the server gone.
            await super().stop(now=True)
        except Exception:
            self.log.exception("tunnelbot: could not stop the job of %s", self._log_name)
        self.clear_state()
        return 1

    async def stop(self, now: bool = False) -> None:
        if self.tunnel_id:
            await self._release(self.tunnel_id)
        await super().stop(now=now)

    def get_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = super().get_state()
        if self.tunnel_id:
            state["tunnelbot_tunnel_id"] = self.tunnel_id
            state["tunnelbot_port"] = self.tunnel_port
            state["tunnelbot_host"] = self.tunnel_host
        if self.pending_revokes:
            state["tunnelbot_pending_revokes"] = list(self.pending_revokes)
        return state

    def load_state(self, state: Dict[str, Any]) -> None:
        super().load_state(state)
        self.tunnel_id = state.get("tunnelbot_tunnel_id", "")
        self.tunnel_port = int(state.get("tunnelbot_port", 0))
        self.tunnel_host = str(state.get("tunnelbot_host", "") or "")
        pending = state.get("tunnelbot_pending_revokes") or []
        self.pending_revokes = [str(t) for t in pending if isinstance(t, str)]

    def clear_state(self) -> None:
        # pending_revokes stay: they outlive the server they belonged to.
        super().clear_state()
        self.tunnel_id = ""
        self.tunnel_port = 0
        self.tunnel_host = ""


class TunnelbotLocalProcessSpawner(TunnelbotSpawnerMixin, LocalProcessSpawner):
    """LocalProcessSpawner through a tunnel: for single-machine setups and tests."""

    @default("job_wrapper")
    def _default_job_wrapper(self) -> List[str]:
        # Same machine: run the packaged copy, whatever the user's PATH holds.
        return ["/bin/sh", str(job_wrapper_path())]
