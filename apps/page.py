"""The mmsys web page: search a gallery with a trained CLIP, sample from a text-to-image model,
and record the human evaluation of m5's gate images.

    streamlit run apps/page.py            # then open http://localhost:8501

Three tabs:

- **Search**: type a text, or upload / pick an image; the top-k of the Faiss index (flat or
  HNSW, :mod:`apps.index`) of a gallery (:mod:`apps.gallery`) as a grid with cosine scores and
  captions, and a table of the same. The index and the checkpoint are shown with their hashes.
- **Text to image**: an m5 checkpoint sampled with a prompt, a negative prompt, guidance and
  steps, with a progress bar.
- **Human evaluation**: the sheet ``python grader.py m5`` wrote (its 100 gate images and
  prompts), one yes/no per image and the annotator's name; saving writes the record the grader's
  human gate reads (``runs/m5/human_eval.json``: every annotator kept; agreement shown).

Every bad input (no checkpoint yet, an empty query, words the tokenizer does not know, an upload
that is not an image, a mismatched index, k out of range ...) is one message on the page, never a
stack trace; the checks are the command lines' own (:func:`apps.retrieve.run_query`).
"""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st
import torch

from apps.gallery import NAMES
from apps.index import KINDS, IndexProblem, IndexSpec, describe
from apps.retrieve import RetrieveError, open_index, run_query, unknown_words
from mmsys.checkpoint import CheckpointError, sha256_file

DEFAULT_CLIP = "runs/m2/checkpoint.pt"
DEFAULT_T2I = "runs/m5/checkpoint.pt"
DEFAULT_SHEET = "runs/m5/human_eval"
COLUMNS = 5  # images per grid row


# ----------------------------------------------------------------------------- cached loads
@st.cache_resource(show_spinner="loading the CLIP checkpoint ...")
def load_clip_cached(path: str, mtime_ns: int):
    """(model, tokenizer, checkpoint dict, sha256) of an m2 checkpoint (reloaded when the file changes)."""
    from mmsys.clip import load_clip
    model, tok, ck = load_clip(path)
    return model, tok, ck, sha256_file(path)


@st.cache_resource(show_spinner="opening the index (embedding the gallery the first time) ...")
def open_index_cached(path: str, mtime_ns: int, gallery: str, kind: str, data_root: str, rebuild: int):
    """(index, warnings): the checkpoint's index of ``gallery`` (built when absent, rebuilt when
    it was made from another checkpoint or is damaged: the warnings say so)."""
    model, tok, ck, _ = load_clip_cached(path, mtime_ns)
    warnings = []
    index = open_index(model, tok, ck, Path(path), IndexSpec(kind=kind), gallery,
                       Path(data_root) if data_root else None, rebuild=rebuild > 0, warn=warnings.append)
    return index, warnings


@st.cache_resource(show_spinner="loading the text-to-image checkpoint ...")
def load_t2i_cached(path: str, mtime_ns: int):
    from mmsys.text2image import load_text2image
    model, ck = load_text2image(path)
    return model, ck, sha256_file(path)


def mtime(path: str) -> int:
    return Path(path).stat().st_mtime_ns


def image_grid(images: torch.Tensor, captions: list[str]) -> None:
    """uint8 (N, 3, H, W) images in rows of :data:`COLUMNS`, each with its caption under it."""
    for a in range(0, len(images), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, img, cap in zip(cols, images[a:a + COLUMNS], captions[a:a + COLUMNS]):
            col.image(img.permute(1, 2, 0).numpy(), caption=cap, width=128)


def read_upload(upload, size: int) -> torch.Tensor:
    """An uploaded file -> uint8 (3, size, size); RetrieveError when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    from mmsys.images import load_image
    try:
        with Image.open(upload) as img:
            w, h = img.size
        upload.seek(0)
        image = load_image(upload, size)
    except (UnidentifiedImageError, OSError, ValueError):
        raise RetrieveError(f"{upload.name} is not an image this page can read: upload a PNG or JPEG") from None
    if (w, h) != (size, size):
        st.info(f"{upload.name} is {w}x{h}; the CLIP reads {size}x{size} images, so it was resized "
                f"(shorter side) and center-cropped")
    return image


# ----------------------------------------------------------------------------- the tabs
def search_tab(clip_path: str, gallery: str, kind: str, data_root: str) -> None:
    if not Path(clip_path).is_file():
        st.info(f"No CLIP checkpoint at `{clip_path}` yet. Make one with `python grader.py m2` (the embedded "
                f"world, a few minutes on a CPU, no files needed), or give another path in the sidebar.")
        return
    try:
        model, tok, ck, digest = load_clip_cached(clip_path, mtime(clip_path))
        index, warnings = open_index_cached(clip_path, mtime(clip_path), gallery, kind, data_root,
                                            st.session_state.get("rebuild", 0))
    except (CheckpointError, IndexProblem, RetrieveError) as e:
        st.error(str(e))
        return
    for w in warnings:
        st.warning(w)
    st.caption(f"checkpoint `{clip_path}` sha256 `{digest[:16]}` · index {describe(index.meta)}")
    mode = st.radio("query by", ("text", "image"), horizontal=True, key="mode")
    n = len(index.gallery)
    k = st.number_input("k (results)", min_value=1, max_value=n, value=min(10, n), key="k")
    try:
        if mode == "text":
            text = st.text_input("describe the image", key="query", placeholder="a red circle on the left")
            if not st.button("search", key="search_text") and not text:
                return
            res = run_query(index, model, tok, int(k), text=text)
        else:
            upload = st.file_uploader("upload an image", type=None, key="upload")
            pick = st.number_input(f"... or pick gallery image # (0-{n - 1})", min_value=0, max_value=n - 1,
                                   value=0, key="pick")
            to = st.radio("find", ("images", "captions"), horizontal=True, key="to")
            if not st.button("search", key="search_image"):
                return
            if upload is not None:
                image, exclude, label = read_upload(upload, model.cfg.image_size), None, upload.name
            else:
                image, exclude, label = index.gallery.images[int(pick)], int(pick), f"gallery image {int(pick)}"
            st.image(image.permute(1, 2, 0).numpy(), caption=f"query: {label}", width=128)
            res = run_query(index, model, tok, int(k), image=image, exclude=exclude,
                            to="text" if to == "captions" else "image", label=label)
    except RetrieveError as e:
        st.error(str(e))
        return
    st.subheader(f"top {len(res.ids)}: {res.query}")
    image_grid(res.images, [f"#{r} cos {s:.2f}: {c}" for r, (s, c) in enumerate(zip(res.scores, res.captions), 1)])
    st.table([{"rank": r, "id": i, "cosine": round(s, 4), "caption": c}
              for r, (i, s, c) in enumerate(zip(res.ids, res.scores, res.captions), 1)])


def text_to_image_tab(t2i_path: str) -> None:
    if not Path(t2i_path).is_file():
        st.info(f"No text-to-image checkpoint at `{t2i_path}` yet. Make one with `python grader.py m5` "
                f"(the embedded world, about 25 minutes on a CPU), or give another path in the sidebar.")
        return
    from mmsys.text2image import checkpoint_sampling
    try:
        model, ck, digest = load_t2i_cached(t2i_path, mtime(t2i_path))
    except CheckpointError as e:
        st.error(str(e))
        return
    defaults = checkpoint_sampling(ck)
    st.caption(f"checkpoint `{t2i_path}` sha256 `{digest[:16]}`")
    prompt = st.text_input("prompt", key="t2i_prompt", placeholder="a large red circle on the left")
    negative = st.text_input("negative prompt (optional)", key="t2i_negative")
    c1, c2, c3, c4 = st.columns(4)
    guidance = c1.slider("guidance", 0.0, 10.0, float(defaults["guidance"]), 0.5, key="t2i_guidance")
    steps = c2.number_input("DDIM steps", 1, model.schedule.T, int(defaults["steps"]), key="t2i_steps")
    n = c3.number_input("images", 1, 16, 4, key="t2i_n")
    seed = c4.number_input("seed", 0, 2 ** 32 - 1, 0, key="t2i_seed")
    if not st.button("generate", key="t2i_go"):
        return
    if not prompt.strip():
        st.error("the prompt is empty: describe an image, e.g. 'a large red circle on the left'")
        return
    unknown = unknown_words(model.text.tokenizer, prompt)
    if unknown:
        st.warning(f"the model's tokenizer does not know {', '.join(map(repr, unknown))}: they read as <unk>")
    bar = st.progress(0.0, text="sampling ...")
    images = model.sample_images([prompt], negative=negative or None, n=int(n), seed=int(seed),
                                 guidance=float(guidance), steps=int(steps), sampler="ddim", eta=defaults["eta"],
                                 on_step=lambda done, total: bar.progress(done / total, text=f"step {done}/{total}"))
    bar.empty()
    image_grid(images, [f"seed ({int(seed)}, {i})" for i in range(len(images))])


def human_eval_tab(sheet: str) -> None:
    from eval.human_eval import QUESTION, read_record, record
    folder = Path(sheet)
    if not (folder / "template.json").is_file():
        st.info(f"No human-evaluation sheet at `{sheet}` yet: `python grader.py m5` writes its 100 gate images "
                f"there (or `python -m apps.human_eval write`).")
        return
    template = json.loads((folder / "template.json").read_text())
    items, out = template["items"], folder.parent / "human_eval.json"
    st.markdown(f"**{QUESTION}** ({len(items)} images; the answers go to `{out}`, which the grader's human gate reads)")
    state = read_record(out, template["meta"])
    if state["status"] == "recorded":
        agr = state.get("agreement")
        st.success(f"recorded: {state['value']:.2f}, mean of {state['n_annotators']} annotator(s) ("
                   + ", ".join(f"{p['annotator']} {p['value']:.2f}" for p in state["annotators"]) + ")"
                   + (f"; agreement {agr['statistic']} {agr['kappa'] if agr['kappa'] is None else round(agr['kappa'], 3)}"
                      if agr else ""))
    elif state["status"] != "not recorded":
        st.warning(state["status"])
    with st.form("human_eval"):
        annotator = st.text_input("your name (annotator)", key="annotator")
        again = st.checkbox("record a new version of my answers (the earlier one is kept, superseded)", key="again")
        answers = []
        for a in range(0, len(items), COLUMNS):
            for col, it in zip(st.columns(COLUMNS), items[a:a + COLUMNS]):
                col.image(str(folder / it["image"]), width=96)
                answers.append(col.radio(f"#{it['i']} {it['prompt']}", ("yes", "no"), index=None, key=f"ans{it['i']}"))
        submitted = st.form_submit_button("save answers")
    if not submitted:
        return
    missing = [it["i"] for it, ans in zip(items, answers) if ans is None]
    if not annotator.strip():
        st.error("give your name (annotator) before saving: each person's answers are kept apart")
    elif missing:
        st.error(f"{len(missing)} image(s) have no answer yet (first: #{missing[0]}): answer every image")
    else:
        try:
            res = record(folder, [ans == "yes" for ans in answers], out, annotator.strip(), force=again)
        except ValueError as e:
            st.error(str(e).replace("pass --force", "tick 'record a new version'").replace(
                "--annotator NAME", "another name"))
            return
        st.success(f"saved: {res['human_prompt_match']:.2f} ({res['yes']}/{res['n']} yes) by {annotator.strip()!r}; "
                   f"{res['n_annotators']} annotator(s) of these images")


def main() -> None:
    st.set_page_config(page_title="mmsys", layout="wide")
    st.title("mmsys: retrieval, text to image, human evaluation")
    side = st.sidebar
    clip_path = side.text_input("CLIP checkpoint (m2)", DEFAULT_CLIP, key="clip_path")
    gallery = side.selectbox("gallery", NAMES, key="gallery",
                             help="world: the world's test split (no files); cifar10 / coco need the data root")
    kind = side.selectbox("index", KINDS, key="kind", help="flat: exact; hnsw: approximate, faster at scale")
    data_root = side.text_input("data root (cifar10/, coco/)", "", key="data_root")
    if side.button("rebuild index", key="rebuild_button"):
        st.session_state["rebuild"] = st.session_state.get("rebuild", 0) + 1
    t2i_path = side.text_input("text-to-image checkpoint (m5)", DEFAULT_T2I, key="t2i_path")
    sheet = side.text_input("human-evaluation sheet (m5)", DEFAULT_SHEET, key="sheet")
    search, t2i, human = st.tabs(["Search", "Text to image", "Human evaluation"])
    with search:
        search_tab(clip_path, gallery, kind, data_root)
    with t2i:
        text_to_image_tab(t2i_path)
    with human:
        human_eval_tab(sheet)


main()
