"""The grader's side of the candidate process: start it, call the seam through it, stop it.

``grader.py ... --isolation process`` grades through here: the implementation is imported only
in a child (:mod:`grader.candidate_server`) and :data:`milestones.adapters.CANDIDATE` answers
every seam method by a remote call (:class:`RemoteImplementation`,
:meth:`milestones.adapters.Implementation.route_to`). The child gets a fresh folder holding
copies of the server, the wire (:mod:`grader.candidate_protocol`, :mod:`grader.candidate_wire`), ``milestones/adapters.py``,
the bundled ``mmsys`` (fallback for modules an implementation lacks) and the implementation's
``mmsys`` (so it cannot rewrite the files the integrity record hashes), and a working folder,
its cwd, HOME and TMPDIR, the only place it may write. Its environment is PATH, HOME, TMPDIR,
LANG and the thread variables.

As root (where ``setpriv`` and ``unshare`` work) the child runs as ``nobody:nogroup`` with no
supplementary groups and ``no_new_privs``, in its own mount and network namespaces (no network
interface but loopback; the Python installation bind-mounted into its folder, since root's home
is closed to ``nobody``): the grader's output folder is then not writable by it. Elsewhere the
audit-hook guard of the server is the protection; :meth:`CandidateProcess.isolation` says which applied.

Trainers write into the child's folder; the grader copies what they wrote (plain files only) to
the ``out_dir`` the recipe asked for, where the report hashes the checkpoint: the checkpoint each
time a new one is written (so ``--resume`` finds it), everything after ``fit()``. The child may
not read the grader's folders (:func:`grader_folders`: its tree, data, caches and output).
"""

from __future__ import annotations

import atexit
import collections
import os
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from grader.candidate_protocol import Endpoint
from grader.ranks import NETNS_VAR, candidate_env
from grader.candidate_wire import Arena

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DEFAULT_TIMEOUT = 1800.0  # seconds of silence from the child before a call fails
STARTUP_TIMEOUT = 300.0  # the floor for the child's start (importing torch and the implementation), under load
ARENA_BYTES = 128 << 20  # shared memory for tensor bytes, each way (touched pages only)
# glibc: keep freed tensor memory instead of returning it to the kernel at once (the child's batches
# arrive as fresh 1.5 MB allocations every step: measured 736 page faults per round trip without,
# 7.3 M in an m1 quick grade, ~5 % of its time)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}
F_SETPIPE_SZ = 1031  # Linux: larger pipe buffers, fewer wake-ups for what crosses inline
UNPRIVILEGED = ("nobody", "nogroup")


class CandidateError(RuntimeError):
    """The candidate process failed the grader: it crashed, hung, or could not start."""


class CandidateCrashed(CandidateError):
    pass


class CandidateTimeout(CandidateError):
    pass


def _can_drop() -> bool:
    """Root with setpriv, unshare and mount namespaces: the child can run as nobody, offline."""
    if os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("unshare")):
        return False
    probe = subprocess.run(["unshare", "-m", "-n", "true"], capture_output=True)
    return probe.returncode == 0


def _copy_package(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), symlinks=False)


class CandidateProcess:
    """One child serving ``Implementation("mmsys")`` for the implementation folder ``impl``
    (holding ``mmsys/``; None: the bundled package). ``timeout``: seconds of silence after
    which a call fails. ``drop``: run as nobody in its own namespaces (default: when root can)."""

    def __init__(self, impl: Path | None, threads: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                 drop: bool | None = None, deny_read=()):
        import torch
        self.impl, self.timeout = (Path(impl).resolve() if impl else None), timeout
        self.deny_read, self.not_denied = [Path(d).resolve() for d in deny_read if d], []
        self.threads = threads or torch.get_num_threads()
        self.drop = _can_drop() if drop is None else drop
        self.stderr_tail: collections.deque = collections.deque(maxlen=30)
        self.proc, self.ep, self.dir, self.runs = None, None, None, 0
        self.hello: dict = {}

    # ---------------------------------------------------------------- start / stop
    def start(self) -> "CandidateProcess":
        self.dir = Path(tempfile.mkdtemp(prefix="mmsys-candidate-"))
        d = self.dir
        d.chmod(0o755)
        (d / "server").mkdir()
        for f in ("candidate_server.py", "candidate_protocol.py", "candidate_wire.py"):
            shutil.copy2(HERE / f, d / "server" / f)
        shutil.copy2(REPO / "milestones" / "adapters.py", d / "server" / "adapters.py")
        _copy_package(REPO / "mmsys", d / "bundled" / "mmsys")
        if self.impl is not None:
            _copy_package(self.impl / "mmsys", d / "impl" / "mmsys")
        work = d / "work"
        (work / "tmp").mkdir(parents=True)
        sites = [s for s in site.getsitepackages() + [site.getusersitepackages()] if Path(s).is_dir()]
        import torch
        torch_site = str(Path(torch.__file__).resolve().parents[1])
        sites = list(dict.fromkeys([torch_site] + sites))
        python, mounts = sys.executable, []
        if self.drop:
            import grp
            import pwd
            uid, gid = pwd.getpwnam(UNPRIVILEGED[0]).pw_uid, grp.getgrnam(UNPRIVILEGED[1]).gr_gid
            for root, _, files in os.walk(work):
                os.chown(root, uid, gid)
            prefixes = list(dict.fromkeys([sys.base_prefix, sys.prefix]))
            for i, prefix in enumerate(prefixes):
                mounts.append((prefix, str(d / f"py{i}")))
                (d / f"py{i}").mkdir()
            python = str(d / "py0" / "bin" / Path(sys.executable).name)
            if sys.prefix != sys.base_prefix:
                python = str(d / "py1" / "bin" / Path(sys.executable).name)
            sites = [self._translate(s, mounts) for s in sites]
        r_child, w_parent = os.pipe()
        r_parent, w_child = os.pipe()
        for fd in (w_parent, w_child):
            try:
                import fcntl
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
        arena_names = [str(shm / f"{d.name}-{way}") for way in ("to-child", "to-grader")]
        arenas = [Arena(name, ARENA_BYTES, create=True) for name in arena_names]
        if self.drop:
            for name in arena_names:
                os.chown(name, uid, gid)
        cmd = [python, "-I", "-S", "-B", str(d / "server" / "candidate_server.py"), "--fd-in", str(r_child), "--fd-out", str(w_child),
               "--work", str(work), "--bundled", str(d / "bundled" / "mmsys"), "--threads", str(self.threads)]
        if self.impl is not None:
            cmd += ["--impl", str(d / "impl")]
        cmd += ["--arena-in", arena_names[0], "--arena-out", arena_names[1], "--arena-bytes", str(ARENA_BYTES)]
        for s in sites:
            cmd += ["--site", s]
        # the grader's folders, closed to reading; one holding what the child itself needs (its own
        # folder, the Python installation) cannot be, and the report says so
        needed = [d, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()] + [Path(s).resolve() for s in sites]
        for folder in dict.fromkeys(self.deny_read):
            if any(n == folder or folder in n.parents for n in needed):
                self.not_denied.append(str(folder))
            else:
                cmd += ["--deny-read", str(folder)]
        if self.drop:
            binds = " && ".join(f"mount --bind '{src}' '{dst}'" for src, dst in mounts)
            cmd = [*self._network_namespace(), "sh", "-c", f"{binds} && exec \"$@\"", "sh",
                   "setpriv", f"--reuid={UNPRIVILEGED[0]}", f"--regid={UNPRIVILEGED[1]}", "--clear-groups",
                   "--no-new-privs", *cmd]
        threads = str(self.threads)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work / "tmp"), "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **MALLOC}
        if self.drop:  # the interpreter's rpath may name a folder nobody cannot enter: its library from the mount
            env["LD_LIBRARY_PATH"] = str(d / "py0" / "lib")
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        env.update(candidate_env())  # --nproc: this rank's RANK, WORLD_SIZE, MASTER_ADDR ... (grader/ranks.py)
        self.proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, pass_fds=(r_child, w_child), start_new_session=True)
        os.close(r_child)
        os.close(w_child)
        threading.Thread(target=self._tee, daemon=True).start()
        self.ep = Endpoint(Connection(r_parent), Connection(w_parent), grader=True, timeout=self.timeout,
                           on_silence=self._silence, on_eof=self._eof, on_violation=self._violation,
                           arenas=(arenas[1], arenas[0]))
        atexit.register(self.close)
        # starting (an interpreter importing torch and the implementation) is not a call: under load
        # it can outlast a short --call-timeout, so it has its own floor
        self.ep.timeout = max(self.timeout, STARTUP_TIMEOUT)
        try:
            self.hello = self.call_server("hello")
        finally:
            self.ep.timeout = self.timeout
            for name in arena_names:  # both sides have mapped them: nothing is left behind
                os.unlink(name)
        return self

    @staticmethod
    def _network_namespace() -> list[str]:
        """The command prefix giving the child its own mount namespace and a network namespace:
        a new one (only loopback, down), or under ``--nproc`` the one the ranks' candidates share
        (its loopback up: they meet there), or, where no shared one could be made, the host's."""
        if not candidate_env():
            return ["unshare", "-m", "-n"]
        shared = os.environ.get(NETNS_VAR)
        return ["nsenter", f"--net={shared}", "unshare", "-m"] if shared else ["unshare", "-m"]

    @staticmethod
    def _translate(path: str, mounts) -> str:
        for src, dst in mounts:
            if path == src or path.startswith(src.rstrip("/") + "/"):
                return dst + path[len(src.rstrip("/")):]
        return path

    def _tee(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.stderr_tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    def _tail(self) -> str:
        lines = [ln for ln in self.stderr_tail if ln.strip()][-12:]
        return ("; its last output:\n    " + "\n    ".join(lines)) if lines else "; it printed nothing"

    def _eof(self, what):
        code = self.proc.wait(timeout=10) if self.proc else None
        time.sleep(0.2)  # the tee thread's last lines
        return CandidateCrashed(f"the candidate process exited (code {code}) in {what}{self._tail()}")

    def _silence(self, what):
        self.kill()
        return CandidateTimeout(f"the candidate process did not answer within {self.ep.timeout:g} s in {what} "
                                f"(killed){self._tail()}")

    def _violation(self, what, why):
        self.kill()
        return CandidateError(f"the candidate process sent a message the grader refuses in {what} ({why}); "
                              f"killed{self._tail()}")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=10)

    def close(self):
        """Stop the child (closing its pipe ends it) and remove its folder."""
        if self.ep is not None:
            for c in (self.ep.cout, self.ep.cin):
                try:
                    c.close()
                except OSError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # ---------------------------------------------------------------- calls
    def call_server(self, name: str, *args):
        """A method of the server itself (``hello``, ``supplied_by``, ``attempts``, ``cpu_time``)."""
        return self.ep.request("method", 1, (name, *args), {}, label=name)

    def call(self, method: str, *args, **kwargs):
        """``Implementation.<method>(*args, **kwargs)`` in the child."""
        return self.ep.request("method", 0, (method, *args), kwargs, label=method)

    def work_dir(self) -> Path:
        """A fresh folder under the child's working folder (a trainer's out_dir)."""
        self.runs += 1
        path = self.dir / "work" / f"run-{self.runs}"
        path.mkdir()
        if self.drop:
            shutil.chown(path, *UNPRIVILEGED)
        return path

    def _network_note(self) -> str:
        if not candidate_env():
            return "own network namespace (unshare -n): no interface but loopback"
        if os.environ.get(NETNS_VAR):
            return ("a network namespace shared by the --nproc ranks' candidates only: loopback, where they meet "
                    "(no other interface)")
        return ("--nproc: the host's network namespace (no shared one could be made), so the ranks can meet on "
                "its loopback; the audit hook still refuses Python network sockets")

    def isolation(self) -> dict:
        """What the report's ``provenance.isolation`` says: mode, user, protections applied and
        what the guard refused."""
        prot = ["separate process: the implementation is imported only there",
                "python -I -S -B: no PYTHONPATH, user site or .pth files; the grader's packages not importable "
                f"(checked: {self.hello.get('importable')})",
                "minimal environment (PATH, HOME, TMPDIR, LANG, thread counts; under --nproc the rank's "
                "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)",
                "own working folder, the only place it may write; the implementation runs from a copy",
                "audit hook: writes outside its folder, network sockets, name lookups and new programs refused",
                "audit hook: nothing read or listed in the grader's folders (" + (", ".join(
                    str(f) for f in self.deny_read if str(f) not in self.not_denied) or "none given") + ")"
                + (f"; not closed, the child needs them: {', '.join(self.not_denied)}" if self.not_denied else ""),
                "replies unpickled with no globals allowed (data only)",
                f"per-call timeout {self.timeout:g} s of silence"]
        if self.drop:
            prot += [f"runs as {UNPRIVILEGED[0]}:{UNPRIVILEGED[1]} (setpriv --clear-groups --no-new-privs): the "
                     f"grader's files and output folder are not writable by it",
                     self._network_note()]
        else:
            prot.append("not root (or no setpriv/unshare): runs as the grader's own user; the audit hook is the "
                        "only barrier to writing the grader's files")
        out = {"mode": "process", "user": UNPRIVILEGED[0] if self.drop else f"uid {os.getuid()} (the grader's)",
               "uid": self.hello.get("uid"), "protections": prot}
        if self.ep is not None and not self.ep.dead:
            out.update(self.call_server("attempts"))
            out["child_cpu_s"] = self.call_server("cpu_time")
        return out


class RemoteImplementation:
    """The seam's methods answered by a :class:`CandidateProcess` (started on first use).
    ``trainer`` writes in the child's folder: its checkpoint is copied to ``out_dir`` each time
    it is written, every file it wrote after ``fit()``."""

    def __init__(self, impl: Path | None, timeout: float = DEFAULT_TIMEOUT, drop: bool | None = None,
                 deny_read=()):
        self.impl, self.timeout, self.drop, self.deny_read = impl, timeout, drop, list(deny_read)
        self.process: CandidateProcess | None = None

    def candidate(self) -> CandidateProcess:
        if self.process is not None and self.process.ep.dead:  # crashed or hung earlier: a fresh one
            self.process.close()
            self.process = None
        if self.process is None:
            self.process = CandidateProcess(self.impl, timeout=self.timeout, drop=self.drop,
                                            deny_read=self.deny_read).start()
            if self.process.hello.get("error"):
                from milestones.adapters import ImplementationError
                why = self.process.hello["error"].removeprefix("ImplementationError: ")
                why = why.replace(str(self.process.dir / "impl"), str(self.impl))  # the user's folder, not the copy
                self.close()
                raise ImplementationError(why if why.startswith("--impl ") else f"--impl {self.impl}: {why}")
        return self.process

    def module(self, name: str):
        raise RuntimeError(f"isolation=process: the grader cannot import the implementation's module {name!r}")

    def __getattr__(self, name):
        from milestones.adapters import Implementation
        if name.startswith("_") or not getattr(getattr(Implementation, name, None), "milestones", None):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.candidate().call(name, *args, **kwargs)

    def trainer(self, model, config: dict, **kwargs):
        c = self.candidate()
        wanted, child = config.get("out_dir"), c.work_dir()
        if wanted and kwargs.get("resume_from") == "auto" and (Path(wanted) / "checkpoint.pt").is_file():
            shutil.copy2(Path(wanted) / "checkpoint.pt", child / "checkpoint.pt")
        if wanted and callable(kwargs.get("get_batch")):  # checkpoints reach out_dir as they are written
            kwargs = {**kwargs, "get_batch": _syncing_checkpoint(kwargs["get_batch"], child, Path(wanted))}
        handle = c.call("trainer", model, {**config, "out_dir": str(child) if wanted else None}, **kwargs)
        if wanted:
            handle._wrap["fit"] = lambda fit: lambda *a, **k: _copied_after(fit(*a, **k), child, Path(wanted))
        return handle

    def supplied_by(self) -> dict:
        return self.candidate().call_server("supplied_by")

    def close(self):
        if self.process is not None:
            self.process.close()
            self.process = None


def _copy_plain(src: Path, dst: Path) -> bool:
    """Copy ``src`` to ``dst`` if it is a plain file (symlinks and special files are skipped: the
    child cannot make the grader read elsewhere), through a temporary file and a rename, so
    ``dst`` is never half-written. Returns whether it copied."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f_in:
        if not stat.S_ISREG(os.fstat(f_in.fileno()).st_mode):
            return False
        tmp = dst.with_name(f".{dst.name}.from-candidate.tmp")
        with open(tmp, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out, 1 << 20)
    os.replace(tmp, dst)
    return True


def _syncing_checkpoint(get_batch, src: Path, dst: Path):
    """``get_batch``, which after each call copies ``src/checkpoint.pt`` to ``dst`` when the child
    has written a new one (one ``stat`` per step): so ``--resume`` finds the last checkpoint of a
    run that was stopped, as in-process."""
    seen = [None]

    def synced(*args, **kwargs):
        batch = get_batch(*args, **kwargs)
        try:
            st = os.lstat(src / "checkpoint.pt")
        except OSError:
            return batch
        if (st.st_mtime_ns, st.st_size) != seen[0]:  # _copy_plain skips anything but a plain file
            seen[0] = (st.st_mtime_ns, st.st_size)
            dst.mkdir(parents=True, exist_ok=True)
            _copy_plain(src / "checkpoint.pt", dst / "checkpoint.pt")
        return batch
    synced.__name__ = getattr(get_batch, "__name__", "get_batch")
    return synced


def _copied_after(result, src: Path, dst: Path):
    """``result``, once the plain files the child wrote in ``src`` are copied into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(src):
        _copy_plain(Path(entry.path), dst / entry.name)
    if isinstance(result, dict) and str(result.get("checkpoint") or "").startswith(str(src)):
        result = {**result, "checkpoint": str(dst / Path(result["checkpoint"]).name)}  # where the grader has it
    return result


_REMOTE: RemoteImplementation | None = None


def grader_folders(*extra) -> list[Path]:
    """The folders a candidate may not read: the grader's tree (its code, caches, runs), the
    shared data and mmsys cache folders, and ``extra`` (``--data-root``, ``--out``)."""
    from eval.reference.data.paths import cache_dir, shared_data_root
    folders = [REPO, shared_data_root(), cache_dir(), *extra]
    return [Path(f).resolve() for f in folders if f is not None]


def isolate(impl: Path | str | None, timeout: float | None = None, deny_read=(), start: bool = False) -> dict:
    """``--isolation process``: route :data:`milestones.adapters.CANDIDATE` to a candidate process
    for ``impl``, which may not read ``deny_read`` (default: none); started now with ``start``
    (an implementation that cannot be imported is then an ImplementationError before any work),
    else on the first call. Returns :func:`describe_implementation`'s record."""
    global _REMOTE
    from milestones.adapters import CANDIDATE, describe_implementation
    info = describe_implementation(impl)
    _REMOTE = RemoteImplementation(Path(impl) if impl else None, timeout or DEFAULT_TIMEOUT, deny_read=deny_read)
    CANDIDATE.route_to(_REMOTE)
    atexit.register(_REMOTE.close)
    if start:
        _REMOTE.candidate()
    return info


def current() -> RemoteImplementation | None:
    """The remote implementation :func:`isolate` set up (None: in-process grading)."""
    return _REMOTE
