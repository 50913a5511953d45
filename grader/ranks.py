"""``grader.py MID --nproc N``: grade one milestone with its training spread over N processes.

The grader starts N copies of itself, one per rank, with the variables torchrun would set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): every copy runs
the whole milestone, the same program on the same data, so each training step happens on every
rank at once and the engine (:mod:`mmsys.train`, DDP) splits its global batch across them.
Evaluation is repeated on every rank (the same models, the same metrics); rank 0 writes the run
folder and prints, the others write into a temporary folder that is removed afterwards (their
logs are printed if they fail). The exit code is rank 0's, or a failure if another rank failed.

With ``--isolation process`` (the default) it is each rank's candidate process that trains, so
the variables go to the candidate, not to the grader's own process (:func:`take_rank_env`): a
judge the grader trains itself (m5's) is trained whole on every rank. Where the candidates run
in their own network namespace (as root), they share one, made here with its loopback up, so
they can meet on 127.0.0.1 and reach nothing else.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grader import EXIT_FAIL, REPO

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GLOO_SOCKET_IFNAME")
NETNS_VAR = "MMSYS_RANKS_NETNS"  # the network namespace the ranks' candidate processes share
COMMAND_VAR = "MMSYS_RANKS_COMMAND"  # the command that started the ranks (their reports name it)
_TAKEN: dict[str, str] = {}  # this rank's variables, kept for the candidate process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_netns() -> subprocess.Popen | None:
    """A process holding a new network namespace whose loopback is up (None where namespaces
    cannot be made or ``ip`` is missing: the candidates then use the host's loopback)."""
    from grader.candidate import _can_drop
    if not (_can_drop() and shutil.which("ip")):
        return None
    holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep infinity"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.2)
    return holder if holder.poll() is None else None


def take_rank_env() -> dict[str, str]:
    """In a rank's grader process that grades through a candidate process: move the rank
    variables out of this process's environment (its own trainers run single-process) and keep
    them for :func:`candidate_env`. Returns them."""
    for k in RANK_VARS:
        if k in os.environ:
            _TAKEN[k] = os.environ.pop(k)
    return dict(_TAKEN)


def candidate_env() -> dict[str, str]:
    """The rank variables a candidate process gets (empty outside ``--nproc``)."""
    return dict(_TAKEN)


def world_size() -> int:
    """The number of ranks this grader process is one of (1 outside ``--nproc``)."""
    return int(_TAKEN.get("WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def rank_options(args: argparse.Namespace, rank: int, out: Path) -> list[str]:
    """Rank ``rank``'s command line: the parent's options (its drawn test seed included),
    rank > 0 with its own output folder, no shape tests and no progress bars."""
    from grader.parallel import child_options
    rest = child_options(args)
    if rank == 0:
        if not args.no_progress:
            rest.remove("--no-progress")
        return rest
    i = rest.index("--out")
    rest[i + 1] = str(out)
    return rest + (["--skip-tests"] if "--skip-tests" not in rest else [])


def launch(mid: str, args: argparse.Namespace) -> int:
    """Grade ``mid`` on ``args.nproc`` ranks (the parent's checks and ``prepare`` done)."""
    from grader.offline import child_env
    from grader.report import command_line
    from grader.run import out_dir_for

    n = args.nproc
    tmp = Path(tempfile.mkdtemp(prefix="mmsys-ranks-"))
    holder = shared_netns() if getattr(args, "isolation", "none") == "process" else None
    env = child_env(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env[COMMAND_VAR] = command_line()
    env.update(WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               GLOO_SOCKET_IFNAME="lo")  # gloo's own address: loopback (the host name may name no interface there)
    if holder is not None:
        env[NETNS_VAR] = f"/proc/{holder.pid}/ns/net"
    print(f"== {mid}: {n} ranks ({env['OMP_NUM_THREADS']} threads each), rank 0 writes {out_dir_for(mid, args)}",
          flush=True)
    procs, logs = [], []
    try:
        for r in range(n):
            out = tmp / f"rank{r}"
            if r and args.resume:  # every rank continues the same checkpoint
                src = out_dir_for(mid, args) / "checkpoint.pt"
                dst = out_dir_for(mid, argparse.Namespace(**{**vars(args), "out": out}))
                if src.exists():
                    dst.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst / "checkpoint.pt")
            cmd = [sys.executable, str(REPO / "grader.py"), mid, *rank_options(args, r, out)]
            log = None if r == 0 else open(tmp / f"rank{r}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          stdout=log, stderr=subprocess.STDOUT if log else None))
        codes = _wait(procs)
        for r, code in enumerate(codes[1:], start=1):
            if code != codes[0]:
                text = (tmp / f"rank{r}.log").read_text(errors="replace")
                print(f"== rank {r} exited {code} (rank 0: {codes[0]}); its log's end:\n{text[-4000:]}", flush=True)
        return codes[0] if all(c == codes[0] for c in codes) else max(max(codes), EXIT_FAIL)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            if f is not None:
                f.close()
        if holder is not None:
            holder.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(procs: list[subprocess.Popen], grace_s: float = 60.0) -> list[int]:
    """Exit codes of all ranks; once one fails the rest get ``grace_s`` to finish (a rank
    waiting in a collective for a dead peer would wait until the engine's timeout), then are
    stopped."""
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > grace_s:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.5)
    return [p.returncode for p in procs]
