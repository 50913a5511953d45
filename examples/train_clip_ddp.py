"""Train m2's CLIP with the engine on however many processes launched it (torchrun, SLURM).

    torchrun --standalone --nproc-per-node 2 -m examples.train_clip_ddp --steps 50    # one machine, 2 CPU ranks
    sbatch examples/slurm_clip.sbatch                                                  # a cluster

Each rank reads its shard of every global batch, CLIP's loss takes its negatives from the
whole global batch (every rank's embeddings gathered), the gradients are averaged by the
engine and rank 0 writes ``OUT/checkpoint.pt``. Evaluation is sharded too: each rank embeds
its share of the test images and captions (:func:`mmsys.distributed.shard`), the embeddings are
gathered (:func:`mmsys.distributed.gather_shards`) and recall@K is computed on the whole gallery.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from milestones import m2_clip
from milestones.base import RunContext
from milestones.common import world_split
from eval.retrieval import text_to_image_recall
from mmsys.distributed import cleanup_distributed, gather_shards, is_main_process, shard


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=m2_clip.RECIPES["quick"].steps)
    p.add_argument("--batch-size", type=int, default=m2_clip.RECIPES["quick"].batch_size, help="global batch")
    p.add_argument("--n-test", type=int, default=500, help="test images evaluated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/clip-ddp"))
    a = p.parse_args()
    ctx = RunContext(out_dir=a.out, device=a.device, progress=is_main_process())
    recipe = replace(m2_clip.RECIPES["quick"], steps=a.steps, batch_size=a.batch_size)
    train = world_split(ctx, "train", recipe.n_train)
    model, tok, summary = m2_clip.train_clip(recipe, train, out_dir=a.out, device=a.device,
                                             progress=is_main_process())
    test = world_split(ctx, "test", a.n_test)
    texts, t2i = m2_clip.caption_queries(test.captions)
    img = gather_shards(m2_clip.embed_images(model, test.images[shard(len(test.images))]), len(test.images))
    txt = gather_shards(m2_clip.embed_texts(model, tok, texts[shard(len(texts))]), len(texts))
    if is_main_process():
        recall = text_to_image_recall(txt, img, t2i)
        print(f"{summary['world_size']} ranks, {summary['steps']} steps, {summary['wall_s']:.0f} s of training; "
              f"text->image R@10 {recall['R@10']:.3f} over {len(img)} test images ({len(texts)} captions)")
    cleanup_distributed()


if __name__ == "__main__":
    main()
