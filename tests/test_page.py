"""The web page (``streamlit run apps/page.py``) driven by Streamlit's AppTest: every tab with no
checkpoint yet, a text and an image search on a small untrained CLIP (shapes and messages, not
quality: the browser test checks quality), each bad input as one message and never an exception,
and human-evaluation answers saved on the page that the grader's human gate reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from test_retrieve import untrained_checkpoint  # noqa: E402  (tests/ is on sys.path)

PAGE = str(Path(__file__).resolve().parents[1] / "apps" / "page.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def page(tmp_path, clip=None, sheet=None, t2i=None) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.run()
    at.sidebar.text_input(key="clip_path").set_value(str(clip or tmp_path / "none.pt"))
    at.sidebar.text_input(key="t2i_path").set_value(str(t2i or tmp_path / "none_t2i.pt"))
    at.sidebar.text_input(key="sheet").set_value(str(sheet or tmp_path / "no_sheet"))
    return at.run()


def texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("clip") / "checkpoint.pt",
                                {"dataset": "world", "split": "test", "n": 24})


def test_every_tab_says_what_to_make_when_nothing_exists(tmp_path):
    at = page(tmp_path)
    assert not at.exception
    info = texts(at.info)
    assert "python grader.py m2" in info and "python grader.py m5" in info and "no_sheet" in info


def test_text_search_shows_top_k_with_scores_and_hashes(tmp_path, clip):
    at = page(tmp_path, clip)
    at.number_input(key="k").set_value(5)
    at.text_input(key="query").set_value("a red circle on the left").run()
    assert not at.exception and not at.error
    rows = at.table[0].value
    assert len(rows) == 5 and list(rows.columns) == ["rank", "id", "cosine", "caption"]
    assert rows["cosine"].is_monotonic_decreasing
    caption = texts(at.caption)
    assert "sha256" in caption and "flat: 24 x 24-d" in caption  # index and checkpoint shown with hashes
    assert (clip.parent / "index" / "world-flat" / "meta.json").is_file()


@pytest.mark.parametrize("query,words", [("", "empty"), ("a zebra circle", "'zebra'")])
def test_bad_text_query_is_one_message(tmp_path, clip, query, words):
    at = page(tmp_path, clip)
    at.text_input(key="query").set_value(query)
    at.button(key="search_text").click().run()
    assert not at.exception and len(at.error) == 1 and words in at.error[0].value, texts(at.error)
    assert not at.table


def test_image_search_by_gallery_pick_excludes_the_query(tmp_path, clip):
    at = page(tmp_path, clip)
    at.radio(key="mode").set_value("image").run()
    at.number_input(key="pick").set_value(3)
    at.number_input(key="k").set_value(4)
    at.button(key="search_image").click().run()
    assert not at.exception and not at.error
    assert len(at.table[0].value) == 4 and 3 not in at.table[0].value["id"].tolist()
    at.radio(key="to").set_value("captions")
    at.button(key="search_image").click().run()
    assert not at.exception and len(at.table[0].value) == 4  # image -> caption


class Upload(io.BytesIO):
    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


def test_an_upload_that_is_not_an_image_or_of_another_size():
    from PIL import Image

    from apps.page import read_upload
    from apps.retrieve import RetrieveError
    with pytest.raises(RetrieveError, match="not an image"):
        read_upload(Upload(b"plain text, not pixels", "notes.txt"), 32)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(buf, format="PNG")
    image = read_upload(Upload(buf.getvalue(), "red.png"), 32)  # resized, with a message on the page
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and int(image[0].min()) > 200


@pytest.mark.integration
def test_index_of_another_checkpoint_is_rebuilt_with_a_warning(tmp_path):
    import streamlit as st
    ckpt = untrained_checkpoint(tmp_path / "ck" / "checkpoint.pt", {"dataset": "world", "split": "test", "n": 12})
    at = page(tmp_path, ckpt)
    at.text_input(key="query").set_value("a red circle").run()
    assert at.table and not at.warning
    meta = ckpt.parent / "index" / "world-flat" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "checkpoint_sha256": "f" * 64}))
    st.cache_resource.clear()  # a fresh server process
    at = page(tmp_path, ckpt)
    at.text_input(key="query").set_value("a red circle").run()
    assert not at.exception and at.table and "cannot be used" in texts(at.warning) and "not this one" in texts(at.warning)
    assert json.loads(meta.read_text())["checkpoint_sha256"] != "f" * 64  # rebuilt for this checkpoint


def test_a_file_that_is_not_a_checkpoint_is_one_message(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    at = page(tmp_path, junk)
    assert not at.exception and len(at.error) == 1 and "junk.pt" in at.error[0].value


def sheet(tmp_path, n=6):
    from eval.human_eval import sheet_meta, write_sheet
    prompts = [f"a red circle number {i}" for i in range(n)]
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    meta = sheet_meta("c" * 64, prompts, 0, 2.0, "ddim", 25, 1.0)
    write_sheet(images, prompts, tmp_path / "run" / "human_eval", meta)
    return tmp_path / "run" / "human_eval", images, prompts, meta


@pytest.mark.integration
def test_human_evaluation_answers_reach_the_grader(tmp_path):
    from milestones import m5_text_to_image as m5
    from milestones.base import RunContext
    folder, images, prompts, meta = sheet(tmp_path)
    at = page(tmp_path, sheet=folder)
    at.button(key="FormSubmitter:human_eval-save answers").click().run()
    assert "your name" in texts(at.error)  # no name yet
    at.text_input(key="annotator").set_value("alice")
    for i in range(5):
        at.radio(key=f"ans{i}").set_value("yes" if i % 2 == 0 else "no")
    at.button(key="FormSubmitter:human_eval-save answers").click().run()
    assert "no answer yet" in texts(at.error) and not (folder.parent / "human_eval.json").exists()
    at.radio(key="ans5").set_value("yes")
    at.button(key="FormSubmitter:human_eval-save answers").click().run()
    assert not at.exception and "saved: 0.67 (4/6 yes) by 'alice'" in texts(at.success)
    # the grader's human gate reads what the page wrote, for exactly these images
    human = m5.human_gate(RunContext(out_dir=folder.parent, progress=False), images, prompts, meta)
    assert human["status"] == "recorded" and human["value"] == pytest.approx(4 / 6)
    # a second annotator: both kept, agreement shown; the same name again needs the checkbox
    at.text_input(key="annotator").set_value("bob")
    for i in range(6):
        at.radio(key=f"ans{i}").set_value("yes")
    at.button(key="FormSubmitter:human_eval-save answers").click().run()
    at = page(tmp_path, sheet=folder)
    assert "mean of 2 annotator(s)" in texts(at.success) and "agreement" in texts(at.success)
    at.text_input(key="annotator").set_value("bob")
    for i in range(6):
        at.radio(key=f"ans{i}").set_value("no")
    at.button(key="FormSubmitter:human_eval-save answers").click().run()
    assert "already answered" in texts(at.error) and "tick" in texts(at.error)


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """A tiny text-to-image checkpoint (2 training steps through m5's trainer: shapes, not quality)."""
    from dataclasses import replace

    from test_text2image import TINY_UNET, tiny_clip

    from eval.reference.data.world import make_split
    from milestones import m5_text_to_image as m5
    from milestones.base import RunContext
    world = make_split("train", 64, single=True)
    clip, tok = tiny_clip(world)
    recipe = replace(m5.RECIPES["quick"], text2image={"unet": TINY_UNET, "patch": 2}, steps=2, batch_size=8,
                     warmup_steps=1, max_minutes=None, bf16=False)
    out = tmp_path_factory.mktemp("t2i")
    m5.train_text2image(recipe, world, clip, tok, RunContext(out_dir=out, progress=False))
    return out / "checkpoint.pt"


@pytest.mark.integration
def test_text_to_image_tab_samples_with_progress(tmp_path, t2i):
    at = page(tmp_path, t2i=t2i)
    at.text_input(key="t2i_prompt").set_value("a red circle on the left")
    at.number_input(key="t2i_steps").set_value(3)
    at.number_input(key="t2i_n").set_value(2)
    at.button(key="t2i_go").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert "sha256" in texts(at.caption)
    at.text_input(key="t2i_prompt").set_value("   ")
    at.button(key="t2i_go").click().run()
    assert len(at.error) == 1 and "prompt is empty" in at.error[0].value
    at.text_input(key="t2i_prompt").set_value("a zebra circle")
    at.button(key="t2i_go").click().run()
    assert not at.exception and "'zebra'" in texts(at.warning)
