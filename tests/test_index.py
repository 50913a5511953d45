"""The Faiss embedding indexes (:mod:`apps.index`): exact and HNSW search on constructed unit
vectors, the saved folder (atomic, hashed) and every refusal of :func:`apps.index.load`."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("faiss")
from apps import index as ix  # noqa: E402


def unit(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


def constructed(n=200, d=16, kind="flat") -> ix.EmbeddingIndex:
    emb, txt = unit(n, d, 0), unit(n, d, 1)
    gallery = ix.Gallery(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), [f"caption {i}" for i in range(n)],
                         {"dataset": "constructed", "split": "test", "n": n})
    spec = ix.IndexSpec(kind)
    meta = {"format": ix.FORMAT, "gallery": gallery.identity, "n": n, "dim": d, "checkpoint_sha256": "a" * 64,
            "kind": kind, "params": spec.params()}
    return ix.EmbeddingIndex(gallery, ix.build_faiss(emb, spec), ix.build_faiss(txt, spec), meta)


def test_flat_search_is_exact_cosine_ranking():
    index, q = constructed(), unit(5, 16, 7)
    scores, ids = index.text_to_image(q, 10)
    emb = unit(200, 16, 0)
    ref = (q @ emb.T).topk(10)
    assert torch.equal(ids, ref.indices) and torch.allclose(scores, ref.values, atol=1e-5)


def test_hnsw_finds_the_exact_neighbours_on_a_small_gallery():
    flat, hnsw, q = constructed(), constructed(kind="hnsw"), unit(50, 16, 3)
    _, exact = flat.text_to_image(q, 10)
    _, approx = hnsw.text_to_image(q, 10)
    found = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)) / exact.numel()
    assert found >= 0.95  # 200 vectors, efSearch 64: HNSW is all but exact


def test_image_to_image_leaves_out_the_query_itself():
    index = constructed()
    q = unit(200, 16, 0)[7:8]
    _, ids = index.image_to_image(q, 5)
    assert ids[0, 0] == 7
    _, ids = index.image_to_image(q, 5, exclude=7)
    assert 7 not in ids[0].tolist() and ids.shape == (1, 5)


@pytest.mark.parametrize("k", [0, 201])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ix.IndexProblem, match="1 <= k <= 200"):
        constructed().text_to_image(unit(1), k)


def test_unknown_kind_is_refused():
    with pytest.raises(ix.IndexProblem, match="flat, hnsw"):
        ix.IndexSpec("ivf")


def test_save_and_load_round_trip(tmp_path):
    index = constructed(kind="hnsw")
    ix.save(index, tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["gallery.pt", "images.faiss", "meta.json",
                                                                    "texts.faiss"]  # no temporary left
    back = ix.load(tmp_path / "idx", "a" * 64, 16)
    q = unit(3, 16, 9)
    assert torch.equal(back.text_to_image(q, 4)[1], index.text_to_image(q, 4)[1])
    assert back.gallery.captions == index.gallery.captions and torch.equal(back.gallery.images, index.gallery.images)
    assert ix.spec_of(back.meta) == ix.IndexSpec("hnsw") and "hnsw (m 32" in ix.describe(back.meta)


def test_load_refuses_another_checkpoint_dimension_or_changed_files(tmp_path):
    folder = ix.save(constructed(), tmp_path / "idx")
    with pytest.raises(ix.IndexProblem, match="not this one"):
        ix.load(folder, "b" * 64)
    with pytest.raises(ix.IndexProblem, match="32-d ones"):
        ix.load(folder, "a" * 64, 32)
    (folder / "texts.faiss").write_bytes(b"changed")
    with pytest.raises(ix.IndexProblem, match="differs from the hash"):
        ix.load(folder, "a" * 64)
    (folder / "texts.faiss").unlink()
    with pytest.raises(ix.IndexProblem, match="lacks texts.faiss"):
        ix.load(folder, "a" * 64)
    (folder / "meta.json").write_text("{ half")
    with pytest.raises(ix.IndexProblem, match="not readable JSON"):
        ix.load(folder)
    with pytest.raises(ix.IndexProblem, match="no index at"):
        ix.load(tmp_path / "nowhere")
    assert json.loads(json.dumps(ix.IndexSpec().params())) == {}
