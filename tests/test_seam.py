"""The grader owns its instruments: what an implementation folder holds besides models cannot
change a gate, and the shape tests test the implementation, not the bundled code.

Each hostile folder below is graded with ``--impl`` against the same untrained checkpoint as
the bundled implementation; the gate values must be identical."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=8, dim=32, depth=1, n_heads=2, mlp_ratio=2.0, n_classes=10)


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def hostile_folder(root: Path) -> Path:
    """An implementation folder that tries to grade itself: its own ``eval`` and ``milestones``
    packages with perfect numbers, and in its ``mmsys`` a world whose test split is the training
    split, pixels converted to zeros and an attribute judge that always says "match"."""
    return write(root, {
        "eval/__init__.py": "",
        "eval/classification.py": "def accuracy(*a, **k):\n    return 1.0\n",
        "milestones/__init__.py": "MODULES = {}\n",
        "milestones/m1_vit.py": "raise SystemExit(0)\n",
        "mmsys/__init__.py": '"""a learner\'s package: only its data and judges are its own"""\n',
        "mmsys/data/__init__.py": "",
        "mmsys/data/world.py": """
            def make_split(split, n=None, **kw):
                raise RuntimeError("the grader used the implementation's world")
            """,
        "mmsys/data/split.py": """
            import torch
            def to_float(images):
                return torch.zeros(images.shape)
            """,
        "mmsys/attributes.py": """
            def predict_attributes(*a, **k):
                raise RuntimeError("the grader used the implementation's judge")
            """,
    })


def bugged_folder(root: Path, bug: str) -> Path:
    """An ``mmsys`` with one module replaced: the bundled ViT with its positional embeddings
    dropped ("positions"), or a ViT module that raises on import ("import")."""
    src = (REPO / "mmsys" / "vit.py").read_text()
    if bug == "positions":
        line = "h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1) + self.positions(h.shape[1])"
        assert line in src, "the planted bug no longer applies: update this test with mmsys/vit.py"
        src = src.replace(line, line.replace("+ self.positions", "+ 0 * self.positions"))
    else:
        src = "raise ImportError('this ViT is not finished')\n" + src
    return write(root, {"mmsys/__init__.py": "", "mmsys/vit.py": src})


def grader(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "grader.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    import torch

    from eval.reference.checkpoint import save_checkpoint
    from eval.reference.vit import ViT, ViTConfig
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "untrained.pt"
    save_checkpoint(path, {"kind": "vit", "model": ViT(ViTConfig(**TINY)).state_dict(), "model_config": TINY})
    return path


def grade_m1(checkpoint: Path, out: Path, *extra) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = grader("m1", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", *extra)
    report = out / "m1" / "report.json"
    return r, json.loads(report.read_text()) if report.is_file() else None


@pytest.mark.integration
def test_grader_modules_never_come_from_the_implementation_folder(tmp_path):
    """With a hostile --impl loaded, every grader, milestone and instrument module (and the
    grader's world, checkpoint reader and pixel conversion) is the grader's file; only
    ``mmsys`` modules come from the folder."""
    folder = hostile_folder(tmp_path / "hostile")
    code = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        sys.path[:0] = [{str(REPO)!r}]
        from milestones.adapters import use_implementation
        use_implementation({str(folder)!r})
        import eval, grader, milestones
        for pkg in (eval, grader, milestones):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not m.name.startswith("eval.reference"):
                    importlib.import_module(m.name)
        for name in ("eval.reference.data.world", "eval.reference.data.split", "eval.reference.checkpoint",
                     "milestones.common", "mmsys", "mmsys.vit"):
            importlib.import_module(name)
        print(json.dumps({{n: getattr(m, "__file__", None) for n, m in sys.modules.items()
                          if n.split(".")[0] in ("eval", "grader", "milestones", "mmsys")}}))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = json.loads(r.stdout.strip().splitlines()[-1])
    from_folder = sorted(n for n, f in files.items() if f and Path(f).resolve().is_relative_to(folder))
    assert from_folder == ["mmsys"], from_folder  # the folder's eval/, milestones/, world ... never load
    assert Path(files["eval.reference.data.world"]) == REPO / "mmsys" / "data" / "world.py"
    assert Path(files["mmsys.vit"]) == REPO / "mmsys" / "vit.py"  # not in the folder: the bundled one


@pytest.mark.slow
def test_hostile_folder_changes_no_gate_value(untrained, tmp_path):
    honest, honest_report = grade_m1(untrained, tmp_path / "honest", "--skip-tests")
    hostile, hostile_report = grade_m1(untrained, tmp_path / "hostile-runs", "--skip-tests",
                                       "--impl", str(hostile_folder(tmp_path / "hostile")))
    assert honest.returncode == hostile.returncode == 1, hostile.stdout[-3000:] + hostile.stderr[-3000:]
    assert [g["value"] for g in hostile_report["gates"]] == [g["value"] for g in honest_report["gates"]]
    assert hostile_report["gates"][0]["value"] < 0.5 and not hostile_report["gates"][0]["passed"]
    assert hostile_report["datasets"] == honest_report["datasets"]  # the grader's world, same hashes
    supplied = hostile_report["provenance"]["implementation"]["supplied_by"]
    assert supplied["mmsys"] == "implementation" and supplied["mmsys.vit"] == "bundled"


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["positions", "import"])
def test_shape_tests_test_the_implementation(bug, untrained, tmp_path):
    """A planted bug in the --impl folder fails the m1 shape tests (gates not evaluated,
    exit 1); the bundled code passes the same tests (next test)."""
    r, report = grade_m1(untrained, tmp_path / "bugged", "--impl", str(bugged_folder(tmp_path / "impl", bug)))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["tests"]["passed"] is False and report["error"] == "shape tests failed: gates not evaluated"
    assert report["gates"][0]["value"] is None


@pytest.mark.slow
def test_bundled_code_passes_the_same_shape_tests(untrained, tmp_path):
    r, report = grade_m1(untrained, tmp_path / "bundled")
    assert report["tests"]["passed"] is True, report["tests"]
    assert report["gates"][0]["value"] is not None


@pytest.mark.integration
def test_implementation_that_cannot_be_imported_exits_2(tmp_path):
    folder = write(tmp_path / "impl", {"mmsys/__init__.py": "raise ImportError('half-written')\n"})
    r = grader("m1", "--impl", str(folder), "--out", str(tmp_path / "runs"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "importing its mmsys package failed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_verify_agrees_and_catches_an_edit(untrained, tmp_path):
    import shutil
    checkpoint = Path(shutil.copy(untrained, tmp_path / "ck.pt"))  # this test moves it
    r, report = grade_m1(checkpoint, tmp_path / "runs", "--skip-tests", "--format", "gradescope")
    assert report is not None, r.stderr[-3000:]
    path = tmp_path / "runs" / "m1" / "report.json"
    from test_gradescope import validate  # the Gradescope file of this run has the schema's fields
    validate(json.loads((path.parent / "results.json").read_text()))
    assert report["integrity"]["changed_during_run"] == [] and report["integrity"]["grader"]["n_files"] > 50
    v = grader("verify", str(path), "--no-progress")
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
    assert "every gate agrees" in v.stdout

    edited = dict(report, gates=[dict(report["gates"][0], value=report["gates"][0]["value"] + 0.05)])
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    v = grader("verify", str(tmp_path / "edited.json"), "--no-progress")
    assert v.returncode == 1 and "DIFFERS" in v.stdout, v.stdout[-3000:] + v.stderr[-3000:]

    other = dict(report, checkpoint=dict(report["checkpoint"], sha256="0" * 64))
    (tmp_path / "other.json").write_text(json.dumps(other))
    v = grader("verify", str(tmp_path / "other.json"))
    assert v.returncode == 2 and "sha256" in v.stderr and len(v.stderr.strip().splitlines()) == 1

    (tmp_path / "runs" / "m1" / "report.json").rename(tmp_path / "moved.json")
    Path(report["checkpoint"]["path"]).rename(tmp_path / "elsewhere.pt")
    v = grader("verify", str(tmp_path / "moved.json"))
    assert v.returncode == 2 and "missing" in v.stderr
