"""The embedded world's default Inception features, shipped in ``eval/shipped_features/``.

    python -m benchmarks.shipped_features --check   recompute and compare with the shipped files
    python -m benchmarks.shipped_features --write   recompute and rewrite them (after a change
                                                    to the world or to the Inception weights)

Which sets: m4's quick recipe at world seed 0 (what CI and a learner's default run grade), the
two Inception sets of :func:`milestones.m4_measure.inception_images`: the first 500 world test
images (FID's reference) and the first 400 val images (the floor). On one CPU thread their
features cost 233 s (``--check`` on a 2-core AMD EPYC, AVX2, at 4e04ac6; read from the store:
0.085 s), each time a machine's cache is cold: a fresh checkout, CI, an auditor's clone.
Shipped, :func:`eval.fid_stats.real_features` reads them by key (images' sha256 + the
extractor's identity, which names the weights' sha256); a run with other images or weights
misses the key and computes its own. Each report says where
its features came from (``source``: shipped, cached or computed).

The files hold float32, what the network computes (lossless). ``MANIFEST.json`` names, per key,
the set, each file's sha256 (a file that differs from it is not read) and where it was made.
``--check`` exits 1 when a shipped set is missing for today's world (the world or the weights
changed: run ``--write``) or when recomputed features differ beyond the tolerance: at most
``MAX_ABS`` per feature and a Frechet distance of at most ``MAX_FID`` between the statistics of
the two. On the machine that wrote them the recomputed features are equal (difference 0); the
network's two memory layouts differ by 6e-6 (``benchmarks/inception_layout.py``); another CPU's
kernels have not been measured against them, so the tolerance is wide of both, and far below
anything m4's FID gates (150-200) could notice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

MAX_ABS = 1e-3  # largest difference of one recomputed feature from the shipped one
MAX_FID = 1e-3  # largest Frechet distance between the shipped and the recomputed statistics


def default_sets() -> dict[str, torch.Tensor]:
    """``{label: uint8 images}``: m4 quick's Inception sets at world seed 0."""
    from milestones import m4_ddpm as m4
    from milestones import m4_measure as mm
    from milestones.base import RunContext
    recipe = replace(m4.RECIPES["quick"], n_train=1)  # the train split holds no Inception set
    _, ref, floor = m4.load_data(recipe, RunContext(progress=False))
    ref_images, floor_images = mm.inception_images(recipe, ref.images, floor.images, m4.floor_count(recipe))
    return {f"m4 quick reference: world (seed 0) test[:{len(ref_images)}]": ref_images,
            f"m4 quick floor: world (seed 0) val[:{len(floor_images)}]": floor_images}


def made_where() -> dict:
    from grader.report import cpu_isa, git_state
    git = git_state(Path(__file__).resolve().parents[1])
    code_changed = [p for p in git["changed"] + git["untracked"] if not p.startswith("eval/shipped_features/")]
    return {"commit": git["commit"], "code_changed": code_changed, "torch": torch.__version__,
            "cpu": cpu_isa()["capability"], "date": time.strftime("%Y-%m-%d")}


def write(sets: dict, module) -> None:
    from eval import fid_stats as fs
    from eval.fid import file_digest
    fs.SHIPPED.mkdir(exist_ok=True)
    manifest = {}
    for label, images in sets.items():
        key = fs.feature_key(images, module)
        print(f"{label}: {len(images)} images, key {key} ...", flush=True)
        path = fs.SHIPPED / f"{key}.pt"
        digest = fs.images_digest(images)
        torch.save({"feats": fs.features(images, module).float(), "images_sha256": digest}, path)
        manifest[key] = {"set": label, "n": len(images), "images_sha256": digest,
                         "extractor": fs.extractor_identity(module), "file_sha256": file_digest(path),
                         "made": made_where()}
    for stale in set(p.stem for p in fs.SHIPPED.glob("*.pt")) - set(manifest):
        (fs.SHIPPED / f"{stale}.pt").unlink()
        print(f"removed {stale}.pt (no longer a default set)")
    fs.MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(manifest)} sets and {fs.MANIFEST}")


def check(sets: dict, module) -> bool:
    from eval import fid_stats as fs
    ok = True
    for label, images in sets.items():
        t0 = time.perf_counter()
        key = fs.feature_key(images, module)
        shipped, rejected = fs.shipped(key, len(images))
        read_s = time.perf_counter() - t0
        if shipped is None:
            print(f"FAIL {label}: key {key} not shipped ({rejected or 'no such file'}): "
                  "run python -m benchmarks.shipped_features --write")
            ok = False
            continue
        t0 = time.perf_counter()
        fresh = fs.features(images, module)
        compute_s = time.perf_counter() - t0
        diff = float((fresh - shipped).abs().max())
        dist = fs.frechet(fs.Stats.of(fresh), fs.Stats.of(shipped))
        good = diff <= MAX_ABS and dist <= MAX_FID
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {label}: max |feature difference| {diff:.2e} (<= {MAX_ABS:g}), "
              f"Frechet distance {dist:.2e} (<= {MAX_FID:g}); read from the store {read_s:.3f} s (key and "
              f"sha256 check included), computed {compute_s:.0f} s")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="recompute and compare with the shipped files")
    g.add_argument("--write", action="store_true", help="recompute and rewrite the shipped files")
    args = p.parse_args(argv)
    from eval.fid import FeatureExtractorMissing, InceptionPool3
    torch.set_num_threads(1)
    try:
        module = InceptionPool3()
    except FeatureExtractorMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sets = default_sets()
    t0 = time.perf_counter()
    if args.write:
        write(sets, module)
        ok = True
    else:
        ok = check(sets, module)
    print(f"{time.perf_counter() - t0:.0f} s, one torch thread")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
