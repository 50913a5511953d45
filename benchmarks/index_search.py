"""HNSW against exact search on CLIP embeddings of world images: recall, query latency, build time.

    python -m benchmarks.index_search --checkpoint runs/m2/checkpoint.pt            # 10k, 100k, 1M
    python -m benchmarks.index_search --checkpoint runs/m2/checkpoint.pt --sizes 10000 100000

The gallery is real embeddings by an m2 CLIP of world images (the training split of world seeds
0, 1, 2 ..., 50,000 scenes each, rendered and embedded a chunk at a time, so 1M vectors need
about 400 MB and no image is kept); the queries are the canonical captions of 1,000 test-split
scenes, embedded by the same CLIP's text tower (text->image, as the page searches). For each size:
an exact ``IndexFlatIP`` (its top-k is the ground truth) and an ``IndexHNSWFlat`` (m 32,
efConstruction 80), and for each ``efSearch`` of the sweep the HNSW recall@1 and recall@10
against the exact top-k (the share of the exact top-10 found), and the latency of one query at a
time on one thread (p50, p99 over the 1,000 queries; the first 20 are warm-up). Build times are
wall seconds with the threads given. Writes ``OUT/index_search.json``, ``OUT/index_search.md`` and
the recall/latency figure ``OUT/recall_latency.png`` (default OUT: results/index_search).
Target (issue "A retrieval and evaluation app"): HNSW recall@10 >= 0.95 x flat's at >= 10x lower
p50 latency at 1M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apps.index import IndexSpec, build_faiss, search

REPO = Path(__file__).resolve().parents[1]
CHUNK = 50_000  # scenes rendered and embedded at a time (one world seed's training split)
EF_SWEEP = (16, 32, 64, 128, 256)
K = 10


def gallery_embeddings(model, n: int, progress: bool = True) -> torch.Tensor:
    """(n, E) unit-norm image embeddings of world training scenes, world seed after world seed."""
    from tqdm import tqdm

    from mmsys.clip import encode_images
    from mmsys.data.world import WorldConfig, make_split
    out, left = [], n
    with tqdm(total=n, desc="embed gallery", disable=not progress) as bar:
        for seed in range(-(-n // CHUNK)):
            split = make_split("train", min(CHUNK, left), WorldConfig(seed=seed), captions=False)
            out.append(encode_images(model, split.images))
            left -= len(split)
            bar.update(len(split))
    return torch.cat(out)


def query_embeddings(model, tok, n: int = 1000) -> tuple[torch.Tensor, list[str]]:
    from mmsys.clip import encode_texts
    from mmsys.data.world import WorldConfig, canonical_caption, make_split, scene_row
    test = make_split("test", n, WorldConfig(seed=0), captions=False)
    texts = [canonical_caption(scene_row(test.meta["scenes"], i)) for i in range(n)]
    return encode_texts(model, tok, texts), texts


def latencies(index, queries: torch.Tensor, k: int, ef: int | None, warmup: int = 20) -> np.ndarray:
    """Seconds per single-query search, for each query after the first ``warmup``."""
    times = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        search(index, queries[i:i + 1], k, ef_search=ef)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return np.array(times)


def recall(approx: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """Mean share of the exact top-k (Q, k) found in the approximate top-k."""
    return float(np.mean([len(set(a[:k].tolist()) & set(e[:k].tolist())) / k for a, e in zip(approx, exact)]))


def measure_size(emb: torch.Tensor, queries: torch.Tensor, build_threads: int) -> dict:
    import faiss
    faiss.omp_set_num_threads(build_threads)
    t0 = time.perf_counter()
    flat = build_faiss(emb, IndexSpec("flat"))
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    hnsw = build_faiss(emb, IndexSpec("hnsw"), progress=True)
    hnsw_build = time.perf_counter() - t0
    _, exact = search(flat, queries, K)
    faiss.omp_set_num_threads(1)  # latency: one query at a time on one thread
    lf = latencies(flat, queries, K, None)
    row = {"n": len(emb), "flat": {"build_s": flat_build, "p50_ms": 1e3 * np.percentile(lf, 50),
                                   "p99_ms": 1e3 * np.percentile(lf, 99), "recall@1": 1.0, "recall@10": 1.0},
           "hnsw": {"build_s": hnsw_build, "m": 32, "ef_construction": 80, "sweep": []}}
    for ef in EF_SWEEP:
        _, got = search(hnsw, queries, K, ef_search=ef)
        lh = latencies(hnsw, queries, K, ef)
        row["hnsw"]["sweep"].append({"ef_search": ef, "recall@1": recall(got, exact, 1), "recall@10": recall(got, exact, 10),
                                     "p50_ms": 1e3 * np.percentile(lh, 50), "p99_ms": 1e3 * np.percentile(lh, 99)})
        s = row["hnsw"]["sweep"][-1]
        print(f"  n {len(emb)}: efSearch {ef}: recall@10 {s['recall@10']:.4f}, p50 {s['p50_ms']:.3f} ms "
              f"(flat {row['flat']['p50_ms']:.3f} ms)", flush=True)
    return row


def to_markdown(res: dict) -> str:
    out = [f"# HNSW vs exact search ({res['checkpoint']['path']}, {res['dim']}-d)", "",
           f"`{res['command']}` at commit `{res['commit'][:12]}`; {res['machine']}; builds on {res['build_threads']} "
           f"thread(s), queries one at a time on 1 thread; {res['n_queries']} text queries (world test captions).",
           "", "| n | index | efSearch | recall@1 | recall@10 | p50 ms | p99 ms | speed-up (p50) | build s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in res["sizes"]:
        f = row["flat"]
        out.append(f"| {row['n']:,} | flat | — | 1 | 1 | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} | 1x | {f['build_s']:.1f} |")
        for s in row["hnsw"]["sweep"]:
            out.append(f"| {row['n']:,} | hnsw (m 32) | {s['ef_search']} | {s['recall@1']:.4f} | {s['recall@10']:.4f} | "
                       f"{s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {f['p50_ms'] / s['p50_ms']:.0f}x | "
                       f"{row['hnsw']['build_s']:.1f} |")
    t = res.get("target")
    if t:
        out += ["", f"**Target at {t['n']:,}** (recall@10 >= 0.95 at >= 10x lower p50 than flat): "
                    f"{'met' if t['met'] else 'NOT met'} — best efSearch {t['ef_search']}: recall@10 {t['recall@10']:.4f}, "
                    f"{t['speedup']:.0f}x."]
    return "\n".join(out) + "\n"


def figure(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in res["sizes"]:
        sw = row["hnsw"]["sweep"]
        line, = ax.plot([s["p50_ms"] for s in sw], [s["recall@10"] for s in sw], "o-", label=f"HNSW, n = {row['n']:,}")
        for s in sw:
            ax.annotate(str(s["ef_search"]), (s["p50_ms"], s["recall@10"]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points")
        ax.axvline(row["flat"]["p50_ms"], color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency per query, ms (dotted: exact search at that n)")
    ax.set_ylabel("recall@10 against exact search")
    ax.set_title("HNSW efSearch sweep (labels) vs IndexFlatIP")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/m2/checkpoint.pt"))
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for embedding and builds")
    p.add_argument("--out", type=Path, default=REPO / "results" / "index_search")
    a = p.parse_args(argv)
    if not a.checkpoint.is_file():
        print(f"error: no m2 checkpoint at {a.checkpoint}: make one with `python grader.py m2`", file=sys.stderr)
        return 2
    from mmsys.checkpoint import sha256_file
    from mmsys.clip import load_clip
    torch.set_num_threads(a.threads)
    model, tok, _ = load_clip(a.checkpoint)
    t0 = time.perf_counter()
    emb = gallery_embeddings(model, max(a.sizes))
    embed_s = time.perf_counter() - t0
    queries, _ = query_embeddings(model, tok)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    res = {"command": "python -m benchmarks.index_search " + " ".join(argv if argv is not None else sys.argv[1:]),
           "commit": commit, "machine": f"{cpu}, {os.cpu_count()} cores", "build_threads": a.threads,
           "checkpoint": {"path": str(a.checkpoint), "sha256": sha256_file(a.checkpoint)}, "dim": emb.shape[1],
           "n_queries": len(queries), "embed_s": embed_s, "sizes": []}
    for n in sorted(a.sizes):
        print(f"== n = {n:,}", flush=True)
        res["sizes"].append(measure_size(emb[:n], queries, a.threads))
    big = res["sizes"][-1]
    ok = [s for s in big["hnsw"]["sweep"] if s["recall@10"] >= 0.95 and big["flat"]["p50_ms"] / s["p50_ms"] >= 10]
    best = ok[0] if ok else max(big["hnsw"]["sweep"], key=lambda s: s["recall@10"])
    res["target"] = {"n": big["n"], "met": bool(ok), "ef_search": best["ef_search"], "recall@10": best["recall@10"],
                     "speedup": big["flat"]["p50_ms"] / best["p50_ms"]}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "index_search.json").write_text(json.dumps(res, indent=2))
    (a.out / "index_search.md").write_text(to_markdown(res))
    figure(res, a.out / "recall_latency.png")
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
