"""Choose m6's quick recipe on the spoken world's VALIDATION split (never test or heldout).

    python -m benchmarks.m6_recipe --steps 1200 --batch-size 32 --config '{"enc_depth": 3}'
    python -m benchmarks.m6_recipe --clip runs/m2/checkpoint.pt ...   reuse a trained m2 CLIP

Trains (or loads) m6's CLIP (m2's quick recipe, shortened), binds an audio model to its frozen image and text towers
while it learns to transcribe (``audio_loss``), and prints per recipe, on the world's val split:
audio -> image R@1/R@10 (its own images as the gallery), zero-shot top-1/top-5 of its
one-object utterances among the 80 (colour, shape) compositions (prompt ensemble), greedy WER,
and the wall time of each phase. Results append to ``--out`` (JSON lines). Everything goes
through the seam, so ``--impl`` is not needed: the bundled implementation is measured.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from eval.wer import word_error_rate
from milestones.base import RunContext
from milestones.common import world_split
from milestones.m2_clip import class_embeddings, composition_names, load_clip, train_clip
from milestones.m6_audio import RECIPES, speech_split, train_audio, transcribe, validation_data
from milestones.m6_checks import embed_gates


def main(argv=None) -> None:
    q = RECIPES["quick"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=q.n_train)
    ap.add_argument("--n-val", type=int, default=q.n_val)
    ap.add_argument("--steps", type=int, default=q.steps)
    ap.add_argument("--batch-size", type=int, default=q.batch_size)
    ap.add_argument("--lr", type=float, default=q.lr)
    ap.add_argument("--warmup", type=int, default=q.warmup_steps)
    ap.add_argument("--asr-weight", type=float, default=q.asr_weight)
    ap.add_argument("--config", default="{}", help="AudioModelConfig fields as JSON, over the quick recipe's")
    ap.add_argument("--clip", type=Path, default=None, help="an m2 CLIP checkpoint (default: train m6's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/m6_recipe/results.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    recipe = replace(q, n_train=args.n_train, n_val=args.n_val, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, warmup_steps=args.warmup, asr_weight=args.asr_weight,
                     model={**q.model, **json.loads(args.config)})
    ctx = RunContext(seed=args.seed, out_dir=args.out.parent / "run", progress=True)
    if args.clip is not None:
        clip, tok, _ = load_clip(args.clip)
    else:
        clip, tok, _ = train_clip(recipe.clip, world_split(ctx, "train", recipe.clip.n_train), args.seed,
                                  args.out.parent / "clip", False)
    t_clip = time.perf_counter() - t0
    train, val = speech_split(ctx, "train", args.n_train), speech_split(ctx, "val", args.n_val)
    t_data = time.perf_counter() - t0 - t_clip
    t1 = time.perf_counter()
    model, config, summary = train_audio(recipe, clip, tok, train, ctx, {"clip_checkpoint": "none"})
    t_train = time.perf_counter() - t1
    d = validation_data(model, clip, val, class_embeddings(clip, tok, composition_names()))
    m, hyp = embed_gates(d), transcribe(model, tok, val.waves)
    row = {"config": config, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "warmup": args.warmup, "asr_weight": args.asr_weight, "n_train": args.n_train,
           "val_a2i_R@1": m["a2i_R@1"], "val_a2i_R@10": m["a2i_R@10"], "val_zeroshot_top1": m["zeroshot_top1"],
           "val_zeroshot_top5": m["zeroshot_top5"], "val_zeroshot_n": len(d.labels),
           "val_wer": word_error_rate(val.transcripts, hyp)["wer"], "clip_s": round(t_clip, 1),
           "data_s": round(t_data, 1), "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - t0, 1),
           "final_loss": {k: float(v) for k, v in summary.get("final_metrics", {}).items()},
           "examples": list(zip(val.transcripts[:3], hyp[:3]))}
    print(json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
