"""Ablations of m7's self-supervised recipe (issue 21, item 4): one knob changed at a time, the rest
m7's quick recipe, each setting scored on the world's **validation** split (the test split is
m7's gate's alone).

    python -m studies.ssl_ablations temperature            # 5 temperatures, SimCLR
    python -m studies.ssl_ablations batch                  # 4 batch sizes at equal images seen
    python -m studies.ssl_ablations augment                # the views with each operation removed in turn
    python -m studies.ssl_ablations queue                  # MoCo v2 with 4 queue sizes
    ... --jobs 2                                           # settings two at a time, one thread each

Writes ``results/ssl_ablations/<knob>.md`` and ``.json`` (per setting: linear-probe and kNN
accuracy on val, training wall time; the command, commit, machine) and ``<knob>.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KNOBS = {
    "temperature": [0.05, 0.1, 0.2, 0.5, 1.0],
    "batch": [32, 64, 128, 256],  # steps scaled so every setting sees 600 x 128 images
    "augment": ["all", "no crop", "no flip", "no colour jitter", "no grayscale"],
    "queue": [256, 1024, 4096, 16384],
}


def recipe_for(knob: str, value):
    """m7's quick recipe with ``knob`` set to ``value``."""
    from milestones.m7_ssl import RECIPES
    base = RECIPES["quick"]
    if knob == "temperature":
        return replace(base, model={**base.model, "temperature": value})
    if knob == "batch":
        return replace(base, batch_size=value, steps=base.steps * base.batch_size // value,
                       warmup_steps=base.warmup_steps * base.batch_size // value)
    if knob == "augment":
        off = {"all": {}, "no crop": {"crop_scale": (1.0, 1.0)}, "no flip": {"flip": 0.0},
               "no colour jitter": {"jitter": 0.0}, "no grayscale": {"grayscale": 0.0}}[value]
        return replace(base, views={**base.views, **off})
    if knob == "queue":  # MoCo v2 at its paper's temperature and momentum
        return replace(base, model={**base.model, "method": "moco", "temperature": 0.2, "queue_size": value,
                                    "momentum": 0.99})
    raise ValueError(f"unknown knob {knob!r}: choose one of {', '.join(KNOBS)}")


def run_setting(args: tuple) -> dict:
    """Train one setting in this process (one torch thread) and score it on val."""
    knob, value, seed = args
    import tempfile

    import torch
    torch.set_num_threads(1)
    from milestones.base import RunContext
    from milestones.m7_checks import features, score_split
    from milestones.m7_ssl import load_data, probe_split, train
    recipe = recipe_for(knob, value)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(out_dir=Path(tmp), seed=seed, progress=False)
        train_split, val, _ = load_data(recipe, ctx)
        t0 = time.perf_counter()
        model, summary = train(recipe, train_split, ctx)
        wall = time.perf_counter() - t0
        probe = probe_split(train_split, recipe.n_probe)
        m, _, _ = score_split(model, features(model, probe.images), probe.labels, val)
    return {"setting": str(value), "val_linear_probe": m["linear_probe"], "val_knn_accuracy": m["knn_accuracy"],
            "train_wall_s": wall, "steps": recipe.steps, "batch_size": recipe.batch_size,
            "final_loss": (summary.get("final_metrics") or {}).get("loss")}


def plot(knob: str, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    for key, label in (("val_linear_probe", "linear probe"), ("val_knn_accuracy", "kNN")):
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xticks(list(xs), [r["setting"] for r in rows], rotation=20)
    ax.set_xlabel(knob)
    ax.set_ylabel("accuracy on the world's val split")
    ax.legend()
    ax.set_title(f"m7 quick recipe, {knob} varied (one seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("knob", choices=sorted(KNOBS))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "results" / "ssl_ablations")
    a = p.parse_args(argv)
    from milestones.m7_ssl import RECIPES
    from grader.report import device_info, git_state
    git = git_state(REPO)
    commit, dirty = git["commit"][:7], git["dirty"]
    base = RECIPES["quick"]
    t0 = time.perf_counter()
    settings = [(a.knob, v, a.seed) for v in KNOBS[a.knob]]
    if a.jobs > 1:
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            rows = pool.map(run_setting, settings)
    else:
        rows = [run_setting(s) for s in settings]
    a.out.mkdir(parents=True, exist_ok=True)
    command = "python -m studies.ssl_ablations " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command, "commit": commit, "dirty": dirty, "cpu": device_info("cpu").get("cpu", "?"), "torch_threads": 1,
              "jobs": a.jobs, "wall_s": time.perf_counter() - t0, "seed": a.seed, "rows": rows}
    (a.out / f"{a.knob}.json").write_text(json.dumps(record, indent=2))
    plot(a.knob, rows, a.out / f"{a.knob}.png")
    lines = [f"# m7 ablation: {a.knob}", "",
             f"`{command}` at `{commit}`{' (dirty)' if dirty else ''}, {record['cpu']}, one torch thread per setting, "
             f"{a.jobs} at a time, {record['wall_s']:.0f} s in all. m7's quick recipe with only {a.knob} changed, "
             f"seed {a.seed}; scored on the world's val split ({base.n_val:,} images), probes fitted on "
             f"{base.n_probe:,} training images.",
             "", "| setting | val linear probe | val kNN | steps x batch | final loss | training wall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        lines.append(f"| {r['setting']} | {r['val_linear_probe']:.4f} | {r['val_knn_accuracy']:.4f} | "
                     f"{r['steps']} x {r['batch_size']} | {loss} | {r['train_wall_s']:.0f} s |")
    lines += ["", f"Plot: `{a.knob}.png`. One seed per setting: differences under about 0.05 (the quick recipe's "
                  "linear-probe spread across seeds is 0.025 sd, results/calibration/m7.md) are noise."]
    (a.out / f"{a.knob}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
