"""Where the packaged copy of the ``tunnelbot-job`` wrapper lives."""

from __future__ import annotations

from pathlib import Path

__all__ = ["job_wrapper_path"]


def job_wrapper_path() -> Path:
    """The packaged ``tunnelbot-job`` (a POSIX sh script): copy it to a shared filesystem
    if the compute nodes do not have this package installed."""
    return Path(__file__).resolve().with_name("tunnelbot-job")
