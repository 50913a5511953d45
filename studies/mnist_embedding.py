"""The MNIST embedding study (issue 21, item 3): a small CNN maps digits to 64-d unit vectors,
trained once with the pair loss (labels: same digit -> cosine 1, different -> 0) and once with
NT-Xent on two views of each digit (no labels); how each lays the digits out in space.

    python -m studies.mnist_embedding --data-root ../shared/data/mnist     # ~10 min on one CPU thread

Writes ``results/mnist_embedding/`` (or ``--out``): ``RESULTS.md`` and ``results.json`` (kNN
accuracy and silhouette score of the test embeddings for both losses, the command, machine,
threads, commit and wall time), ``pca3d.png`` (the test embeddings' first three principal
components), ``umap.png`` (UMAP to 2-D), ``training.gif`` (the 2-D PCA after every epoch, both
losses side by side). MNIST comes from the official idx files (torchvision's folder layout).

Protocol: both encoders see the same ``--n-train`` training digits for ``--epochs`` epochs at the
same batch size and learning rate; kNN (k 20, votes exp(cosine / 0.1), eval/representation.py)
against the embeddings of those training digits, scored on the 10,000 test digits; silhouette
(cosine distance) on a seeded sample of ``--n-silhouette`` test embeddings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from eval.representation import knn_predict
from eval.representation_figures import pca
from grader.report import device_info, git_state
from milestones.common import batched
from mmsys.data.mnist import load_mnist
from mmsys.data.split import to_float
from mmsys.embedding import EmbedConfig, SmallCNN, pair_loss
from mmsys.ssl import nt_xent
from mmsys.train import Trainer, TrainConfig
from mmsys.views import ViewConfig, stack_views, two_views

REPO = Path(__file__).resolve().parents[1]
# digits: a random crop of most of the image, brightness and contrast; no flip (a mirrored 2 is
# not a 2), no hue or saturation (grey)
DIGIT_VIEWS = ViewConfig(crop_scale=(0.6, 1.0), flip=0.0, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.0,
                         hue=0.0, grayscale=0.0)
LOSSES = ("pair", "ntxent")


def embed(model, images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (N, 3, 28, 28) -> (N, 64) embeddings, in eval mode (then back to training)."""
    model.eval()
    out = batched(model, images)
    model.train()
    return out


def train_one(loss: str, train, args, test_images: torch.Tensor) -> tuple[SmallCNN, list[torch.Tensor], dict]:
    """Train with ``loss``; returns (model, the 2-D PCA of ``test_images`` after each epoch, summary)."""
    torch.manual_seed(args.seed)
    model = SmallCNN(EmbedConfig())
    images, labels = train.images, train.labels
    per_epoch = len(images) // args.batch_size
    cfg = TrainConfig(steps=per_epoch * args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=1e-4,
                      warmup_steps=per_epoch // 4, seed=args.seed, progress=not args.no_progress, log_every=50)
    if loss == "pair":
        def get_batch(idx, g):
            return to_float(images[idx]), labels[idx]

        def loss_fn(m, b):
            return pair_loss(m(b[0]), b[1])
    else:
        def get_batch(idx, g):  # (B, 2, 3, H, W): the two views of each digit
            return two_views(images[idx], g, DIGIT_VIEWS)

        def loss_fn(m, b):
            return nt_xent(m(stack_views(b)), args.temperature)
    trainer = Trainer(model, cfg, loss_fn=loss_fn, data_size=len(images), get_batch=get_batch, kind=f"mnist-{loss}")
    frames, t0 = [], time.perf_counter()
    frames.append(pca(embed(model, test_images), 2))
    for epoch in range(1, args.epochs + 1):
        summary = trainer.fit(until=epoch * per_epoch)
        frames.append(pca(embed(model, test_images), 2))
        print(f"{loss}: epoch {epoch}/{args.epochs}, loss {summary['final_metrics'].get('loss', float('nan')):.4f}",
              flush=True)
    return model, frames, {"train_wall_s": time.perf_counter() - t0, "steps": cfg.steps}


def scatter_frames(frames: dict[str, list[torch.Tensor]], labels: torch.Tensor, path: Path) -> None:
    """A GIF: per epoch, the 2-D PCA of each loss's test embeddings side by side."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    images = []
    for e in range(len(next(iter(frames.values())))):
        fig, axes = plt.subplots(1, len(frames), figsize=(9, 4.5))
        for ax, (name, fs) in zip(axes, frames.items()):
            p = fs[e]
            ax.scatter(p[:, 0], p[:, 1], c=labels, cmap="tab10", s=3, vmin=0, vmax=9)
            ax.set_title(f"{name}, epoch {e}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        images.append(Image.open(buf).convert("P", palette=Image.ADAPTIVE))
    images[0].save(path, save_all=True, append_images=images[1:], duration=700, loop=0)


def figures(emb: dict[str, torch.Tensor], labels: torch.Tensor, out: Path, seed: int) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap
    fig = plt.figure(figsize=(10, 5))
    for i, (name, z) in enumerate(emb.items()):
        ax = fig.add_subplot(1, len(emb), i + 1, projection="3d")
        p = pca(z, 3)
        sc = ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=labels, cmap="tab10", s=2, vmin=0, vmax=9)
        ax.set_title(f"{name}: PCA to 3-D", fontsize=9)
    fig.colorbar(sc, ax=fig.axes, shrink=0.6, label="digit")
    fig.savefig(out / "pca3d.png", dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(emb), figsize=(10, 5))
    for ax, (name, z) in zip(axes, emb.items()):
        p = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(z.numpy())
        ax.scatter(p[:, 0], p[:, 1], c=labels, cmap="tab10", s=2, vmin=0, vmax=9)
        ax.set_title(f"{name}: UMAP to 2-D (cosine)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "umap.png", dpi=100)
    plt.close(fig)
    return ["pca3d.png", "umap.png", "training.gif"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--out", type=Path, default=REPO / "results" / "mnist_embedding")
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--n-silhouette", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from sklearn.metrics import silhouette_score
    t_start = time.perf_counter()
    git = git_state(REPO)  # before anything is written (the output folder may be in the tree)
    commit, dirty = git["commit"][:7], git["dirty"]
    train = load_mnist(args.data_root, "train")
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(train), generator=g)[:args.n_train].sort().values
    train.images, train.labels = train.images[pick], train.labels[pick]
    test = load_mnist(args.data_root, "test")
    sample = torch.randperm(len(test), generator=g)[:args.n_silhouette]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, frames, test_emb = {}, {}, {}
    for loss in LOSSES:
        model, frames[loss], info = train_one(loss, train, args, test.images[:2000])
        tr, te = embed(model, train.images), embed(model, test.images)
        knn = float((knn_predict(tr, train.labels, te, 10) == test.labels).float().mean())
        sil = float(silhouette_score(te[sample].numpy(), test.labels[sample].numpy(), metric="cosine"))
        rows[loss] = {"knn_accuracy": knn, "silhouette": sil, **info}
        test_emb[loss] = te[:2000]
        print(f"{loss}: kNN {knn:.4f}, silhouette {sil:.4f}", flush=True)
    scatter_frames(frames, test.labels[:2000], args.out / "training.gif")
    figs = figures(test_emb, test.labels[:2000], args.out, args.seed)
    device = device_info("cpu")
    record = {"command": "python -m studies.mnist_embedding " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit, "dirty": dirty, "machine": platform.processor() or platform.machine(),
              "cpu": device.get("cpu", "?"), "cpu_isa": device["cpu_isa"],
              "torch_threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t_start,
              "args": {k: str(v) for k, v in vars(args).items()}, "results": rows, "figures": figs}
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    lines = ["# MNIST embedding: pair loss vs NT-Xent", "",
             f"`{record['command']}` at `{commit}`{' (dirty)' if dirty else ''}, {record['cpu']}, "
             f"{record['torch_threads']} torch threads, {record['wall_s']:.0f} s in all.", "",
             f"Small CNN to 64-d unit vectors, {args.n_train:,} training digits, {args.epochs} epochs of batch "
             f"{args.batch_size}; kNN (k 20) against those digits' embeddings on the 10,000 test digits; silhouette "
             f"(cosine) on {args.n_silhouette:,} test digits.", "",
             "| loss | labels used | kNN accuracy | silhouette | training wall |", "|---|---|---|---|---|"]
    for loss, r in rows.items():
        lines.append(f"| {loss} | {'yes' if loss == 'pair' else 'no (two views of each digit)'} | "
                     f"{r['knn_accuracy']:.4f} | {r['silhouette']:.4f} | {r['train_wall_s']:.0f} s |")
    lines += ["", "Figures: `pca3d.png`, `umap.png`, `training.gif` (2-D PCA of 2,000 test digits after each epoch)."]
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
