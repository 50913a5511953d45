"""A mini scaling study of m2's CLIP on the embedded world (issue 21, item 6): the held-out CLIP loss
and zero-shot accuracy against parameters (5 widths) and against training pairs (5 set sizes), one
knob changed at a time from a common base, a power law fitted to each with a 95 % band.

    python -m studies.clip_scaling --jobs 2      # 9 settings, one torch thread each (~9 min wall on 2 idle cores)
    python -m studies.clip_scaling --smoke       # the same path in tiny (~20 s): proves it, not scaling

The base is m2's quick recipe (width 96, depths 4/2, patch 8, batch 256, 50,000 training pairs) with
300 steps (warm-up 30) instead of 500 (50), to fit the CPU. Every setting is scored on the world's
**validation** split (the test split is m2's gate's alone). Writes ``scaling.json`` (command, commit,
machine, time, base recipe, a row per setting, the fits), ``scaling.md`` and ``scaling.png`` to
``--out`` (``results/clip_scaling/``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from studies.common import REPO, add_common_args, check_common_args, one_thread_run, provenance

FIXED_SCALE = 20.0  # logit scale of the comparable loss (T = 0.05; m2's quick runs learn 22-25)


@dataclass(frozen=True)
class Sweeps:
    """The two sweeps and the base they share."""
    widths: tuple[int, ...]  # vision_dim = text_dim = embed_dim of the parameter sweep
    sizes: tuple[int, ...]  # n_train (unique image + 5-caption pairs) of the data sweep
    base_width: int
    base_n: int
    steps: int
    batch_size: int
    warmup_steps: int
    n_val: int  # val images scored (a prefix of the world's val split)
    loss_batch: int  # val pairs per InfoNCE batch (divides n_val: every batch the same size)


FULL = Sweeps((32, 48, 64, 96, 144), (1_000, 3_000, 10_000, 30_000, 50_000), 96, 50_000, 300, 256, 30, 1_000, 250)
SMOKE = Sweeps((16, 24, 32, 40, 48), (200, 400, 600, 800, 1_000), 32, 1_000, 10, 32, 2, 128, 64)


def base_recipe(study: Sweeps):
    """m2's quick recipe at the study's steps, batch, width, training and val sizes (an M2Recipe)."""
    from milestones.m2_clip import RECIPES
    q = RECIPES["quick"]
    w = study.base_width
    return replace(q, n_train=study.base_n, n_val=study.n_val, steps=study.steps, batch_size=study.batch_size,
                   warmup_steps=study.warmup_steps, model={**q.model, "vision_dim": w, "text_dim": w, "embed_dim": w})


def recipe_for(study: Sweeps, sweep: str, value: int):
    """The base recipe with one knob set: ``sweep`` "params" -> width ``value``, "data" -> n_train ``value``."""
    base = base_recipe(study)
    if sweep == "params":
        if value % base.model["vision_heads"] or value % base.model["text_heads"]:
            raise ValueError(f"width {value} is not a multiple of the heads")
        return replace(base, model={**base.model, "vision_dim": value, "text_dim": value, "embed_dim": value})
    if sweep == "data":
        return replace(base, n_train=value)
    raise ValueError(f"unknown sweep {sweep!r}: choose params or data")


def settings(study: Sweeps) -> dict[tuple[int, int], object]:
    """{(width, n_train): recipe} of both sweeps, the shared base once (9 settings for 5 + 5)."""
    out = {}
    for sweep, values in (("params", study.widths), ("data", study.sizes)):
        for v in values:
            r = recipe_for(study, sweep, v)
            out[(r.model["vision_dim"], r.n_train)] = r
    return out


def heldout_loss(image_emb, text_emb, scale: float, image_key=None, text_key=None, batch: int = 250) -> float:
    """Symmetric InfoNCE of N held-out pairs in consecutive batches of ``batch`` (a remainder < batch is
    dropped), averaged over the batches, with the grader's own ``clip_loss``.

    image_emb, text_emb: (N, E) unit vectors, row i a matching pair; scale: the logit scale 1 / T;
    image_key, text_key: optional (N,) long keys, equal = known duplicates, masked out of the softmax
    denominators (None: every other pair of the batch is a negative)."""
    import torch
    from eval.reference.clip import clip_loss, duplicate_mask
    losses = []
    for i in range(0, len(image_emb) - batch + 1, batch):
        sl = slice(i, i + batch)
        mask = None if image_key is None else duplicate_mask(image_key[sl], None if text_key is None else text_key[sl])
        losses.append(float(clip_loss(image_emb[sl], text_emb[sl], torch.tensor(float(scale)), mask)[0]))
    return sum(losses) / len(losses)


def run_setting(args: tuple) -> dict:
    """Train one (width, n_train) setting in this process (one torch thread) and score it on val."""
    (width, n_train), recipe, seed, loss_batch = args
    import torch
    from milestones.common import world_split
    from milestones.m2_clip import embed_images, embed_texts, train_clip, validate_world, world_image_keys
    with one_thread_run(seed) as ctx:
        train, val = world_split(ctx, "train", n_train), world_split(ctx, "val", recipe.n_val)
        t0 = time.perf_counter()
        model, tok, summary = train_clip(recipe, train, seed=seed, progress=False)
        wall = time.perf_counter() - t0
        metrics = validate_world(model, tok, val)["metrics"]
        firsts = [cs[0] for cs in val.captions]  # one caption per image, in the split's order
        img, txt = embed_images(model, val.images), embed_texts(model, tok, firsts)
        ikey = world_image_keys(val.meta["scenes"])
        index: dict[str, int] = {}
        tkey = torch.tensor([index.setdefault(" ".join(c.lower().split()), len(index)) for c in firsts])
    n = sum(p.numel() for p in model.parameters())
    n_emb = sum(p.numel() for name, p in model.named_parameters() if "token_embed" in name or "pos_embed" in name)
    pairs_seen = recipe.steps * recipe.batch_size
    return {"width": width, "n_train": n_train, "params": n, "params_non_embedding": n - n_emb,
            "steps": recipe.steps, "batch_size": recipe.batch_size, "pairs_seen": pairs_seen,
            "compute_flops": 6 * n * pairs_seen, "train_wall_s": wall,
            "final_train_loss": (summary.get("final_metrics") or {}).get("loss"),
            "logit_scale": summary["logit_scale"], "n_unique_train_scenes": summary["n_unique_image_keys"],
            "val_loss": heldout_loss(img, txt, FIXED_SCALE, ikey, tkey, loss_batch),
            "val_loss_unmasked": heldout_loss(img, txt, FIXED_SCALE, batch=loss_batch),
            "val_loss_own_T": heldout_loss(img, txt, summary["logit_scale"], ikey, tkey, loss_batch), **metrics}


def fit_power_law(x, y, level: float = 0.95) -> dict:
    """Least squares of log y = log a - alpha log x: L = a X^-alpha through n >= 3 points x, y (n,) > 0.

    Returns a, alpha, alpha_ci (its ``level`` interval from the t distribution with n - 2 degrees of
    freedom), r2, and what :func:`power_law_band` needs (b0, b1, residual sd s, mean and Sxx of log x, t)."""
    import numpy as np
    from scipy import stats
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    n = len(lx)
    b1, b0 = np.polyfit(lx, ly, 1)
    resid = ly - (b0 + b1 * lx)
    s = math.sqrt(float(resid @ resid) / (n - 2))
    sxx = float(((lx - lx.mean()) ** 2).sum())
    t = float(stats.t.ppf(0.5 + level / 2, n - 2))
    half = t * s / math.sqrt(sxx)
    r2 = 1 - float(resid @ resid) / float(((ly - ly.mean()) ** 2).sum())
    return {"a": math.exp(b0), "alpha": float(-b1), "alpha_ci": [float(-b1 - half), float(-b1 + half)], "r2": r2,
            "n": n, "level": level, "b0": float(b0), "b1": float(b1), "s": s, "mean_log_x": float(lx.mean()),
            "sxx": sxx, "t": t}


def power_law_band(fit: dict, x):
    """The fitted curve and its confidence band of the mean at x (G,): three (G,) arrays (fit, lo, hi)."""
    import numpy as np
    lx = np.log(np.asarray(x, float))
    mid = fit["b0"] + fit["b1"] * lx
    half = fit["t"] * fit["s"] * np.sqrt(1 / fit["n"] + (lx - fit["mean_log_x"]) ** 2 / fit["sxx"])
    return np.exp(mid), np.exp(mid - half), np.exp(mid + half)


def plot(panels: list[tuple], path: Path) -> None:
    """One figure, a panel per sweep: (rows, x key, x label, fit, title, tick labels) -> loss (log-log, the
    points, the fit and its band) and zero-shot top-1 (right axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, NullLocator
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 5))
    for ax, (rows, key, label, fit, title, ticks) in zip(axes, panels):
        xs, ys = [r[key] for r in rows], [r["val_loss"] for r in rows]
        grid = np.geomspace(min(xs) / 1.3, max(xs) * 1.3, 100)
        mid, lo, hi = power_law_band(fit, grid)
        ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, label="95 % band of the fit")
        lo_a, hi_a = fit["alpha_ci"]
        ax.plot(grid, mid, color="C0",
                label=f"fit {fit['a']:.3g} X^{-fit['alpha']:.3f}, alpha in [{lo_a:.3f}, {hi_a:.3f}]")
        ax.plot(xs, ys, "o", color="C0", label=f"val loss (T = {1 / FIXED_SCALE:.2f})")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(xs, ticks, fontsize=8)
        digits = 3 if max(hi) / min(lo) > 1.3 else 5  # enough digits that neighbouring ticks differ
        fmt = FuncFormatter(lambda v, _, d=digits: f"{v:.{d}g}")
        ax.yaxis.set_major_formatter(fmt), ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="both", labelsize=8)
        ax.set_xlabel(label), ax.set_ylabel("held-out CLIP loss (val, log scale)", color="C0")
        right = ax.twinx()
        right.plot(xs, [r["val_zeroshot_top1"] for r in rows], "s--", color="C1", label="val zero-shot top-1 (right)")
        right.set_ylabel("val zero-shot top-1 (80 compositions)", color="C1")
        right.set_ylim(0, 1)
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, ncol=2, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2))
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def note(study: Sweeps, fits: dict, rows_n: list[dict], rows_d: list[dict]) -> list[str]:
    """The compute note, generated from the fitted exponents."""
    an, ad = fits["params"]["alpha"], fits["data"]["alpha"]
    (n_lo, n_hi), (d_lo, d_hi) = fits["params"]["alpha_ci"], fits["data"]["alpha_ci"]
    seen, base = rows_n[0]["pairs_seen"], rows_d[-1]
    out = [f"By the fits, doubling the parameters (at {study.base_n:,} pairs, {study.steps} steps: twice the compute) "
           f"changes the held-out loss by {2 ** -an - 1:+.1%} (alpha_N = {an:.3f}); doubling the unique training "
           f"pairs (at width {study.base_width}, the same {seen:,} pairs seen: the same compute, twice the data to "
           f"have) changes it by {2 ** -ad - 1:+.1%} (alpha_D = {ad:.3f})."]
    if n_lo <= d_hi and d_lo <= n_hi:
        out.append("The two 95 % intervals overlap: five points of one seed do not decide which axis matters more.")
    elif ad > an:
        out.append(f"alpha_D > alpha_N: at this scale the run is data-limited (the smallest set is seen "
                   f"{seen / study.sizes[0]:.0f} times): a doubled budget buys more as new pairs, or as more steps "
                   f"over more pairs, than as width; widen the model only once the data stops paying.")
    else:
        out.append("alpha_N > alpha_D: at this scale the model is the bottleneck: a doubled budget is better spent on "
                   "a wider model than on more distinct pairs, which the base model already barely repeats.")
    for name in ("params", "data"):
        if fits[name]["r2"] < 0.9:
            out.append(f"The {name} fit is poor (R^2 {fits[name]['r2']:.2f}): the curve bends, so its exponent is only "
                       "a local slope (saturation, or under-training at fixed steps).")
    out.append(f"Caveats: one seed; tiny models ({rows_n[0]['params']:,}-{rows_n[-1]['params']:,} parameters); short "
               f"training ({study.steps} steps for every size, so the larger models are the less converged, which "
               f"flattens the N curve); the world's finite diversity ({base['n_unique_train_scenes']:,} distinct "
               f"scenes in {base['n_train']:,} pairs, which flattens the D curve); the loss at a fixed T depends on T. "
               "Not measured here: parameters against steps at equal compute (the Chinchilla question), which needs a "
               "grid over (width, steps) at equal 6 N x pairs seen.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.clip_scaling", description=__doc__.split("\n\n")[0])
    add_common_args(p, REPO / "results" / "clip_scaling")
    p.add_argument("--smoke", action="store_true", help="tiny models, 10 steps x 32: proves the path in ~20 s")
    a = p.parse_args(argv)
    check_common_args(p, a)
    start = provenance("studies.clip_scaling", argv, a)
    command, commit, dirty = start["command"], start["commit"], start["dirty"]
    study = SMOKE if a.smoke else FULL
    todo = sorted(settings(study).items(), key=lambda kv: (-kv[0][0], -kv[0][1]))  # the slowest first
    args = [(key, r, a.seed, study.loss_batch) for key, r in todo]
    t0, rows = time.perf_counter(), {}
    pool = mp.get_context("spawn").Pool(a.jobs) if a.jobs > 1 else None
    try:
        for row in (pool.imap_unordered(run_setting, args) if pool else map(run_setting, args)):
            rows[(row["width"], row["n_train"])] = row
            print(f"[{len(rows)}/{len(args)}] width {row['width']}, n_train {row['n_train']:,}: val loss "
                  f"{row['val_loss']:.3f}, zero-shot top-1 {row['val_zeroshot_top1']:.3f} "
                  f"({row['train_wall_s']:.0f} s training)", flush=True)
    finally:
        if pool:  # every result is in (or a worker failed): stop the workers
            pool.terminate()
            pool.join()
    rows_n = [rows[(w, study.base_n)] for w in study.widths]
    rows_d = [rows[(study.base_width, n)] for n in study.sizes]
    fits = {"params": {"x": "params", "y": "val_loss", **fit_power_law([r["params"] for r in rows_n],
                                                                       [r["val_loss"] for r in rows_n])},
            "data": {"x": "n_train", "y": "val_loss", **fit_power_law([r["n_train"] for r in rows_d],
                                                                      [r["val_loss"] for r in rows_d])}}
    a.out.mkdir(parents=True, exist_ok=True)
    record = {**start, "wall_s": time.perf_counter() - t0,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": a.smoke, "study": asdict(study),
              "fixed_logit_scale": FIXED_SCALE, "base_recipe": asdict(base_recipe(study)),
              "rows": [rows[k] for k in sorted(rows)], "fits": fits}
    (a.out / "scaling.json").write_text(json.dumps(record, indent=2))
    plot([(rows_n, "params", "parameters N (both towers; w = width)", fits["params"],
           f"parameters: {study.base_n:,} training pairs, {study.steps} x {study.batch_size} seen",
           [f"{r['params'] / 1e3:.0f}k\nw{r['width']}" for r in rows_n]),
          (rows_d, "n_train", "unique training pairs D", fits["data"],
           f"data: width {study.base_width}, {study.steps} x {study.batch_size} pairs seen",
           [f"{r['n_train'] / 1e3:g}k" for r in rows_d])], a.out / "scaling.png")
    lines = ["# m2 CLIP: a mini scaling study" + (" (smoke: proves the path, not scaling)" if a.smoke else ""), "",
             f"`{command}` at `{commit}`{' (dirty)' if dirty else ''}, {record['cpu']}, one torch thread per "
             f"setting, {a.jobs} at a time, {record['wall_s']:.0f} s in all, {record['date']}; seed {a.seed}.", "",
             f"Base: m2's quick recipe with {study.steps} steps x {study.batch_size} (warm-up {study.warmup_steps}; "
             f"the quick recipe: 500 x 256, warm-up 50), width {study.base_width} (vision = text = embed), depths "
             f"4/2, patch 8, {study.base_n:,} training pairs; one knob changed at a time. Held-out loss: symmetric "
             f"InfoNCE (the grader's `eval.reference.clip.clip_loss`) over {study.n_val // study.loss_batch} fixed "
             f"batches of {study.loss_batch} val pairs (each image with its first caption) at a fixed logit scale "
             f"{FIXED_SCALE:g} (T = {1 / FIXED_SCALE:.2f}), known duplicates (same canonical scene or identical "
             "caption) masked out of the denominators; also unmasked, and at the model's own learned T. Zero-shot "
             f"and R@10: `validate_world` on the first {study.n_val:,} val images (never the test split). "
             "N = all parameters of both towers (non-embedding: without token and position embeddings); "
             "C ~ 6 N x pairs seen (a per-pair count, proportional to the FLOPs, not equal to them).", ""]
    head = ("| {} | N | non-emb N | C (FLOPs) | val loss | unmasked | own T | learned T | zero-shot top-1 | top-5 | "
            "t2i R@10 | train loss | training wall |")
    for title, key, rs in ((f"Parameters (n_train {study.base_n:,})", "width", rows_n),
                           (f"Training pairs (width {study.base_width})", "n_train", rows_d)):
        lines += [f"## {title}", "", head.format(key), "|---" * 13 + "|"]
        for r in rs:
            lines.append(f"| {r[key]:,} | {r['params']:,} | {r['params_non_embedding']:,} | {r['compute_flops']:.2e} | "
                         f"{r['val_loss']:.4f} | {r['val_loss_unmasked']:.4f} | {r['val_loss_own_T']:.4f} | "
                         f"{1 / r['logit_scale']:.3f} | {r['val_zeroshot_top1']:.3f} | {r['val_zeroshot_top5']:.3f} | "
                         f"{r['val_t2i_R@10']:.3f} | {r['final_train_loss']:.3f} | {r['train_wall_s']:.0f} s |")
        lines.append("")
    lines += ["## Power laws (val loss at the fixed T)", ""]
    for name, sym in (("params", "N"), ("data", "D")):
        f = fits[name]
        lines.append(f"- L = {f['a']:.3g} {sym}^{-f['alpha']:.3f}: alpha_{sym} = {f['alpha']:.3f}, 95 % interval "
                     f"[{f['alpha_ci'][0]:.3f}, {f['alpha_ci'][1]:.3f}] (least squares in log-log, t with "
                     f"{f['n'] - 2} df), R^2 {f['r2']:.3f}")
    lines += ["", "## What it implies for spending compute", "", *note(study, fits, rows_n, rows_d), "",
              "Plot: `scaling.png` (band: 95 % confidence band of the fitted mean)."]
    (a.out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
