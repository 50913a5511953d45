"""Robustness of three image encoders to corrupted pixels (issue 21, item 5): the m1 ViT, the m2
CLIP image tower and m7's SimCLR encoder, each trained here with its milestone's quick recipe,
scored on the world's **validation** split (the test split is the milestones' gates' alone)
under Gaussian noise, Gaussian blur and JPEG compression at five severities each.

    python -m studies.robustness --jobs 2            # the three encoders, two at a time, one thread each
    python -m studies.robustness --smoke --out DIR   # tiny recipes and data: the path in about a minute

Metrics (labels: the world's 10 shapes, the same images for all three): m1, its classifier's
top-1 accuracy; m2 and SimCLR, weighted kNN accuracy (k 20, t 0.1, :mod:`eval.representation`)
of the corrupted val features against a clean bank of training features; m2 also text->image
recall@10 of the clean captions among the corrupted val images. Writes ``robustness.json`` /
``.md`` / ``.png`` (one panel per corruption) and ``embeddings.png`` (UMAP of each encoder's
clean val embeddings) to ``--out`` (default ``results/robustness/``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path

import torch

from eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from studies.common import REPO, add_common_args, check_common_args, one_thread_run, provenance
ENCODERS = {"m1": "m1 ViT", "m2": "m2 CLIP image tower", "m7": "m7 SimCLR"}
# (encoder, metric key, column header): the table's columns and the figure's lines
CURVES = [("m1", "accuracy", "m1 accuracy"), ("m2", "knn", "m2 kNN"), ("m2", "t2i_R@10", "m2 t2i R@10"),
          ("m7", "knn", "SimCLR kNN")]
FULL_LEVELS, SMOKE_LEVELS = (0, 1, 2, 3, 4, 5), (0, 1, 5)  # 0 = clean


def recipe(encoder: str, smoke: bool):
    """The milestone's quick recipe (its smoke recipe with ``smoke``)."""
    from milestones import m1_vit, m2_clip, m7_ssl
    module = {"m1": m1_vit, "m2": m2_clip, "m7": m7_ssl}[encoder]
    return (module.SMOKE_RECIPES if smoke else module.RECIPES)["quick"]


def train_encoder(encoder: str, ctx, smoke: bool):
    """Train ``encoder`` with its milestone's own training function on the training split that
    milestone draws (the same call as its ``load_data``, without the test split) -> (model,
    tokenizer or None, trainer summary)."""
    from milestones.common import world_split
    r = recipe(encoder, smoke)
    if encoder == "m2":
        from milestones.m2_clip import train_clip
        return train_clip(r, world_split(ctx, "train", r.n_train), seed=ctx.seed, progress=False)
    from milestones import m1_vit, m7_ssl
    model, summary = (m1_vit if encoder == "m1" else m7_ssl).train(
        r, world_split(ctx, "train", r.n_train, single=True, captions=False), ctx)
    return model, None, summary


def embedder(encoder: str, model):
    """The encoder's representation: uint8 images (N, 3, H, W) -> features (N, D) on the CPU. m1:
    the final-LayerNorm'd CLS token its classifier head reads; m2: the image tower's unit
    embedding; m7: the frozen features m7's probes read."""
    if encoder == "m1":
        from milestones.adapters import CANDIDATE
        from milestones.common import batched
        model.eval()
        return lambda x: batched(lambda b: CANDIDATE.vit_tokens(model, b)[:, 0], x)
    if encoder == "m2":
        from milestones.m2_clip import embed_images
        return lambda x: embed_images(model, x)
    from milestones.m7_checks import features
    return lambda x: features(model, x)


def scorer(encoder: str, model, tok, embed, val, bank):
    """uint8 (corrupted) val images (N, 3, H, W) -> {metric: value} against ``val``'s labels (and,
    for m2, its clean captions); kNN votes come from the clean ``bank`` split's features."""
    from eval.classification import accuracy
    from eval.representation import knn_predict
    if encoder == "m1":
        from milestones.m1_vit import predict
        return lambda x: {"accuracy": accuracy(predict(model, x), val.labels)}
    bank_x, n_classes = embed(bank.images), len(val.classes)

    def knn(emb):
        return accuracy(knn_predict(bank_x, bank.labels, emb, n_classes), val.labels)
    if encoder == "m7":
        return lambda x: {"knn": knn(embed(x))}
    from eval.retrieval import text_to_image_recall
    from milestones.m2_clip import retrieval
    _, _, txt, t2i = retrieval(model, tok, val)  # every clean caption of val, embedded once

    def score(x):
        emb = embed(x)
        return {"knn": knn(emb), "t2i_R@10": text_to_image_recall(txt, emb, t2i)["R@10"]}
    return score


def run_encoder(args: tuple) -> dict:
    """Train one encoder in this process (one torch thread) and score it under every corruption
    -> {"encoder", "train_wall_s", "eval_wall_s", "steps", "batch_size", "final_loss",
    "clean": metrics, "curves": {corruption: [{"level", "severity", metrics...}]}, "embedding":
    clean val features (n_eval, D), "labels": (n_eval,), "classes"}."""
    encoder, seed, n_eval, n_bank, smoke = args
    from milestones.common import world_split
    levels = SMOKE_LEVELS if smoke else FULL_LEVELS
    with one_thread_run(seed) as ctx:
        val = world_split(ctx, "val", n_eval, single=True)
        bank = world_split(ctx, "train", n_bank, single=True, captions=False)
        t0 = time.perf_counter()
        model, tok, summary = train_encoder(encoder, ctx, smoke)
        t1 = time.perf_counter()
        embed = embedder(encoder, model)
        score = scorer(encoder, model, tok, embed, val, bank)
        curves = {name: [{"level": lv, "severity": None if lv == 0 else SEVERITIES[name][lv - 1],
                          **score(corrupt(val.images, name, lv, seed))} for lv in levels] for name in CORRUPTIONS}
        emb = embed(val.images)
    first = next(iter(curves.values()))[0]  # the clean point, the same in every curve
    r, clean = recipe(encoder, smoke), {k: v for k, v in first.items() if k not in ("level", "severity")}
    print(f"[{time.strftime('%H:%M:%S')}] {ENCODERS[encoder]}: trained in {t1 - t0:.0f} s, scored in "
          f"{time.perf_counter() - t1:.0f} s; clean " + ", ".join(f"{k} {v:.3f}" for k, v in clean.items()), flush=True)
    return {"encoder": encoder, "train_wall_s": t1 - t0, "eval_wall_s": time.perf_counter() - t1,
            "steps": r.steps, "batch_size": r.batch_size,
            "final_loss": (summary.get("final_metrics") or {}).get("loss"),
            "clean": clean,
            "curves": curves, "embedding": emb, "labels": val.labels, "classes": list(val.classes)}


def run_all(seed: int, n_eval: int, n_bank: int, smoke: bool, jobs: int) -> list[dict]:
    """One result per encoder (in :data:`ENCODERS` order), ``jobs`` at a time in spawned processes."""
    settings = [(e, seed, n_eval, n_bank, smoke) for e in ENCODERS]
    if jobs > 1:
        with mp.get_context("spawn").Pool(min(jobs, len(settings))) as pool:
            rows = list(pool.imap_unordered(run_encoder, settings))
    else:
        rows = [run_encoder(s) for s in settings]
    return sorted(rows, key=lambda r: list(ENCODERS).index(r["encoder"]))


def severity_label(name: str, point: dict) -> str:
    """How a curve point's severity is shown: "clean" or the corruption's parameter."""
    return "clean" if point["level"] == 0 else f"{point['severity']:g}"


def values(rows: dict, name: str, encoder: str, key: str) -> list[float]:
    """The metric ``key`` of ``encoder`` along corruption ``name``, clean first."""
    return [p[key] for p in rows[encoder]["curves"][name]]


def plot_curves(rows: dict, n_eval: int, path: Path) -> None:
    """One figure, one panel per corruption: every (encoder, metric) against severity (clean first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(4.2 * len(CORRUPTIONS), 3.8), sharey=True)
    for ax, (name, (_, _, xlabel)) in zip(axes, CORRUPTIONS.items()):
        points = rows["m1"]["curves"][name]
        for encoder, key, label in CURVES:
            ax.plot(range(len(points)), values(rows, name, encoder, key), marker="o", label=label)
        ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance (kNN / accuracy)")
        ax.set_xticks(range(len(points)), [severity_label(name, p) for p in points])
        ax.set_xlabel(xlabel + " (left: milder)")
        ax.set_title(name.replace("_", " "))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"metric on {n_eval:,} val images")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(CURVES) + 1, fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def project_2d(x: torch.Tensor, seed: int):
    """(N, D) features -> ((N, 2) UMAP coordinates (cosine, ``random_state`` fixed), "UMAP");
    t-SNE (scikit-learn) only if UMAP fails."""
    import numpy as np
    a = np.asarray(x.float().numpy(), dtype=np.float32)
    try:
        import umap
        with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": the fixed seed is wanted
            warnings.simplefilter("ignore", UserWarning)
            return (umap.UMAP(n_neighbors=min(15, len(a) - 1), metric="cosine", random_state=seed).fit_transform(a),
                    "UMAP")
    except Exception as e:  # noqa: BLE001 -- the fallback is said on the figure and in the log
        print(f"UMAP failed ({type(e).__name__}: {e}); t-SNE instead", flush=True)
        from sklearn.manifold import TSNE
        return TSNE(perplexity=min(30.0, (len(a) - 1) / 3), random_state=seed, init="pca").fit_transform(a), "t-SNE"


def plot_embeddings(rows: dict, seed: int, path: Path) -> None:
    """One panel per encoder: its clean val embeddings in 2-D, coloured by class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ENCODERS), figsize=(4.2 * len(ENCODERS), 4.4))
    for ax, (encoder, title) in zip(axes, ENCODERS.items()):
        xy, method = project_2d(rows[encoder]["embedding"], seed)
        labels, classes = rows[encoder]["labels"].numpy(), rows[encoder]["classes"]
        for c, cname in enumerate(classes):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=5, color=plt.cm.tab10(c), label=cname)
        ax.set_title(f"{title}: {method} of clean val", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(classes), fontsize=8,
               markerscale=3, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(record: dict) -> list[str]:
    """The Markdown report: provenance sentence, one table per corruption, a reading of the numbers."""
    rows = {e: record["encoders"][e] for e in ENCODERS}
    walls = ", ".join(f"{ENCODERS[e]} {r['train_wall_s']:.0f} s ({r['steps']} x {r['batch_size']})"
                      for e, r in rows.items())
    lines = ["# Robustness of the three image encoders", "",
             f"`{record['command']}` at `{record['commit']}`{' (dirty)' if record['dirty'] else ''}, {record['cpu']}, "
             f"one torch thread per encoder, {record['jobs']} at a time, {record['wall_s']:.0f} s in all, finished "
             f"{record['finished']}. Each encoder trained here with its milestone's {record['recipes']} recipe, seed "
             f"{record['seed']} (training wall, steps x batch: {walls}). Data: the first {record['n_eval']:,} "
             f"single-object images of the world's val split (10 shape classes, chance 0.10; every caption a t2i "
             f"query, chance R@10 "
             f"{min(1.0, 10 / record['n_eval']):.3f}); kNN (k 20, t 0.1) against the clean features of the first "
             f"{record['n_bank']:,} single-object training images. Noise seed {record['seed']}, the same for every "
             "severity."]
    for name, (_, _, xlabel) in CORRUPTIONS.items():
        lines += ["", f"## {name.replace('_', ' ')}", "", f"| {xlabel} | " + " | ".join(h for _, _, h in CURVES) + " |",
                  "|" + "---|" * (len(CURVES) + 1)]
        for i, p in enumerate(rows["m1"]["curves"][name]):
            lines.append(f"| {severity_label(name, p)} | "
                         + " | ".join(f"{values(rows, name, e, k)[i]:.3f}" for e, k, _ in CURVES) + " |")
    lines += ["", "## Reading", ""]
    for name in CORRUPTIONS:
        drops = {h: values(rows, name, e, k)[0] - values(rows, name, e, k)[-1] for e, k, h in CURVES}
        last = severity_label(name, rows["m1"]["curves"][name][-1])
        lines.append(f"- {name.replace('_', ' ')}, clean -> {last}: " + ", ".join(
            f"{h} {values(rows, name, e, k)[0]:.3f} -> {values(rows, name, e, k)[-1]:.3f}" for e, k, h in CURVES)
            + f"; smallest drop {min(drops, key=drops.get)}, largest {max(drops, key=drops.get)}.")
    return lines + ["", "Figures: `robustness.png` (the curves), `embeddings.png` (2-D maps of the clean val "
                    "embeddings). One seed per encoder: differences of a few hundredths are within seed-to-seed spread "
                    "(results/calibration)."]


def main(argv=None) -> int:
    """``python -m studies.robustness [--jobs N] [--seed S] [--n-eval N] [--n-bank N] [--out DIR] [--smoke]``."""
    p = argparse.ArgumentParser(prog="python -m studies.robustness", description=__doc__.split("\n\n")[0])
    add_common_args(p, REPO / "results" / "robustness", what="encoders")
    p.add_argument("--n-eval", type=int, default=None, help="val images scored (default 1,000; 64 with --smoke)")
    p.add_argument("--n-bank", type=int, default=None,
                   help="clean training images in the kNN bank (default 5,000; 128 with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="the milestones' smoke recipes, 2 severities: the path, not the result")
    a = p.parse_args(argv)
    n_eval = a.n_eval if a.n_eval is not None else (64 if a.smoke else 1_000)
    n_bank = a.n_bank if a.n_bank is not None else (128 if a.smoke else 5_000)
    check_common_args(p, a)
    if not 20 <= n_eval <= 2_000:
        p.error(f"--n-eval must be in 20..2000 (the val split has 2,000 images), got {n_eval}")
    if not 20 <= n_bank <= 50_000:
        p.error(f"--n-bank must be in 20..50000 (the training split has 50,000 images), got {n_bank}")
    start, t0 = provenance("studies.robustness", argv, a), time.perf_counter()
    results = run_all(a.seed, n_eval, n_bank, a.smoke, a.jobs)
    record = {**start,
              "wall_s": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "recipes": "smoke" if a.smoke else "quick", "n_eval": n_eval, "n_bank": n_bank,
              "severities": {name: list(SEVERITIES[name]) for name in CORRUPTIONS},
              "encoders": {r["encoder"]: {k: v for k, v in r.items() if k not in ("embedding", "labels", "classes")}
                           for r in results}}
    rows = {r["encoder"]: r for r in results}
    a.out.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, n_eval, a.out / "robustness.png")
    plot_embeddings(rows, a.seed, a.out / "embeddings.png")
    record["wall_s"] = time.perf_counter() - t0
    (a.out / "robustness.json").write_text(json.dumps(record, indent=2))
    lines = report(record)
    (a.out / "robustness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
