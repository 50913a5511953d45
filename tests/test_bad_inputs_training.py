"""Issue 18, training rows: a loss or gradient that turns non-finite stops the run before any save
(the last finite checkpoint stays byte-identical), raises TrainingDiverged naming the step, what
and the likely cause, and the grader writes a failed report and exits 1 with one line; finite
training is bit-identical to a plain AdamW loop; stale temporaries of a killed save are removed
on the next start. Tiny MLPs on CPU, a few steps, seeded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from mmsys.batching import batch_indices, batch_len, mix_seed, split_batch
from mmsys.checkpoint import load_checkpoint, save_checkpoint
from mmsys.data.paths import atomic_torch_save, atomic_write_text
from mmsys.optim import build_optimizer, build_scheduler
from mmsys.tempfiles import STALE_AFTER_S, make_temp, remove_stale_temps
from mmsys.train import Trainer, TrainConfig, TrainingDiverged, seed_everything

REPO = Path(__file__).resolve().parents[1]
X = torch.randn(48, 6, generator=torch.Generator().manual_seed(3))
Y = X @ torch.linspace(-1, 1, 6)


def get_batch(idx, g):
    return X[idx] + 0.01 * torch.randn(len(idx), 6, generator=g), Y[idx]


def mse(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean(), {}


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 1))


def trainer(out=None, loss_fn=mse, model=None, **kw):
    seed_everything(0)
    cfg = TrainConfig(**{"steps": 10, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "progress": False,
                         "log_every": 2, "out_dir": str(out) if out else None, **kw})
    return Trainer(model or mlp(), cfg, loss_fn=loss_fn, data_size=len(X), get_batch=get_batch, kind="mlp")


def snapshot(folder: Path) -> dict:
    """File name -> (bytes, mtime_ns) of every file in ``folder``."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


class NaNAfter:
    """A loss_fn that is ``mse`` for its first ``k - 1`` calls and NaN from call ``k`` (step k);
    at that call it records the run folder as it is (the periodic checkpoint saved before)."""

    def __init__(self, k: int, folder: Path | None = None):
        self.k, self.calls, self.folder, self.before = k, 0, folder, None

    def __call__(self, model, batch):
        self.calls += 1
        loss, m = mse(model, batch)
        if self.calls >= self.k:
            if self.before is None and self.folder is not None:
                self.before = snapshot(self.folder)
            loss = loss * float("nan")
        return loss, m


def assert_one_line(msg: str, *words: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


# ----------------------------------------------------------------------------- the engine

def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path):
    loss_fn = NaNAfter(5, tmp_path)
    t = trainer(tmp_path, loss_fn=loss_fn, ckpt_every=2)
    with pytest.raises(TrainingDiverged) as info:
        t.fit()
    e = info.value
    assert (e.step, t.step) == (5, 4) and loss_fn.calls == 5  # stopped at step 5, before its update
    assert "the loss (nan)" in e.what
    assert_one_line(str(e), "step 5", "likely cause", "learning rate", "checkpoint.pt, the last finite checkpoint, is kept")
    assert snapshot(tmp_path) == loss_fn.before  # checkpoint.pt (step 4) and metrics.jsonl: byte-identical, same mtimes
    assert sorted(loss_fn.before) == ["checkpoint.pt", "metrics.jsonl"]  # no train_summary.json, no .tmp
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 4
    assert all(torch.equal(ck["model"][k], v) for k, v in t.model.state_dict().items())  # step 5 changed nothing


def test_nan_loss_on_the_first_step_blames_the_data_or_the_loss(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        trainer(tmp_path, loss_fn=NaNAfter(1), ckpt_every=2).fit()
    assert info.value.step == 1 and "before any update" in info.value.likely_cause
    assert_one_line(str(info.value), "no checkpoint was written")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_nan_in_the_input_batch_is_named_as_the_cause():
    def bad_batch(idx, g):
        x, y = get_batch(idx, g)
        return x.index_fill(0, torch.tensor([0]), float("nan")) if int(idx[0]) % 2 else x, y
    t = trainer()
    t.get_batch = bad_batch
    with pytest.raises(TrainingDiverged) as info:
        t.fit()
    assert "bad input batch" in info.value.likely_cause


def test_nan_gradient_from_a_hook_names_the_parameter(tmp_path):
    model, calls, before = mlp(), [], {}

    def poison(grad):  # NaN gradient from step 3 on; records the folder as step 2 left it
        calls.append(1)
        if len(calls) == 3:
            before.update(snapshot(tmp_path))
        return grad * float("nan") if len(calls) >= 3 else grad
    model[0].bias.register_hook(poison)
    t = trainer(tmp_path, model=model, ckpt_every=2)
    with pytest.raises(TrainingDiverged) as info:
        t.fit()
    e = info.value
    assert (e.step, t.step) == (3, 2) and "the gradient of 0.bias (optimizer parameter group 1)" in e.what
    assert_one_line(str(e), "step 3", "likely cause")
    assert snapshot(tmp_path) == before and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_huge_learning_rate_stops_before_saving_non_finite_weights(tmp_path):
    t = trainer(tmp_path, lr=1e30, warmup_steps=0, ckpt_every=1, grad_clip=None)
    with pytest.raises(TrainingDiverged) as info:
        t.fit()
    assert "learning rate" in info.value.likely_cause and info.value.step >= 2
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == info.value.step - 1  # the one before the failing step, finite
    assert all(bool(torch.isfinite(v).all()) for v in ck["model"].values())


def test_update_to_infinite_weights_is_not_saved(tmp_path):
    t, before, calls = trainer(tmp_path, ckpt_every=1), {}, []

    def overflow(opt, args, kwargs):  # the 2nd update makes a weight infinite
        calls.append(1)
        if len(calls) == 2:
            before.update(snapshot(tmp_path))
            t.model[3].weight.data[0, 0] = float("inf")
    t.optimizer.register_step_post_hook(overflow)
    with pytest.raises(TrainingDiverged) as info:
        t.fit()
    assert (info.value.step, info.value.what) == (2, "the weight 3.weight after the update")
    assert_one_line(str(info.value), "step 2", "learning rate", "is kept")
    assert snapshot(tmp_path)["checkpoint.pt"] == before["checkpoint.pt"]  # step 2's finite loss was logged
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_training_diverged_pickles():
    import pickle
    e = pickle.loads(pickle.dumps(TrainingDiverged(7, "the loss (nan)", "bad input batch", "kept")))
    assert (e.step, e.what, e.likely_cause, str(e).endswith("; kept")) == (7, "the loss (nan)", "bad input batch", True)


@pytest.mark.parametrize("grad_clip,grad_accum", [(1.0, 1), (None, 1), (0.05, 2)])
def test_finite_training_is_bit_identical_to_a_plain_adamw_loop(grad_clip, grad_accum):
    """The per-step check changes no number: the engine's weights after N steps equal a plain
    loop's (same batches, seeds, AdamW, schedule, clip_grad_norm_) bit for bit."""
    t = trainer(grad_clip=grad_clip, grad_accum=grad_accum)
    t.fit()
    seed_everything(0)
    model, cfg = mlp(), t.cfg
    opt, n = build_optimizer(model, cfg), cfg.batch_size
    sched = build_scheduler(opt, cfg)
    for step in range(cfg.steps):
        idx = batch_indices(step, len(X), n, cfg.seed)
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, 1, step, 0))
        torch.manual_seed(mix_seed(cfg.seed, 2, step, 0))
        batch = get_batch(idx, g)
        opt.zero_grad(set_to_none=True)
        for mb in split_batch(batch, grad_accum):
            (mse(model, mb)[0] * (batch_len(mb) / n)).backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
    for (k, a), b in zip(t.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- the grader

FAKE_MILESTONE = """
import sys
from pathlib import Path
import torch
from torch import nn
import milestones
from milestones.base import Criterion, Gate, Milestone
from mmsys.train import Trainer, TrainConfig

snap = Path(sys.argv[1])

class Fake(Milestone):
    id, title, marker = "m1", "fake: loss turns NaN at step 3", "m1"
    gates = (Gate("acc", "accuracy of nothing"),)
    criteria = (Criterion("it trains", "gate:acc"),)
    thresholds = {"quick": {"acc": 0.5}}

    def run(self, ctx):
        calls = []
        def loss_fn(model, batch):
            calls.append(1)
            if len(calls) == 3:
                ck = ctx.out_dir / "checkpoint.pt"
                snap.write_bytes(ck.read_bytes()); snap.with_suffix(".mtime").write_text(str(ck.stat().st_mtime_ns))
            return model(batch).pow(2).mean() * (float("nan") if len(calls) >= 3 else 1.0), {}
        torch.manual_seed(0)
        t = Trainer(nn.Linear(4, 1), TrainConfig(steps=6, batch_size=4, lr=1e-2, ckpt_every=2, progress=False,
                    out_dir=str(ctx.out_dir)), loss_fn=loss_fn, data_size=8,
                    get_batch=lambda idx, g: torch.ones(len(idx), 4), kind="fake")
        t.fit()
        raise AssertionError("unreachable: training diverges")

milestones.load = lambda mid: Fake()
from grader.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.integration
def test_grader_writes_a_failed_report_and_exits_1_with_one_line(tmp_path):
    snap, out = tmp_path / "snap.pt", tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FAKE_MILESTONE), str(snap), "m1", "--skip-tests",
                           "--no-progress", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("grader: error: training diverged at step 3: the loss (nan) is not finite; "
                                  "likely cause:"), proc.stderr
    report = json.loads((out / "m1" / "report.json").read_text())
    assert report["status"] == "fail" and "step 3" in report["error"] and "likely cause" in report["error"]
    assert report["info"]["training_diverged"]["step"] == 3
    assert all(g["value"] is None and not g["passed"] for g in report["gates"])
    ck = out / "m1" / "checkpoint.pt"
    assert ck.read_bytes() == snap.read_bytes() and str(ck.stat().st_mtime_ns) == snap.with_suffix(".mtime").read_text()
    assert "FAIL" in proc.stdout


# ----------------------------------------------------------------------------- stale temporaries

def make_stale(folder: Path, name: str, *, pid: int | None = None, legacy: bool = False, age: float = 0.0,
               rand: str = "x1y2z3w4") -> Path:
    """A temporary as a killed save of ``folder/name`` leaves it (pid ``pid``, or an old-style name)."""
    p = folder / (f".{name}.{rand}.tmp" if legacy else f".{name}.{pid}.{rand}.tmp")
    p.write_bytes(b"\0" * 1000)
    if age:
        t = time.time() - age
        os.utime(p, (t, t))
    return p


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no such process (reuse within the test is vanishingly unlikely)


def test_stale_temps_of_a_killed_save_are_removed_on_the_next_save(tmp_path):
    target = tmp_path / "checkpoint.pt"
    dead = make_stale(tmp_path, "checkpoint.pt", pid=dead_pid())
    old = make_stale(tmp_path, "checkpoint.pt", legacy=True, age=STALE_AFTER_S + 5)
    live = make_stale(tmp_path, "checkpoint.pt", pid=os.getppid())  # a live writer: not ours to remove
    fresh_legacy = make_stale(tmp_path, "checkpoint.pt", legacy=True, rand="fresh_01")  # might still be being written
    other = make_stale(tmp_path, "other.pt", pid=dead_pid())  # another target's: left alone
    keep = [tmp_path / n for n in (".checkpoint.pt.notes", "checkpoint.pt.tmp", ".checkpoint.pt.1.abc.tmp", "notes.txt")]
    for p in keep:
        p.write_text("user file")
    save_checkpoint(target, {"kind": "mlp", "model": {"w": torch.ones(2)}})
    assert not dead.exists() and not old.exists()
    assert live.exists() and fresh_legacy.exists() and other.exists() and all(p.exists() for p in keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, live.name, fresh_legacy.name, other.name, *(p.name for p in keep)])


def test_trainer_start_removes_stale_checkpoint_temps(tmp_path):
    dead = make_stale(tmp_path, "checkpoint.pt", pid=dead_pid())
    user = tmp_path / "notes.txt"
    user.write_text("mine")
    trainer(tmp_path)
    assert not dead.exists() and user.read_text() == "mine"


def test_cache_writers_remove_their_stale_temps_and_name_theirs_with_the_pid(tmp_path):
    for write, name in ((lambda p: atomic_torch_save({"a": 1}, p), "cache.pt"),
                        (lambda p: atomic_write_text(p, "x\n"), "digest.txt")):
        dead = make_stale(tmp_path, name, pid=dead_pid())
        old = tmp_path / f".{name}.abcd1234"  # the old no-suffix name of these writers
        old.write_text("half")
        os.utime(old, (time.time() - STALE_AFTER_S - 1,) * 2)
        write(tmp_path / name)
        assert not dead.exists() and not old.exists() and (tmp_path / name).exists()
    fd, tmp = make_temp(tmp_path / "x.pt")
    os.close(fd)
    assert Path(tmp).name.startswith(f".x.pt.{os.getpid()}.") and tmp.endswith(".tmp")
    assert remove_stale_temps(tmp_path / "x.pt") == [] and Path(tmp).exists()  # our own live temp stays
    assert remove_stale_temps(tmp_path / "missing-folder" / "x.pt") == []
