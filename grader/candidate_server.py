"""The candidate process: imports the implementation under test and serves the seam's calls.

A standalone script (stdlib + torch; never ``grader``, ``milestones`` or ``eval``). The grader
(:mod:`grader.candidate`) copies it, :mod:`grader.candidate_protocol`, :mod:`grader.candidate_wire` and
``milestones/adapters.py`` into a fresh folder and starts ``python -I -S -B server.py ...``
there: no PYTHONPATH, no user site, no ``.pth`` files (so no editable install maps the grader's
packages in), only the site-packages folders it is told (for torch). ``sys.path`` then holds
that folder, the standard library, those site-packages, and the implementation's ``mmsys``,
loaded by :func:`adapters.use_implementation` with a fallback to a copy of the bundled package.

Before anything of the implementation is imported, :class:`Guard` installs an audit hook
(:func:`sys.addaudithook`, which cannot be removed) that refuses, and records, writes outside
the working folder, network sockets and new programs; the grader reads the record
(``ServerInfo.attempts``) and puts it in the report. The hook is a second line: code in native
extensions (ctypes) can pass it, which is why, as root, the grader also runs this process as
``nobody`` in its own network namespace (see :mod:`grader.candidate`).

Calls arrive on the file descriptors ``--fd-in`` / ``--fd-out``; ``sys.stdout`` is sent to
stderr, so nothing the implementation prints can reach the wire.

    python -I -S -B server.py --fd-in 3 --fd-out 4 --work WORK --bundled B/mmsys [--impl I] [--site DIR]...
"""

from __future__ import annotations

import argparse
import os
import sys
import time

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.truncate", "os.utime",
               "os.link", "os.symlink", "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "shutil.move")
SPAWN_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn")
NAME_EVENTS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo")
LIST_EVENTS = ("os.listdir", "os.scandir", "glob.glob", "os.chdir")
MAX_RECORDED = 100


class Guard:
    """The audit hook: writes only under ``allowed`` folders (and /dev/null); nothing read or
    listed under ``denied`` ones (the grader's code, caches, data and output: the test split's
    labels live there); no socket but a local (AF_UNIX) one, no name lookups, no new programs.
    Refusals raise PermissionError and are appended to ``attempts`` (``{"event", "target"}``;
    the first :data:`MAX_RECORDED`)."""

    def __init__(self, allowed, denied=()):
        self.allowed = [os.path.realpath(a) for a in allowed]
        self.denied = [os.path.realpath(d) for d in denied]
        self.attempts: list[dict] = []
        self.refused = 0

    def _denied(self, path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        real = os.path.realpath(os.fsdecode(path))
        return any(real == d or real.startswith(d + os.sep) for d in self.denied)

    def _inside(self, path) -> bool:
        if isinstance(path, int):
            return True  # an open file descriptor: whatever it is, it was opened through this hook
        real = os.path.realpath(os.fsdecode(path))
        return real in ("/dev/null", "/dev/shm") or real.startswith("/dev/shm/") or any(
            real == a or real.startswith(a + os.sep) for a in self.allowed)

    def _refuse(self, event, target):
        self.refused += 1
        if len(self.attempts) < MAX_RECORDED:
            self.attempts.append({"event": event, "target": str(target)[:300]})
        raise PermissionError(f"refused by the grader's candidate sandbox: {event} {str(target)[:200]}")

    def __call__(self, event, args):
        if event == "open":
            path, flags = args[0], args[2] if len(args) > 2 else 0
            if isinstance(flags, int) and flags & WRITE_FLAGS and path is not None and not self._inside(path):
                self._refuse("open for writing", path)
            if self._denied(path):
                self._refuse("read the grader's files", path)
        elif event in LIST_EVENTS:
            if args and isinstance(args[0], (str, bytes, os.PathLike)) and self._denied(args[0]):
                self._refuse("list the grader's files", args[0])
        elif event in PATH_EVENTS:
            for p in args[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and not self._inside(p):
                    self._refuse(event, p)
        elif event == "socket.__new__":
            import socket
            if len(args) > 1 and args[1] in (socket.AF_INET, socket.AF_INET6):
                self._refuse("network socket", args[1:])
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            import socket
            if getattr(args[0], "family", None) != getattr(socket, "AF_UNIX", None):
                self._refuse(event, args[1] if len(args) > 1 else "")
        elif event in NAME_EVENTS:
            self._refuse(event, args[0] if args else "")
        elif event in SPAWN_EVENTS:
            self._refuse("start a program", args[0] if args else "")


class GraderImports:
    """First on ``sys.meta_path``: an import of the grader's packages is refused and recorded (they
    are not on ``sys.path`` anyway; this names the attempt in the report)."""

    NAMES = ("grader", "milestones", "eval")

    def __init__(self, guard: Guard):
        self.guard = guard

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.NAMES:
            self.guard.refused += 1
            if len(self.guard.attempts) < MAX_RECORDED:
                self.guard.attempts.append({"event": "import", "target": fullname})
            raise ModuleNotFoundError(f"No module named {fullname!r} (the grader's packages are not importable "
                                      f"in the candidate process)", name=fullname)
        return None


class ServerInfo:
    """Exported as object #1: what the grader asks the server itself."""

    def __init__(self, guard: Guard, adapters, loaded: dict | None, error: str | None):
        self.guard, self.adapters, self.loaded, self.error = guard, adapters, loaded, error

    def hello(self) -> dict:
        """``{"error": None | why the implementation did not load, "loaded", "pid", "uid", "python",
        "sys_path", "importable": {package: bool}}`` (the last: whether the grader's packages can be
        imported here — never)."""
        import importlib.machinery
        importable = {name: importlib.machinery.PathFinder.find_spec(name) is not None
                      for name in GraderImports.NAMES}  # on sys.path at all (the refusing finder aside)
        return {"error": self.error, "loaded": self.loaded, "pid": os.getpid(), "uid": os.getuid(),
                "python": sys.version.split()[0], "sys_path": list(sys.path), "importable": importable}

    def supplied_by(self) -> dict:
        return self.adapters.supplied_by()

    def attempts(self) -> dict:
        return {"refused": self.guard.refused, "attempts": list(self.guard.attempts)}

    def cpu_time(self) -> float:
        return time.process_time()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fd-in", type=int, required=True)
    p.add_argument("--fd-out", type=int, required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--bundled", required=True, help="the copy of the bundled mmsys package folder")
    p.add_argument("--impl", default=None, help="folder holding the implementation's mmsys package")
    p.add_argument("--site", action="append", default=[])
    p.add_argument("--deny-read", action="append", default=[], help="a folder of the grader's: nothing read there")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--arena-in", default=None, help="shared memory the grader writes tensor bytes into")
    p.add_argument("--arena-out", default=None, help="shared memory this process writes tensor bytes into")
    p.add_argument("--arena-bytes", type=int, default=0)
    a = p.parse_args(argv)
    sys.dont_write_bytecode = True
    sys.stdout = sys.stderr  # the implementation's prints go to the log, never to the wire
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's folder out
    sys.path.extend(s for s in a.site if s not in sys.path)
    os.chdir(a.work)

    from multiprocessing.connection import Connection

    import torch
    guard = Guard([a.work], a.deny_read)  # after torch (the grader's dependency), before anything of the implementation
    sys.addaudithook(guard)
    sys.meta_path.insert(0, GraderImports(guard))

    import adapters
    from candidate_protocol import Endpoint
    from candidate_wire import Arena
    arenas = (None, None)
    if a.arena_in and a.arena_out:
        arenas = (Arena(a.arena_in, a.arena_bytes, create=False), Arena(a.arena_out, a.arena_bytes, create=False))
    if a.threads:
        torch.set_num_threads(a.threads)
    from pathlib import Path
    adapters.BUNDLED = Path(a.bundled).resolve()
    loaded, error = None, None
    try:
        loaded = adapters.use_implementation(a.impl)
    except Exception as e:  # reported to the grader by hello(): its ImplementationError, exit 2
        error = f"{type(e).__name__}: {e}"
    impl = adapters.Implementation("mmsys")
    ep = Endpoint(Connection(a.fd_in), Connection(a.fd_out), grader=False,
                  fixed=(impl, ServerInfo(guard, adapters, loaded, error)), arenas=arenas)
    ep.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
