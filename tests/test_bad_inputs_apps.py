"""Issue 18, the command-line programs (``python -m apps.sample|generate|caption|retrieve|human_eval``):
every bad argument is one ``error:`` line and exit code 2 before any work (no model loaded,
nothing written); ``human_eval record`` keeps every annotator's answers and the m5 human gate
reports each one and their agreement (golden values); a corrupt retrieval index cache is rebuilt."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from apps import caption, generate, human_eval, retrieve, sample, speak

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers

def snapshot(folder: Path) -> dict:
    """File name -> (bytes, mtime) of everything under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(main, args, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a program's ``main`` (argparse errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.fixture
def no_models(monkeypatch):
    """Loading any model fails the test: a bad argument must be found before."""
    import mmsys.audio.model
    import mmsys.captioner
    import mmsys.text2image

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(sample, "load_ddpm", boom)
    monkeypatch.setattr(retrieve, "load_clip", boom)
    monkeypatch.setattr(mmsys.text2image, "load_text2image", boom)
    monkeypatch.setattr(mmsys.captioner, "load_captioner", boom)
    monkeypatch.setattr(mmsys.audio.model, "load_audio_model", boom)


@pytest.fixture
def work(tmp_path):
    """A folder with a (junk) checkpoint file, an image file, a plain file and a sub-folder."""
    (tmp_path / "checkpoint.pt").write_bytes(b"not loaded: the arguments fail first")
    (tmp_path / "img.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "sub").mkdir()
    return tmp_path


def cuda_absent_cases():
    return [] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]


BAD_SAMPLE = [
    (["--nrow", "0"], "--nrow"), (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["-n", "0"], "-n"), (["--steps", "0"], "--steps"), (["--nrow", "abc"], "not an integer"),
    (["--eta", "nan"], "--eta"), (["--eta", "-0.1"], "--eta"), (["--eta", "2"], "outside [0, 1]"),
    (["--seed", "-1"], "--seed"), (["--seed", "18446744073709551616"], "--seed"),
    (["--device", "foo"], "not a device"), (["--device", "cuda:99"], "cuda:99"),
    (["--save-tensor", "{w}/missing/x.pt"], "does not exist"), (["--save-tensor", "{w}/sub"], "is a folder"),
    (["-o", "{w}/file.txt/grid.png"], "not a folder"), (["-o", "{w}/sub"], "is a folder"),
    (["-o", "{w}/file.txt"], "--force"), (["--sampler", "ddpm", "--eta", "0.5"], "--eta"),
] + cuda_absent_cases()


@pytest.mark.parametrize("bad,words", BAD_SAMPLE)
def test_sample_bad_argument(bad, words, work, no_models, capsys):
    before = snapshot(work)
    args = ["--checkpoint", work / "checkpoint.pt", "-o", work / "new.png", "--no-progress"]
    code, err = run_main(sample.main, args + [b.format(w=work) for b in bad], capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(work) == before


BAD_GENERATE = [
    (["--scale", "0"], "--scale"), (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "finite"),
    (["--guidance", "-1"], "--guidance"), (["--eta", "nan"], "--eta"), (["-n", "0"], "-n"),
    (["--steps", "0"], "--steps"), (["--nrow", "0"], "--nrow"), (["--batch-size", "-1"], "--batch-size"),
    (["--seed", "-3"], "--seed"), (["--device", "foo"], "not a device"), (["--device", "cuda:99"], "cuda:99"),
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta only applies"), (["--sampler", "ddpm", "--steps", "5"], "--steps"),
    (["-o", "{w}/sub"], "is a folder"), (["-o", "{w}/file.txt"], "--force"),
    (["-o", "{w}/file.txt/g.png"], "not a folder"),
] + cuda_absent_cases()


@pytest.mark.parametrize("bad,words", BAD_GENERATE)
def test_generate_bad_argument(bad, words, work, no_models, capsys):
    before = snapshot(work)
    args = ["a red circle", "--checkpoint", work / "checkpoint.pt", "-o", work / "new.png"]
    code, err = run_main(generate.main, args + [b.format(w=work) for b in bad], capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(work) == before


def test_generate_empty_prompt(work, no_models, capsys):
    code, err = run_main(generate.main, ["  ", "--checkpoint", work / "checkpoint.pt", "-o", work / "n.png"], capsys)
    assert_one_line_error(code, err, "prompt is empty")


@pytest.mark.parametrize("bad,words", [
    (["--beam", "0"], "--beam"), (["--max-len", "0"], "--max-len"), (["--alpha", "nan"], "--alpha"),
    (["--alpha", "-1"], "--alpha"), (["--beam", "x"], "not an integer"),
])
def test_caption_bad_argument(bad, words, work, no_models, capsys):
    before = snapshot(work)
    code, err = run_main(caption.main, [work / "img.png", "--checkpoint", work / "checkpoint.pt"] + bad, capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(work) == before


@pytest.mark.parametrize("bad,words", [
    ([], "not both"), (["q", "--wav", "{w}/img.png"], "not both"), (["   "], "empty"),
    (["--wav", "{w}/none.wav"], "no such file"), (["--wav", "{w}/file.txt"], "cannot be read as audio"),
    (["q", "--voice", "klingon"], "--voice"), (["q", "--voice", "en-us+x9"], "--voice"),
    (["q", "--speed", "10"], "--speed"), (["q", "--pitch", "100"], "--pitch"), (["q", "-k", "0"], "-k"),
    (["q", "--snr", "nan"], "--snr"), (["q", "--snr", "500"], "--snr"),
    (["q", "--out", "{w}/sub"], "is a folder"), (["q", "--out", "{w}/file.txt"], "--force"),
])
def test_speak_bad_argument(bad, words, work, no_models, capsys):
    before = snapshot(work)
    code, err = run_main(speak.main, [b.format(w=work) for b in bad] + ["--checkpoint", work / "checkpoint.pt"],
                         capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(work) == before


@pytest.mark.parametrize("bad,words", [
    (["q", "-k", "0"], "-k"), (["q", "-k", "-1"], "-k"), (["--image", "{w}/none.png"], "no such image"),
    (["q", "--image", "test:1"], "not both"), (["q", "--out", "{w}/sub"], "is a folder"),
    (["q", "--out", "{w}/file.txt"], "--force"), (["q", "--out", "{w}/file.txt/x.png"], "not a folder"),
    (["q", "--data-root", "{w}/nowhere"], "--data-root"),
])
def test_retrieve_bad_argument(bad, words, work, no_models, capsys):
    before = snapshot(work)
    code, err = run_main(retrieve.main, [b.format(w=work) for b in bad] + ["--checkpoint", work / "checkpoint.pt"],
                         capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(work) == before


@pytest.mark.parametrize("bad,words", [
    (["-n", "0"], "-n"), (["--guidance", "nan"], "--guidance"), (["--steps", "0"], "--steps"),
    (["--seed", "-1"], "--seed"), (["--out", "{w}/file.txt"], "is a file"),
    (["--out", "{w}/sheet"], "--force"),  # a folder with a sheet in it
])
def test_human_eval_write_bad_argument(bad, words, work, no_models, capsys):
    sheet = template(work / "sheet", 2)
    before = snapshot(work)
    args = ["write", "--checkpoint", work / "checkpoint.pt", "--out", work / "new"]
    code, err = run_main(human_eval.main, args + [b.format(w=work) for b in bad], capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(work) == before and sheet.is_file()


@pytest.mark.parametrize("bad,words", [
    (["--out", "{w}/missing/h.json"], "does not exist"), (["--answers", "{w}/none.txt"], "no such file"),
    (["--annotator", " "], "--annotator"), (["--out", "{w}/sub"], "is a folder"),
])
def test_human_eval_record_bad_argument(bad, words, work, capsys):
    template(work / "sheet", 2)
    (work / "a.txt").write_text("y\nn\n")
    before = snapshot(work)
    args = ["record", work / "sheet", "--answers", work / "a.txt"]
    code, err = run_main(human_eval.main, args + [b.format(w=work) for b in bad], capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(work) == before


@pytest.mark.integration
def test_real_command_line_is_one_line(work, repo_env):
    """Through ``python -m``: argparse's own errors are one line too (no usage block), exit 2."""
    r = subprocess.run([sys.executable, "-m", "apps.sample", "--nrow", "0", "--checkpoint", str(work / "checkpoint.pt"),
                        "-o", str(work / "x.png")], capture_output=True, text=True, cwd=work, timeout=120, env=repo_env)
    assert_one_line_error(r.returncode, r.stderr, "--nrow", "--help")
    assert not (work / "x.png").exists()


# ----------------------------------------------------------------------------- human eval: annotators

A = [1, 1, 1, 0, 0, 1, 0, 1, 1, 0]  # 6/10 yes
B = [1, 1, 0, 0, 1, 1, 1, 1, 1, 0]  # 7/10 yes; agrees with A on 7 items
C = [1, 0, 1, 0, 0, 1, 1, 1, 0, 0]  # 5/10 yes; agrees with A on 7, with B on 6
META = {"checkpoint_sha256": "abc", "seed": 0, "n": 10}


def template(folder: Path, n: int, meta: dict = META) -> Path:
    """A sheet folder's template.json for ``n`` images (what ``record`` reads; no images needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"i": i, "prompt": f"prompt {i}", "image": f"images/{i:03d}.png", "answer": None} for i in range(n)]
    path = folder / "template.json"
    path.write_text(json.dumps({"question": "q?", "meta": meta, "items": items}))
    return path


def record_cli(folder: Path, who: str, answers, capsys, *more) -> tuple[int, str]:
    f = folder.parent / f"{who}.txt"
    f.write_text("".join("y\n" if a else "n\n" for a in answers))
    return run_main(human_eval.main, ["record", folder, "--answers", f, "--annotator", who, *more], capsys)


def test_agreement_golden_values():
    from eval.agreement import agreement, cohen_kappa, fleiss_kappa, percent_agreement
    # Cohen: p_o = 7/10, p_e = .6 * .7 + .4 * .3 = .54, kappa = .16 / .46 = 8/23
    assert percent_agreement(A, B) == pytest.approx(0.7)
    assert cohen_kappa(A, B) == pytest.approx(float(Fraction(8, 23)))
    # Fleiss (m = 3): yes counts per item 3,2,2,0,1,3,2,3,2,0 -> P_i = 1 (5 items) or 1/3 (5 items),
    # P_bar = 2/3; p_yes = 18/30, P_e = .36 + .16 = .52; kappa = (2/3 - .52) / .48 = 11/36
    assert fleiss_kappa([A, B, C]) == pytest.approx(float(Fraction(11, 36)))
    got = agreement([A, B, C])
    assert got["statistic"] == "fleiss_kappa" and got["mean_pairwise_agreement"] == pytest.approx(2 / 3)
    assert agreement([A, B])["statistic"] == "cohen_kappa"
    assert cohen_kappa([1, 1], [1, 1]) is None and fleiss_kappa([[0, 0]] * 3) is None  # chance agreement is 1
    assert cohen_kappa(A, A) == pytest.approx(1.0) and fleiss_kappa([A, A, A]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        agreement([A])


def test_record_twice_keeps_both_annotators_and_gate_reports_them(tmp_path, capsys):
    from eval.human_eval import read_record
    folder = tmp_path / "human_eval"
    template(folder, 10)
    out = tmp_path / "human_eval.json"
    assert record_cli(folder, "alice", A, capsys)[0] == 0
    assert record_cli(folder, "bob", B, capsys)[0] == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["annotator"] for r in recs] == ["alice", "bob"] and all(r["recorded_at"] for r in recs)
    assert [a["answer"] for a in recs[0]["answers"]] == [bool(x) for x in A]
    got = read_record(out, META)
    assert got["status"] == "recorded" and got["n_annotators"] == 2 and got["n"] == 10
    assert got["value"] == pytest.approx(0.65)  # the gate: the mean over annotators of (0.6, 0.7)
    assert [(p["annotator"], p["value"]) for p in got["annotators"]] == [("alice", 0.6), ("bob", 0.7)]
    assert got["agreement"]["kappa"] == pytest.approx(8 / 23) and got["agreement"]["statistic"] == "cohen_kappa"
    # the same annotator again: refused, file untouched; with --force a new version, the old one kept
    before = out.read_bytes()
    code, err = record_cli(folder, "alice", C, capsys)
    assert_one_line_error(code, err, "alice", "--force")
    assert out.read_bytes() == before
    assert record_cli(folder, "alice", C, capsys, "--force")[0] == 0
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 3 and recs[0]["superseded_at"] and "superseded_at" not in recs[2]
    got = read_record(out, META)
    assert [(p["annotator"], p["value"]) for p in got["annotators"]] == [("bob", 0.7), ("alice", 0.5)]
    # a third person: Fleiss' kappa over the three current answer sets
    assert record_cli(folder, "carol", A, capsys)[0] == 0
    got = read_record(out, META)
    assert got["n_annotators"] == 3 and got["value"] == pytest.approx((0.7 + 0.5 + 0.6) / 3)
    assert got["agreement"]["kappa"] == pytest.approx(11 / 36)  # B, C, A: the golden three
    # answers about other images do not count (stale), and are kept
    assert read_record(out, {**META, "seed": 1})["status"].startswith("stale")


@pytest.mark.integration
def test_m5_human_gate_reports_each_annotator(tmp_path, capsys):
    from eval.human_eval import describe_record, sheet_meta
    from milestones import m5_checks, m5_text_to_image as m5
    from milestones.base import RunContext, RunResult
    prompts = [f"prompt {i}" for i in range(10)]
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    ctx = RunContext(out_dir=tmp_path / "run", progress=False)
    meta = sheet_meta("abc", prompts, 0, 3.0, "ddim", 2, 1.0)
    assert m5.human_gate(ctx, images, prompts, meta)["status"] == "not recorded"
    for who, ans in (("alice", A), ("bob", B)):
        assert record_cli(tmp_path / "run/human_eval", who, ans, capsys)[0] == 0
    info = m5.human_gate(ctx, images, prompts, meta)
    assert info["status"] == "recorded" and info["value"] == pytest.approx(0.65)
    assert [p["value"] for p in info["annotators"]] == [0.6, 0.7]
    assert info["agreement"]["kappa"] == pytest.approx(8 / 23)
    assert describe_record(info) == "0.65, mean of 2 annotator(s) (alice 0.60, bob 0.70; cohen_kappa 0.35)"
    assert "mean" in m5_checks.HUMAN_GATE.description and "annotators" in m5_checks.HUMAN_GATE.description
    metrics = {"clip_score": 0.5, "clip_score_margin": 0.3, "prompt_match": 0.8, "guidance_gain": 0.1}
    rows = m5.MILESTONE.verdicts(RunResult(metrics={**metrics, "human_prompt_match": info["value"]}), "quick")
    assert rows[-1]["gate"] == "human_prompt_match" and not rows[-1]["passed"]  # 0.65 < 0.70


def test_old_single_annotator_file_is_read_and_kept(tmp_path, capsys):
    from eval.human_eval import read_record
    folder = tmp_path / "human_eval"
    template(folder, 10)
    old = {"question": "q?", "meta": META, "annotator": "", "recorded_at": "2024-01-01T00:00:00", "n": 10,
           "yes": 6, "human_prompt_match": 0.6,
           "answers": [{"i": i, "prompt": f"prompt {i}", "answer": bool(a)} for i, a in enumerate(A)]}
    out = tmp_path / "human_eval.json"
    out.write_text(json.dumps(old))
    got = read_record(out, META)
    assert got["status"] == "recorded" and got["value"] == 0.6 and got["n_annotators"] == 1
    assert got["agreement"] is None
    assert record_cli(folder, "bob", B, capsys)[0] == 0
    recs = json.loads(out.read_text())["records"]
    assert recs[0] == old and recs[1]["annotator"] == "bob"
    assert read_record(out, META)["agreement"]["kappa"] == pytest.approx(8 / 23)


def test_record_into_a_file_that_is_not_a_record_is_refused(tmp_path, capsys):
    folder = tmp_path / "human_eval"
    template(folder, 10)
    out = tmp_path / "human_eval.json"
    out.write_text("{ half a file")
    code, err = record_cli(folder, "alice", A, capsys)
    assert_one_line_error(code, err, "not a human-eval record")
    assert out.read_text() == "{ half a file"
    from eval.human_eval import read_record
    assert read_record(out, META)["status"].startswith("unreadable")


# ----------------------------------------------------------------------------- retrieve: index cache

@pytest.mark.integration
@pytest.mark.parametrize("corruption", ["random bytes", "truncated", "meta not JSON", "other checkpoint"])
def test_corrupt_retrieval_index_is_rebuilt(corruption, tmp_path, capsys):
    """The program's own index folder is rebuilt, with one warning line, when a file is damaged or
    it was made from another checkpoint; the rebuilt index gives the same results."""
    import json
    from test_retrieve import untrained_checkpoint  # tests/ is on sys.path
    ckpt = untrained_checkpoint(tmp_path / "checkpoint.pt", {"dataset": "world", "split": "test", "n": 16})
    args = ["a red circle on the left", "-k", "3", "--checkpoint", str(ckpt), "--force", "--out"]
    assert retrieve.main(args + [str(tmp_path / "a.png")]) == 0
    first = capsys.readouterr().out
    folder = tmp_path / "index" / "world-flat"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left
    faiss_file, meta = folder / "images.faiss", folder / "meta.json"
    if corruption == "random bytes":
        faiss_file.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                             dtype=torch.uint8).numpy().tobytes())
    elif corruption == "truncated":
        faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    elif corruption == "meta not JSON":
        meta.write_text("{ half")
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "checkpoint_sha256": "0" * 64}))
    assert retrieve.main(args + [str(tmp_path / "b.png")]) == 0
    captured = capsys.readouterr()
    warn = [ln for ln in captured.err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "rebuilding" in warn[0] and "Traceback" not in captured.err
    assert captured.out.split("wrote")[0] == first.split("wrote")[0]  # the same index line and results
    assert retrieve.main(args + [str(tmp_path / "c.png")]) == 0 and "warning" not in capsys.readouterr().err


@pytest.mark.integration
def test_an_index_given_by_hand_from_another_checkpoint_is_refused(tmp_path, capsys):
    from test_retrieve import untrained_checkpoint
    ckpt = untrained_checkpoint(tmp_path / "a" / "checkpoint.pt", {"dataset": "world", "split": "test", "n": 16})
    other = untrained_checkpoint(tmp_path / "b" / "checkpoint.pt", {"dataset": "world", "split": "test", "n": 17})
    assert retrieve.main(["a red circle", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    code, err = run_main(retrieve.main, ["a red circle", "--checkpoint", other, "--index",
                                         tmp_path / "a" / "index" / "world-flat", "--out", tmp_path / "b.png"], capsys)
    assert_one_line_error(code, err, "not this one", "rebuild")
    assert not (tmp_path / "b.png").exists()
