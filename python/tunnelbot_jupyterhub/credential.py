"""The credential bundle: how a job's tunnel credential reaches ``tunnelbot-job``.

The job's private key must never travel in argv or in the environment (batchspawner logs the
job's environment; on a shared gateway account every job can read every other job's). It
travels as a *bundle*, a small text document the wrapper reads from stdin or a 0600 file::

    tunnelbot-job --credential - jupyterhub-singleuser <<'TUNNELBOT_CREDENTIAL_...'
    tunnelbot-credential 1
    host=hub.example.org
    ...
    end
    TUNNELBOT_CREDENTIAL_...

The bundle's text is a secret: never log it, put it in an exception, or show its ``repr``.
The format is documented in the wrapper's header.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from typing import List, Sequence, Tuple

from .broker import BrokerError, Tunnel

__all__ = ["BUNDLE_HEADER", "HOST_KEY_OPTIONS", "RETRY_SETTINGS", "heredoc", "pin_known_hosts", "render_bundle"]

BUNDLE_HEADER = "tunnelbot-credential 1"

# ssh options that would weaken host-key pinning; the wrapper refuses them too.
HOST_KEY_OPTIONS = frozenset(
    {"stricthostkeychecking", "userknownhostsfile", "globalknownhostsfile", "knownhostscommand", "hostkeyalias"}
)

# Retry tuning the wrapper takes from the bundle (see its header), each with its least value.
RETRY_SETTINGS = {
    # Longest pause between two ssh attempts, seconds.
    "max_backoff": 1,
    # Failed ssh attempts in a row before giving up, when the credential has no expiry.
    "max_attempts": 1,
}

# What the wrapper accepts in the fields that end up in ssh's destination argument.
_HOST = re.compile(r"[A-Za-z0-9.:%_][A-Za-z0-9.:%_-]*")
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_TUNNEL_ID = re.compile(r"[A-Za-z0-9_-]+")
# A file on the node the job's ssh reads (identity_file=, certificate_file=): ssh expands ~ and %.
_NODE_PATH = re.compile(r"[A-Za-z0-9._/~%+@-]+")


def pin_known_hosts(lines: str, host: str, port: int) -> str:
    """The broker's known_hosts line(s), re-keyed to the host and port the job dials.

    The broker names itself by ``ssh.public_host`` (or ``[*]``); ssh looks the key up
    under the name it was told to connect to, so the pattern must be that name.
    """
    pattern = host if port == 22 else f"[{host}]:{port}"
    pinned = []
    for line in lines.splitlines():
        fields = line.split(None, 1)
        if len(fields) == 2 and not line.startswith("#"):
            pinned.append(f"{pattern} {fields[1].strip()}")
    if not pinned:
        raise BrokerError(0, "the broker sent no usable known_hosts line")
    return "\n".join(pinned)


def _broker_address(address: str, default_port: int) -> Tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (an IPv6 address only with a port: ``[::1]:22``) as (host, port)."""
    text = address.strip()
    host, port = text, default_port
    if text.startswith("["):
        inside, _, rest = text[1:].partition("]")
        host = inside
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"not a broker address (HOST or HOST:PORT): {address!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, digits = text.partition(":")
        if not digits.isdigit():
            raise ValueError(f"not a broker address (HOST or HOST:PORT): {address!r}")
        port = int(digits)
    if not _HOST.fullmatch(host) or not 0 < port < 65536:
        raise ValueError(f"not a broker address (HOST or HOST:PORT): {address!r}")
    return host, port


def _unix_seconds(timestamp: str) -> int:
    """The broker's RFC 3339 ``expires_at`` as unix seconds."""
    if timestamp.isdigit():  # already unix seconds
        return int(timestamp)
    try:
        parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        raise BrokerError(0, f"unexpected expires_at {timestamp!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def render_bundle(
    tunnel: Tunnel,
    host: str,
    ssh_options: Sequence[str],
    identity_file: str = "",
    certificate_file: str = "",
    standby_brokers: Sequence[str] = (),
    **retry: int,
) -> str:
    """The credential bundle for ``tunnel``'s job, dialing the broker at ``host``.

    ``ssh_options`` become ``-o`` options of the job's ssh (host-key options are refused).
    ``retry`` takes the wrapper's retry tuning (:data:`RETRY_SETTINGS`: ``max_backoff``,
    ``max_attempts``); ``expires_at`` comes from the tunnel. Raises ``ValueError`` for
    inputs the wrapper would refuse, ``BrokerError`` for an issue answer without a key.

    A certificate tunnel (``tunnel.auth == "certificate"``) has no key: the bundle says
    ``auth=certificate`` and the job's ssh logs in with the site's certificate on the node,
    ``identity_file`` and ``certificate_file`` (paths on the node; empty: ssh's defaults,
    ``~/.ssh/id_*`` and their ``-cert.pub``).

    ``standby_brokers`` (``HOST`` or ``HOST:PORT``, the port defaulting to the tunnel's SSH
    port) are further brokers of an active/standby pair: the wrapper tries them in turn after
    ``host``. The pair shares one host key, so the known_hosts lines pin it under each address.
    """
    certificate = tunnel.auth == "certificate"
    if not _HOST.fullmatch(host):
        raise ValueError(f"not a host name the job can dial: {host!r}")
    if not _USER.fullmatch(tunnel.ssh_user):
        raise ValueError(f"not an ssh user name: {tunnel.ssh_user!r}")
    if not _TUNNEL_ID.fullmatch(tunnel.id):
        raise ValueError(f"not a tunnel id: {tunnel.id!r}")
    if not 0 < tunnel.ssh_port < 65536:
        raise ValueError(f"ssh port out of range: {tunnel.ssh_port}")
    dials = [(host, tunnel.ssh_port)] + [_broker_address(b, tunnel.ssh_port) for b in standby_brokers]
    for path in (identity_file, certificate_file):
        if path and not _NODE_PATH.fullmatch(path):
            raise ValueError(f"not a file name the job's ssh can read: {path!r}")
    key_lines: List[str] = []
    if certificate:
        if tunnel.private_key:
            raise BrokerError(0, "a certificate tunnel's issue answer carries a private key")
    else:
        if identity_file or certificate_file:
            raise ValueError("identity_file and certificate_file are for certificate tunnels only")
        if not tunnel.private_key:
            raise BrokerError(0, "the issue answer carries no private key")
        key_lines = [line.strip() for line in tunnel.private_key.strip().splitlines()]
        if not (key_lines[0].startswith("-----BEGIN ") and key_lines[-1].startswith("-----END ")):
            # The message names no part of the key.
            raise BrokerError(0, "the issue answer's private key is not PEM text")

    lines: List[str] = [
        BUNDLE_HEADER,
        f"host={host}",
        f"ssh_port={tunnel.ssh_port}",
        f"ssh_user={tunnel.ssh_user}",
        *(f"broker={h}:{p}" for h, p in dials[1:]),
        f"port={tunnel.port}",
        f"tunnel={tunnel.id}",
    ]
    if tunnel.expires_at:
        lines.append(f"expires_at={_unix_seconds(tunnel.expires_at)}")
    if certificate:
        lines.append("auth=certificate")
        if identity_file:
            lines.append(f"identity_file={identity_file}")
        if certificate_file:
            lines.append(f"certificate_file={certificate_file}")
    for option in ssh_options:
        name = re.split(r"[=\s]", option.strip(), maxsplit=1)[0]
        if not name or "\n" in option or "\r" in option or re.search(r"\s#", option):
            raise ValueError(f"not an ssh option: {option!r}")
        if name.lower() in HOST_KEY_OPTIONS:
            raise ValueError(f"ssh option {option!r} would weaken host-key pinning")
        lines.append(f"ssh_option={option.strip()}")
    for dial_host, dial_port in dials:
        lines.extend(f"known_hosts={line}" for line in pin_known_hosts(tunnel.known_hosts, dial_host, dial_port).splitlines())
    for name, value in sorted(retry.items()):
        least = RETRY_SETTINGS.get(name)
        if least is None:
            raise ValueError(f"unknown retry setting {name!r} (known: {', '.join(RETRY_SETTINGS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, not {value!r}")
        lines.append(f"{name}={value}")
    lines.extend(key_lines)
    lines.append("end")
    return "\n".join(lines) + "\n"


def heredoc(bundle: str) -> str:
    """``bundle`` as a here-document for a shell script: ``<<'DELIM'``, a newline, the bundle,
    and the ``DELIM`` line. Append it to the command line that reads it; it ends that line::

        script += "tunnelbot-job --credential - jupyterhub-singleuser " + heredoc(bundle)

    The delimiter is quoted (no expansion in the body) and random, so it cannot occur in the
    bundle.
    """
    if not bundle.endswith("\n"):
        bundle += "\n"
    while True:
        delimiter = f"TUNNELBOT_CREDENTIAL_{secrets.token_hex(8)}"
        if delimiter not in bundle:
            return f"<<'{delimiter}'\n{bundle}{delimiter}\n"
