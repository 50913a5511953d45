"""Offline by default: refuse outbound network access for the whole grading run.

The grader calls :func:`block_network` unless the user passed ``--download``. It installs an audit
hook (:func:`sys.addaudithook`) on CPython's socket audit events, so every route into the socket
module is covered, not one method: ``connect`` and ``connect_ex`` (both raise ``socket.connect``,
also from a bare ``_socket.socket``), UDP ``sendto`` / ``sendmsg``, and the name lookups
(``getaddrinfo``, ``gethostbyname[_ex]``, ``gethostbyaddr``, ``getnameinfo``). A destination is
local only when it parses as a loopback address (``ipaddress.ip_address(host).is_loopback``, or
the unspecified address, which means this host) or is exactly ``localhost`` or this machine's
own host name (torchrun looks it up); anything else, ``localhost.example`` included, is refused with :class:`NetworkBlocked` (an ``OSError``,
so callers such as ``socket.getfqdn`` that expect lookups to fail keep working). Loopback stays
open by default: torch.distributed's gloo rendezvous uses it.

Child processes are guarded too. :func:`child_env` (and, for children started with an
environment of their own, such as torchrun workers of a test, the same hook on the
``subprocess.Popen`` / ``os.posix_spawn`` / ``os.exec`` audit events) sets ``MMSYS_OFFLINE=1``
and puts ``grader/child_site`` first on ``PYTHONPATH``; its ``sitecustomize.py`` installs this
guard before the child runs anything else. Every refused attempt is appended, one JSON line, to
each file named in ``MMSYS_OFFLINE_LOG`` (this run's and its ancestors'), so :func:`record` counts
the attempts of the whole process tree and the report's "nothing was downloaded" is a fact.

Not covered (stated in the report): Java subprocesses (pycocoevalcap's tokenizer, METEOR and
SPICE jars read only local files), native code that opens its own sockets (torch's C++
TCPStore / gloo, on loopback), and Python children started with ``-I`` / ``-E`` / ``-S``, which
ignore ``PYTHONPATH`` or ``site``.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import socket
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

ENV_ON = "MMSYS_OFFLINE"  # "1": a child installs the guard at start-up (child_site/sitecustomize.py)
ENV_LOG = "MMSYS_OFFLINE_LOG"  # os.pathsep-separated files every refused attempt is appended to
ENV_LOOPBACK = "MMSYS_OFFLINE_LOOPBACK"  # "0": refuse loopback too (the guard's own tests only)
SITE_DIR = Path(__file__).resolve().with_name("child_site")
HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
LOCAL_NAMES = frozenset({"localhost"})
# audit event -> index of the destination in its arguments (connect/sendto/sendmsg: (sock, address))
NET_EVENTS = {"socket.connect": 1, "socket.sendto": 1, "socket.sendmsg": 1, "socket.getaddrinfo": 0,
              "socket.gethostbyname": 0, "socket.gethostbyaddr": 0, "socket.getnameinfo": 0}
# audit event -> index of the child's environment in its arguments
SPAWN_EVENTS = {"subprocess.Popen": 3, "os.posix_spawn": 2, "os.exec": 2}


class NetworkBlocked(ConnectionRefusedError):
    """A non-local network access refused by the offline guard."""


class _Guard:
    """This process's guard state (the audit hook reads it on every event)."""

    def __init__(self):
        self.active = False
        self.allow_loopback = True
        self.logs: list[str] = []  # files refused attempts are appended to (ancestors' first)
        self.own_log: str | None = None  # the file this process's report reads, if it made one
        self.attempts: list[dict] = []  # this process's refused attempts


_GUARD = _Guard()
_HOOKED = False
_OWN_NAME: str | None = None


def _own_name() -> str:
    """This machine's host name, lower case (looked up once)."""
    global _OWN_NAME
    if _OWN_NAME is None:
        try:
            _OWN_NAME = socket.gethostname().strip().rstrip(".").lower()
        except OSError:
            _OWN_NAME = ""
    return _OWN_NAME or "localhost"


def is_local(host, allow_loopback: bool = True) -> bool:
    """Whether ``host`` (a name or an address, str or bytes; None means "this host") names this
    machine: a loopback or unspecified IP address, or exactly ``localhost`` or this machine's own
    host name. Decided by parsing, never by prefix: ``localhost.example`` and
    ``127.0.0.1.example`` are not local."""
    if not allow_loopback:
        return False
    if host is None:
        return True
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    host = str(host).strip().rstrip(".").lower()
    if host in LOCAL_NAMES or host == "" or host == _own_name():
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return ip.is_loopback or ip.is_unspecified


def _refusal(event: str, args: tuple):
    """(host, port) of a network event that must be refused, or None if it is allowed."""
    target = args[NET_EVENTS[event]] if len(args) > NET_EVENTS[event] else None
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        family = getattr(args[0], "family", None)
        if family in (getattr(socket, "AF_UNIX", None), getattr(socket, "AF_NETLINK", None)):
            return None  # a local socket file / the kernel, not the network
        if target is None:
            return None  # sendmsg on a connected socket: its connect was checked
        if family not in (socket.AF_INET, getattr(socket, "AF_INET6", None)) or not isinstance(target, tuple):
            return (repr(target), None)  # another address family: refused
    host, port = (target[0], target[1] if len(target) > 1 else None) if isinstance(target, tuple) else (target, None)
    if event == "socket.getaddrinfo":
        port = args[1] if len(args) > 1 else None
    return None if is_local(host, _GUARD.allow_loopback) else (host, port)


def _note(event: str, host, port) -> None:
    """Remember a refused attempt and append it to every log of this process tree."""
    entry = {"event": event, "host": host if isinstance(host, str) else repr(host), "port": port,
             "pid": os.getpid(), "process": " ".join(sys.argv)[:200]}
    _GUARD.attempts.append(entry)
    line = json.dumps(entry, default=str) + "\n"
    for path in _GUARD.logs:
        try:
            with open(path, "a") as f:
                f.write(line)
        except OSError:
            pass  # the in-memory copy and the exception still stand


def _hook(event: str, args: tuple) -> None:
    """The audit hook: refuse non-local network events; pass the guard on to child processes."""
    if not _GUARD.active:
        return
    if event in NET_EVENTS:
        refused = _refusal(event, args)
        if refused is not None:
            _note(event, *refused)
            raise NetworkBlocked(f"network access to {refused[0]} blocked ({event}): the grader runs offline; "
                                 "pass --download to allow downloads")
    elif event in SPAWN_EVENTS and len(args) > SPAWN_EVENTS[event]:
        env = args[SPAWN_EVENTS[event]]
        if isinstance(env, MutableMapping):
            _inject(env)


def _activate(allow_loopback: bool, logs: list[str]) -> None:
    global _HOOKED
    _GUARD.active, _GUARD.allow_loopback = True, allow_loopback
    _GUARD.logs = list(dict.fromkeys(p for p in logs if p))
    if not _HOOKED:  # an audit hook cannot be removed: install it once, it reads _GUARD
        sys.addaudithook(_hook)
        _HOOKED = True


def _inherited_logs() -> list[str]:
    return [p for p in os.environ.get(ENV_LOG, "").split(os.pathsep) if p]


def block_network(allow_loopback: bool = True, log: str | Path | None = None) -> None:
    """Refuse non-local network access in this process and every child it starts from now on,
    and tell hub libraries to stay offline. Refused attempts (this process's and its children's)
    go to ``log`` (default: a temporary file removed at exit), which :func:`record` reads.
    ``allow_loopback=False`` refuses loopback too: for the guard's own tests only."""
    if log is None:
        fd, log = tempfile.mkstemp(prefix="mmsys-offline-", suffix=".jsonl")
        os.close(fd)
        atexit.register(lambda p=str(log): os.path.exists(p) and os.remove(p))
    else:
        Path(log).touch()
    _GUARD.own_log = str(log)
    _activate(allow_loopback, [*_inherited_logs(), str(log)])
    _inject(os.environ)  # children that inherit the environment are guarded too


def install_from_env() -> bool:
    """In a child process: install the guard if ``MMSYS_OFFLINE=1`` (child_site/sitecustomize.py
    calls this first thing). Returns whether it did."""
    if os.environ.get(ENV_ON) != "1":
        return False
    _activate(os.environ.get(ENV_LOOPBACK) != "0", _inherited_logs())
    return True


def _inject(env: MutableMapping) -> None:
    """Make ``env`` (a child's environment) carry this process's guard."""
    env[ENV_ON] = "1"
    env[ENV_LOG] = os.pathsep.join(_GUARD.logs)
    if _GUARD.allow_loopback:
        env.pop(ENV_LOOPBACK, None)
    else:
        env[ENV_LOOPBACK] = "0"
    for var in HUB_VARS:
        env[var] = "1"
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != SITE_DIR]
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *rest])


def child_env(env: MutableMapping | None = None) -> dict:
    """A copy of ``env`` (default ``os.environ``) for a child process: with the guard when this
    process has one (not under ``--download``), unchanged otherwise."""
    out = dict(os.environ if env is None else env)
    if _GUARD.active:
        _inject(out)
    return out


def attempts() -> list[dict]:
    """Every refused attempt of this process and of the processes it started."""
    own = list(_GUARD.attempts)
    if not _GUARD.own_log:
        return own
    try:
        lines = Path(_GUARD.own_log).read_text().splitlines()
    except OSError:
        return own
    others = []
    for ln in lines:
        try:
            entry = json.loads(ln)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("pid") != os.getpid():
            others.append(entry)
    return own + others


def record(download_allowed: bool) -> dict:
    """The network section of a report."""
    seen = attempts()
    if download_allowed:
        return {"blocked": False, "attempts": seen,
                "statement": "--download was given: network access was allowed for this run"}
    if not _GUARD.active:
        return {"blocked": False, "attempts": seen,
                "statement": "the network guard was not installed in this process: network access was allowed"}
    procs = len({a.get("pid") for a in seen})
    return {"blocked": True, "attempts": seen, "guarded_events": sorted(NET_EVENTS),
            "statement": (
                "outbound network blocked for the whole run, child processes included (the shape-test "
                "pytest, `all --jobs` children, torchrun workers: each gets the guard through MMSYS_OFFLINE "
                f"and grader/child_site/sitecustomize.py); {len(seen)} attempt(s) refused in {procs} "
                "process(es), every one listed under attempts; nothing was downloaded. Outside the guard: "
                "Java subprocesses (pycocoevalcap's tokenizer, METEOR, SPICE), which read only local "
                "files, and native code opening its own sockets (torch's gloo/TCPStore rendezvous, on "
                "loopback).")}
