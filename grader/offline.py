"""Offline by default: refuse outbound network connections during a grading run.

The grader installs :func:`block_network` unless the user passed ``--download``. Any attempt to
open a non-loopback connection raises ``NetworkBlocked`` and is recorded, so the report's
statement "nothing was downloaded" is a fact of the run, not a promise. Loopback stays open
(torch.distributed's gloo rendezvous uses it). Java subprocesses (pycocoevalcap) are outside
Python's socket module; the libraries we call through them read only local files.
"""

from __future__ import annotations

import os
import socket

_ATTEMPTS: list[str] = []
_ORIGINAL_CONNECT = socket.socket.connect
_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")


class NetworkBlocked(ConnectionRefusedError):
    pass


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else str(address)
    if self.family == getattr(socket, "AF_UNIX", None) or str(host).startswith(_LOCAL):
        return _ORIGINAL_CONNECT(self, address)
    _ATTEMPTS.append(f"{host}:{address[1] if isinstance(address, tuple) and len(address) > 1 else ''}")
    raise NetworkBlocked(f"network access to {host} blocked: the grader runs offline; pass --download "
                         "to allow downloads")


def block_network() -> None:
    """Refuse outbound connections in this process; also tell hub libraries to stay offline."""
    socket.socket.connect = _guarded_connect
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"


def record(download_allowed: bool) -> dict:
    """The network section of a report."""
    if download_allowed:
        return {"blocked": False, "attempts": list(_ATTEMPTS),
                "statement": "--download was given: network access was allowed for this run"}
    return {"blocked": True, "attempts": list(_ATTEMPTS),
            "statement": ("outbound network blocked for the whole run; "
                          f"{len(_ATTEMPTS)} connection attempt(s) refused; nothing was downloaded")}
