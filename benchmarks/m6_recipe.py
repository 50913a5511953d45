"""Choose m6's quick recipe on the spoken world's VALIDATION split (never test or heldout).

    python -m benchmarks.m6_recipe --steps 1200 --config '{"patch_time": 8, "enc_dim": 96, "enc_depth": 3}'
    python -m benchmarks.m6_recipe --clip runs/m2/checkpoint.pt ...   reuse a trained m2 CLIP

Trains (or loads) the m2 quick CLIP, binds an audio model to its frozen image and text towers
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
from pathlib import Path
from types import SimpleNamespace

import torch

from eval.reference.audio.waves import pad
from eval.reference.data.speech import make_speech_split
from eval.reference.data.world import composition_label
from eval.retrieval import text_to_image_recall, zero_shot_topk
from eval.wer import word_error_rate
from milestones.adapters import CANDIDATE as impl
from milestones.common import world_split
from milestones.m2_clip import (RECIPES, class_embeddings, composition_names, embed_images, embed_texts, load_clip,
                                train_clip, world_image_keys)


@torch.no_grad()
def embed_audio(model, split, batch: int = 100) -> torch.Tensor:
    out = []
    for i in range(0, len(split), batch):
        w, n = pad(split.waves[i:i + batch])
        out.append(impl.audio_encode(model, w, n))
    return torch.cat(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--asr-weight", type=float, default=1.0)
    ap.add_argument("--config", default="{}", help="AudioModelConfig fields as JSON")
    ap.add_argument("--clip", type=Path, default=None, help="an m2 CLIP checkpoint (default: train one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/m6_recipe/results.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    if args.clip is not None:
        clip, tok, _ = load_clip(args.clip)
    else:
        clip, tok, _ = train_clip(RECIPES["quick"], world_split(SimpleNamespace(world_seed=0), "train", RECIPES["quick"].n_train), args.seed,
                                  args.out.parent / "clip", False)
    t_clip = time.perf_counter() - t0
    train, val = make_speech_split("train", args.n_train), make_speech_split("val", args.n_val)
    t_data = time.perf_counter() - t0 - t_clip
    scenes = train.meta["world"]
    config = {"vocab_size": len(tok), **json.loads(args.config)}
    torch.manual_seed(args.seed)
    model = impl.audio_build(config)
    ids, _ = impl.clip_tokenize(tok, train.transcripts, model.cfg.max_len)  # <bos> .. <eos>, padded
    pairs = impl.audio_pairs(model, train.waves, embed_images(clip, scenes.images),
                             embed_texts(clip, tok, train.transcripts), ids, world_image_keys(scenes.meta["scenes"]))
    tc = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=0.05, warmup_steps=50,
              seed=args.seed, out_dir=None, progress=True, log_every=50)
    trainer = impl.trainer(model, tc, loss_fn=lambda m, b: impl.audio_loss(m, b, args.asr_weight),
                           data_size=len(pairs), get_batch=pairs.get_batch, kind="audio", model_config=config)
    t1 = time.perf_counter()
    summary = trainer.fit()
    t_train = time.perf_counter() - t1
    model = trainer.eval_model().eval()
    emb = embed_audio(model, val)
    r = text_to_image_recall(emb, embed_images(clip, val.meta["world"].images), torch.arange(len(val)))
    single = val.meta["scenes"]["n_objects"] == 1
    zs = zero_shot_topk(emb[single], class_embeddings(clip, tok, composition_names()),
                        composition_label(val.meta["scenes"])[single])
    hyp = []
    with torch.no_grad():
        for i in range(0, len(val), 100):
            w, n = pad(val.waves[i:i + 100])
            hyp += [tok.decode(s) for s in impl.audio_transcribe(model, w, n).tolist()]
    wer = word_error_rate(val.transcripts, hyp)
    row = {"config": config, "steps": args.steps, "lr": args.lr, "asr_weight": args.asr_weight,
           "n_train": args.n_train, "val_a2i_R@1": r["R@1"], "val_a2i_R@10": r["R@10"],
           "val_zeroshot_top1": zs["top1"], "val_zeroshot_top5": zs["top5"], "val_zeroshot_n": int(single.sum()),
           "val_wer": wer["wer"], "clip_s": round(t_clip, 1), "data_s": round(t_data, 1),
           "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - t0, 1),
           "final_loss": {k: float(v) for k, v in summary.get("final_metrics", {}).items()},
           "examples": list(zip(val.transcripts[:3], hyp[:3]))}
    print(json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
