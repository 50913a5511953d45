"""Training engine and checkpoints: schedules, parameter groups, accumulation, exact resume, EMA,
atomic saves and validated loads. Small MLPs on CPU; every test is seeded."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

import mmsys.checkpoint as ckmod
from mmsys.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from mmsys.optim import native_bf16
from mmsys.train import (EMA, Trainer, TrainConfig, batch_indices, build_optimizer, build_scheduler,
                         lr_at, param_groups, seed_everything, split_batch)


@dataclass
class MLPConfig:
    d_in: int = 8
    hidden: int = 16
    dropout: float = 0.0


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.d_in, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


X = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
Y = X @ torch.linspace(-1, 1, 8) + 0.1


def get_batch(idx, g):
    return X[idx] + 0.01 * torch.randn(len(idx), 8, generator=g), Y[idx]


def mse(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    return loss, {"abs_err": (model(x) - y).abs().mean().item()}


def make(tmp=None, mcfg=MLPConfig(), init_seed=0, resume_from=None, **kw):
    seed_everything(init_seed)
    cfg = TrainConfig(**{"steps": 8, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "progress": False,
                         "log_every": 2, "out_dir": str(tmp) if tmp else None, **kw})
    return Trainer(MLP(mcfg), cfg, loss_fn=mse, data_size=len(X), get_batch=get_batch, kind="mlp",
                   model_config=asdict(mcfg), resume_from=resume_from)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- schedule, groups

def test_lr_schedule_golden_values():
    cfg = TrainConfig(steps=110, batch_size=1, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)  # cosine midpoint
    assert lr_at(35, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(0.0)
    cfg2 = TrainConfig(steps=110, batch_size=1, lr=2.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(60, cfg2) == pytest.approx(2.0 * 0.55) and lr_at(110, cfg2) == pytest.approx(0.2)
    # the LambdaLR drives the optimizer through exactly these values
    cfg3 = TrainConfig(steps=12, batch_size=1, lr=2.0, warmup_steps=3, min_lr_ratio=0.1)
    opt = build_optimizer(nn.Linear(2, 2), cfg3)
    sched = build_scheduler(opt, cfg3)
    for step in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg3))
        opt.step()
        sched.step()


def test_warm_restart_schedule_golden_values():
    cfg = TrainConfig(steps=44, batch_size=1, lr=2.0, warmup_steps=4, restarts=((20, 0.5),))
    one = TrainConfig(steps=20, batch_size=1, lr=2.0, warmup_steps=4)
    assert all(lr_at(s, cfg) == lr_at(s, one) for s in range(20))  # the first cycle is the 20-step run
    assert lr_at(20, cfg) == pytest.approx(2.0 * 0.5 * 1 / 4)  # re-warmup to the new peak
    assert lr_at(23, cfg) == pytest.approx(1.0) and lr_at(24, cfg) == pytest.approx(1.0)
    assert lr_at(34, cfg) == pytest.approx(0.5)  # cosine midpoint of the second cycle
    assert lr_at(44, cfg) == pytest.approx(0.0)
    for bad in (((0, 0.5),), ((44, 0.5),), ((20, 0.0),), ((30, 0.5), (20, 0.5))):
        with pytest.raises(ValueError, match="restarts"):
            TrainConfig(steps=44, batch_size=1, lr=1.0, restarts=bad)


def test_no_decay_parameter_groups():
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 6))
            self.proj = nn.Linear(6, 6)
            self.norm = nn.LayerNorm(6)

        def no_weight_decay(self):
            return {"pos_embed"}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = Tower()
            self.tok = nn.Embedding(10, 6)
            self.logit_scale = nn.Parameter(torch.tensor(2.0))
            self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)

    m = Model()
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["tok.weight", "tower.proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "logit_scale", "tower.norm.bias", "tower.norm.weight", "tower.pos_embed", "tower.proj.bias"]


# ----------------------------------------------------------------------------- data indexing

def test_batch_indices_epochs_and_purity():
    n, b = 10, 4
    stream = torch.cat([batch_indices(s, n, b, seed=3) for s in range(5)])  # 20 items = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a fresh permutation per epoch
    assert torch.equal(batch_indices(3, n, b, 3), stream[12:16])  # pure function of (seed, step)
    assert not torch.equal(batch_indices(0, n, b, 4), batch_indices(0, n, b, 3))
    assert len(batch_indices(0, 3, 7, 0)) == 7  # batch larger than the dataset


def test_split_batch_containers_and_strings():
    batch = {"img": torch.arange(5), "caps": ["a", "b", "c", "d", "e"], "temp": torch.tensor(1.0),
             "pair": (torch.arange(5) * 2, torch.ones(5, 2))}
    parts = split_batch(batch, 2)
    assert [p["img"].tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    assert [p["caps"] for p in parts] == [["a", "b", "c"], ["d", "e"]]
    assert parts[1]["temp"].item() == 1.0 and parts[1]["pair"][0].tolist() == [6, 8]
    with pytest.raises(ValueError):
        split_batch(torch.arange(2), 3)


# ----------------------------------------------------------------------------- engine behaviour

@pytest.mark.parametrize("accum", [2, 3])
def test_grad_accumulation_equivalence(accum):
    a, b = make(grad_accum=1, steps=4), make(grad_accum=accum, steps=4)
    a.fit(), b.fit()
    for k, v in weights(a.model).items():
        torch.testing.assert_close(b.model.state_dict()[k], v, atol=1e-6, rtol=0)


def test_step_fn_matches_default_step():
    def step_fn(model, batch, n_micro, autocast_ctx):
        loss = 0.0
        for mb in split_batch(batch, n_micro):
            with autocast_ctx:
                l, _ = mse(model, mb)
            (l * len(mb[0]) / len(batch[0])).backward()
            loss += l.item() * len(mb[0]) / len(batch[0])
        return {"loss": loss}

    a = make(grad_accum=2)
    seed_everything(0)
    b = Trainer(MLP(MLPConfig()), a.cfg, step_fn=step_fn, data_size=len(X), get_batch=get_batch,
                kind="mlp")
    a.fit(), b.fit()
    for k, v in weights(a.model).items():
        torch.testing.assert_close(b.model.state_dict()[k], v, atol=1e-6, rtol=0)


def test_seeded_runs_are_identical():
    a, b = make(mcfg=MLPConfig(dropout=0.2)), make(mcfg=MLPConfig(dropout=0.2))
    a.fit(), b.fit()
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in weights(a.model).items())
    c = make(mcfg=MLPConfig(dropout=0.2), seed=1)
    c.fit()
    assert not torch.equal(c.model.net[0].weight, a.model.net[0].weight)


def test_exact_resume_after_kill(tmp_path):
    mcfg, kw = MLPConfig(dropout=0.2), dict(grad_accum=2, ema_decay=0.9, ckpt_every=4)
    straight = make(tmp_path / "a", mcfg, **kw)
    straight.fit()

    killed = make(tmp_path / "b", mcfg, **kw)
    calls = {"n": 0}

    def dying_loss(model, batch):
        calls["n"] += 1
        if calls["n"] > 2 * 5:  # 2 micro-batches per step: die inside step 6, after the step-4 save
            raise KeyboardInterrupt
        return mse(model, batch)

    killed.loss_fn = dying_loss
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt", "mlp")["step"] == 4

    resumed = make(tmp_path / "b", mcfg, init_seed=123, **kw)  # different init: all state must load
    resumed.resume(tmp_path / "b" / "checkpoint.pt")
    assert resumed.step == 4
    summary = resumed.fit()
    assert summary["steps"] == 8 and summary["start_step"] == 4 and not summary["stopped_early"]
    for k, v in weights(straight.model).items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in straight.ema.module.state_dict().items():
        assert torch.equal(resumed.eval_model().state_dict()[k], v), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # the killed run's step-6 line (if any) was dropped
    ck = load_checkpoint(tmp_path / "b" / "checkpoint.pt", "mlp")
    assert ck["step"] == 8 and ck["model_config"] == asdict(mcfg) and ck["config"]["ema_decay"] == 0.9


def test_resume_auto(tmp_path):
    first = make(tmp_path, ckpt_every=4)

    def dies_in_step_6(model, batch):
        if first.step >= 5:
            raise KeyboardInterrupt
        return mse(model, batch)

    first.loss_fn = dies_in_step_6
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    t = make(tmp_path, ckpt_every=4, resume_from="auto")
    assert t.step == 4 and t.time_before["segments"] == 1 and t.time_before["wall_s"] > 0
    summary = t.fit()
    assert summary["start_step"] == 4 and summary["total"]["segments"] == 2
    assert summary["total"]["wall_s"] > summary["wall_s"]  # both segments counted
    assert make(tmp_path / "fresh", resume_from="auto").step == 0


def test_resume_refuses_another_schedule(tmp_path):
    make(tmp_path, steps=4).fit()
    with pytest.raises(CheckpointError, match="different schedule.*steps: 4 -> 6"):
        make(tmp_path, steps=6, resume_from="auto")


def test_resume_extends_a_finished_run_with_a_warm_restart(tmp_path):
    """A recipe whose first cycle is a finished run continues from that run's checkpoint and
    ends bit-identical to training the whole recipe in one go."""
    kw = dict(grad_accum=2, ema_decay=0.9)
    longer = dict(steps=12, restarts=((8, 0.5),))
    straight = make(tmp_path / "a", **kw, **longer)
    straight.fit()
    make(tmp_path / "b", steps=8, **kw).fit()  # the shorter run, finished
    first = sha256_file(tmp_path / "b" / "checkpoint.pt")
    extended = make(tmp_path / "b", init_seed=123, resume_from="auto", **kw, **longer)
    summary = extended.fit()
    assert summary["start_step"] == 8 and summary["steps"] == 12
    assert summary["resumed_from"] == {"path": str(tmp_path / "b" / "checkpoint.pt"), "sha256": first, "step": 8}
    for k, v in weights(straight.model).items():
        assert torch.equal(extended.model.state_dict()[k], v), k
    for k, v in straight.ema.module.state_dict().items():
        assert torch.equal(extended.eval_model().state_dict()[k], v), k
    # a restart inside the steps already trained would rewrite the past: refused
    with pytest.raises(CheckpointError, match="lr at step 10"):
        make(tmp_path / "b", steps=16, restarts=((8, 0.5), (10, 0.5)), resume_from="auto", **kw)
    with pytest.raises(CheckpointError, match="steps: 12 -> 10"):
        make(tmp_path / "b", steps=10, resume_from="auto", **kw)


def test_fit_logs_summary_and_checkpoint(tmp_path):
    t = make(tmp_path, ema_decay=0.5)
    s = t.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    assert {"loss", "lr", "items_per_s", "abs_err", "grad_norm"} <= set(lines[-1])
    assert s["final_metrics"] == lines[-1] and s["checkpoint"] == str(tmp_path / "checkpoint.pt")
    assert lines[0]["loss"] > lines[-1]["loss"]
    assert t.eval_model() is t.ema.module and t.eval_model() is not t.model


def test_max_seconds_stops_early(tmp_path):
    s = make(tmp_path, max_seconds=0.0).fit()
    assert s["stopped_early"] and s["steps"] == 1 and s["max_seconds"] == 0.0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_bf16_autocast_runs():
    s = make(bf16=True).fit()
    assert math.isfinite(s["final_metrics"]["loss"])
    assert s["bf16_requested"] and s["bf16"] == native_bf16("cpu")  # the summary says what ran


@pytest.mark.parametrize("native", [True, False])
def test_bf16_only_where_the_device_runs_it_natively(monkeypatch, native):
    """Emulated bf16 (a CPU without AVX-512 BF16 / AMX) is ~20x slower than float32: asked-for
    bf16 autocast runs only where it is native, in the engine and in the samplers."""
    import mmsys.diffusion.samplers as samplers_mod
    import mmsys.optim as optim_mod
    monkeypatch.setattr(optim_mod, "native_bf16", lambda device_type: native)
    monkeypatch.setattr(samplers_mod, "native_bf16", lambda device_type: native)
    ctx = optim_mod.Autocast("cpu", True)
    assert ctx.requested and ctx.enabled == native
    with ctx:
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    assert not optim_mod.Autocast("cpu", False).enabled
    seen = []

    def eps_fn(x, t):
        seen.append(torch.nn.Linear(4, 4)(x.flatten(1)).dtype)
        return torch.zeros_like(x)
    from mmsys.diffusion.schedule import NoiseSchedule
    sampler = samplers_mod.DDIMSampler(NoiseSchedule.make("linear", T=10))
    sampler.set_timesteps(2)
    samplers_mod.sample(eps_fn, sampler, (1, 1, 2, 2), torch.Generator().manual_seed(0), bf16=True)
    assert seen == [torch.bfloat16 if native else torch.float32] * 2


def test_resume_rejects_other_model_config(tmp_path):
    make(tmp_path, steps=2).fit()
    with pytest.raises(CheckpointError, match="model_config"):
        make(tmp_path, MLPConfig(hidden=16, dropout=0.5)).resume(tmp_path / "checkpoint.pt")


def test_ema_hand_example():
    model = nn.Linear(1, 1, bias=False)
    model.register_buffer("count", torch.tensor(0))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
    model.count += 5
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1.1) and ema.module.count.item() == 5
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(1.19) and ema.num_updates == 2
    assert not ema.module.weight.requires_grad
    target = nn.Linear(1, 1, bias=False)
    target.register_buffer("count", torch.tensor(0))
    ema.copy_to(target)
    assert target.weight.item() == pytest.approx(1.19)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"kind": "mlp", "model": {"w": torch.ones(3)}})
    digest = sha256_file(path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckmod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"kind": "mlp", "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert sha256_file(path) == digest and list(tmp_path.iterdir()) == [path]
    ck = load_checkpoint(path, "mlp")
    assert ck["format_version"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))


def test_checkpoint_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "ok.pt", {"kind": "vit", "model": {}})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="'vit' checkpoint, expected 'clip'"):
        load_checkpoint(tmp_path / "ok.pt", expect_kind="clip")
    with pytest.raises(CheckpointError, match=r"missing keys \['optimizer'\]"):
        load_checkpoint(tmp_path / "ok.pt", required=("optimizer",))
    torch.save({"kind": "vit", "model": {}, "format_version": 1, "cfg": MLPConfig()}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="not plain|other than tensors"):
        load_checkpoint(tmp_path / "obj.pt")
    with pytest.raises(ValueError, match=r"payload\['config'\] is a .*MLPConfig.*asdict"):
        save_checkpoint(tmp_path / "bad.pt", {"kind": "vit", "model": {}, "config": MLPConfig()})
    assert not (tmp_path / "bad.pt").exists()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not an mmsys checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
