"""The web page as a person uses it: a real Streamlit server on 127.0.0.1 driven by a headless
Chromium (Debian's ``chromium``, through Playwright with ``executable_path``: no browser
download). Types a query and checks the top result's caption has the query's colour and shape,
uploads an image, and records a human-evaluation answer that the grader's human gate reads.
Screenshots go to ``$MMSYS_SCREENSHOTS`` (default: the test's temporary folder); the README's
come from this test (``MMSYS_SCREENSHOTS=docs/page python -m pytest -m slow tests/test_page_browser.py``).

Skipped, with the reason, where Chromium or Playwright is absent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine "
                                                   "(apt-get install chromium; .ci/run does)")]
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

# (query, colour, shape): the test searches with the first one whose top result, as the index
# answers it outside the page, has both words (a CLIP trained with m2's quick recipe gets most of
# these; "circle" vs "heart" at 32 pixels is its usual confusion), then checks the page shows it
CANDIDATES = (("a blue square", "blue", "square"), ("a yellow star", "yellow", "star"),
              ("a red circle", "red", "circle"), ("a green triangle", "green", "triangle"),
              ("a purple heart", "purple", "heart"), ("a white cross", "white", "cross"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory) -> Path:
    """An m2 checkpoint of the quick recipe: ``$MMSYS_PAGE_CLIP`` when it names one (.ci/run
    passes the one its grading just made), else trained here (about 3 minutes on one thread)."""
    given = os.environ.get("MMSYS_PAGE_CLIP")
    if given and Path(given).is_file():
        return Path(given)
    from eval.reference.data.world import WorldConfig
    from milestones import m2_clip as m2
    from milestones.base import RunContext
    from milestones.common import world_split
    recipe, out = m2.RECIPES["quick"], tmp_path_factory.mktemp("m2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = RunContext(out_dir=out, progress=False)
        index = {"dataset": "world", "split": "test", "n": recipe.n_test, "world_config": asdict(WorldConfig())}
        m2.train_clip(recipe, world_split(ctx, "train", recipe.n_train), 0, out, False, extra={"index": index})
    finally:
        torch.set_num_threads(threads)
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def expected(site):
    """(query, colour, shape, the top caption the index gives) for the first of :data:`CANDIDATES`
    the trained CLIP gets right, found outside the page (the same index file the page opens)."""
    from apps.index import IndexSpec
    from apps.retrieve import open_index, run_query
    from mmsys.clip import load_clip
    path = site["work"] / "runs" / "m2" / "checkpoint.pt"
    model, tok, ck = load_clip(path)
    index = open_index(model, tok, ck, path, IndexSpec())
    tops = {q: run_query(index, model, tok, 1, text=q).captions[0] for q, _, _ in CANDIDATES}
    for q, colour, shape in CANDIDATES:
        if colour in tops[q] and shape in tops[q]:
            return q, colour, shape, tops[q]
    pytest.fail(f"the trained CLIP gets none of the candidate queries right: {tops}")


@pytest.fixture(scope="module")
def site(tmp_path_factory, trained_clip):
    """A working folder with runs/m2/checkpoint.pt (a CLIP trained briefly) and a human-evaluation
    sheet at runs/m5/human_eval/, and a page server started there (the page's defaults)."""
    from eval.human_eval import sheet_meta, write_sheet
    from eval.prompt_match import world_prompts
    from eval.reference.data.world import make_split
    work = tmp_path_factory.mktemp("site")
    (work / "runs" / "m2").mkdir(parents=True)
    shutil.copy(trained_clip, work / "runs" / "m2" / "checkpoint.pt")
    prompts, _ = world_prompts("test", 10)
    images = make_split("test", 10, single=True, captions=False).images
    meta = sheet_meta("d" * 64, prompts, 0, 2.0, "ddim", 25, 1.0)
    write_sheet(images, prompts, work / "runs" / "m5" / "human_eval", meta)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "apps" / "page.py"),
                               "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless",
                               "true", "--browser.gatherUsageStats", "false"], cwd=work, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield {"url": f"http://127.0.0.1:{port}", "work": work, "images": images, "prompts": prompts, "meta": meta}
    server.terminate()
    server.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def browser_page(site):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 2000})  # tall: a screenshot shows the results
        page.goto(site["url"])
        page.get_by_text("mmsys: retrieval, text to image, human evaluation").wait_for(timeout=60_000)
        yield page
        browser.close()


def shots() -> Path:
    folder = Path(os.environ.get("MMSYS_SCREENSHOTS") or os.environ.get("PYTEST_TMP_SHOTS", "/tmp/mmsys-page-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page, name: str) -> None:
    """A screenshot once every image on the page has loaded."""
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                           timeout=30_000)
    page.screenshot(path=str(shots() / name))


def result_rows(page) -> list[list[str]]:
    rows = page.locator("[data-testid='stTable'] tbody tr")
    return [[c.inner_text() for c in rows.nth(i).locator("td, th").all()] for i in range(rows.count())]


def test_text_query_top_result_matches(browser_page, expected):
    query, colour, shape, top_caption = expected
    page = browser_page
    box = page.get_by_label("describe the image")
    box.fill(query)
    box.press("Enter")
    page.locator("[data-testid='stTable']").wait_for(timeout=120_000)
    rows = result_rows(page)
    assert rows, "no result table"
    top = rows[0][-1]
    assert colour in top and shape in top and top == top_caption, (query, rows[:3])
    shoot(page, "search-text.png")


def test_image_upload_finds_images(browser_page, site, tmp_path):
    from eval.human_eval import save_png
    page = browser_page
    query = tmp_path / "query.png"
    save_png(site["images"][0], query)
    page.get_by_text("image", exact=True).first.click()
    page.locator("input[type='file']").set_input_files(str(query))
    page.get_by_text("query.png").first.wait_for(timeout=30_000)
    page.get_by_role("button", name="search").click()
    page.get_by_text("top ").filter(has_text="image query: query.png").wait_for(timeout=60_000)
    assert len(result_rows(page)) == 10
    shoot(page, "search-image.png")


def test_human_evaluation_answer_is_recorded(browser_page, site):
    from milestones import m5_text_to_image as m5
    from milestones.base import RunContext
    page = browser_page
    page.get_by_role("tab", name="Human evaluation").click()
    page.get_by_label("your name (annotator)").fill("carol")
    n = len(site["prompts"])
    for i in range(n):
        group = page.locator("[data-testid='stRadio']").filter(has_text=f"#{i} {site['prompts'][i]}")
        group.get_by_text("yes" if i < 7 else "no", exact=True).click()
    page.get_by_role("button", name="save answers").click()
    page.get_by_text("saved: 0.70 (7/10 yes) by 'carol'").wait_for(timeout=30_000)
    shoot(page, "human-eval.png")
    run = site["work"] / "runs" / "m5"
    human = m5.human_gate(RunContext(out_dir=run, progress=False), site["images"], site["prompts"], site["meta"])
    assert human["status"] == "recorded" and human["value"] == pytest.approx(0.7)
