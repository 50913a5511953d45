"""Caption metrics through pycocoevalcap (the COCO caption evaluation code): BLEU-1..4, METEOR,
ROUGE-L, CIDEr(-D), SPICE.

What the numbers are (read from pycocoevalcap 1.2's source, checked by running it):
- Text is first tokenised by the Stanford PTB tokenizer (Java, lower-cased, punctuation removed),
  exactly as the COCO evaluation server does. No Java -> :class:`JavaMissingError`.
- BLEU-n: corpus-level BLEU (n-gram counts summed over all images before dividing), brevity
  penalty against the *closest* reference length; 0-1 scale.
- METEOR: METEOR 1.5 (``-l en -norm``) from its jar, corpus-level (the jar aggregates statistics;
  not the mean of per-image scores); 0-1 scale. A prediction identical to a reference scores 1.
- ROUGE_L: mean over images of the LCS F-measure (beta = 1.2) against the best reference; 0-1.
- CIDEr: pycocoevalcap's ``Cider`` is **CIDEr-D** (Vedantam et al. 2015, sec. 5.1): clipped
  n-gram counts (``min(hyp, ref)``), a Gaussian length penalty (sigma = 6), n = 1..4, scaled by
  10. The IDF comes from the references of the *evaluated set itself*, so scores depend on the
  set: on a single image every IDF is log(1) = 0 and CIDEr is 0 whatever the caption; n-grams
  found in every image's references weigh nothing. Scale 0-10 (papers print x100).
- SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use. We never
  download: without ``spice/lib/stanford-corenlp-3.6.0*.jar`` SPICE is reported under
  ``"skipped"``. (Offline, pycocoevalcap's own attempt fails with URLError.) SPICE 1.0 is also
  known to fail on Java > 8 (module access errors); any failure is reported as skipped.

METEOR loads a 62 MB paraphrase table per scorer process (~10 s): one scorer is kept per Python
process (:func:`meteor_scorer`), closed at exit or with :func:`close_meteor`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

ALL_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
JAVA_HINT = "install a Java runtime, e.g. apt-get install -y default-jre-headless"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class JavaMissingError(RuntimeError):
    """The PTB tokenizer and METEOR/SPICE need a ``java`` executable on PATH."""


def pycocoevalcap_dir() -> Path:
    """Folder of the installed pycocoevalcap package (a namespace package: no ``__file__``)."""
    spec = find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pycocoevalcap is not installed: pip install pycocoevalcap")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def java_available() -> bool:
    """True if ``java -version`` runs (cached per process)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def require_java() -> None:
    """Raise :class:`JavaMissingError` with install instructions when Java is missing."""
    if not java_available():
        raise JavaMissingError("caption metrics need Java (PTB tokenizer, METEOR): no working "
                               f"`java` on PATH; {JAVA_HINT}")


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """Stanford PTB tokenisation as pycocoevalcap's ``PTBTokenizer`` does it.

    Same jar, flags (``-preserveLines -lowerCase``) and punctuation list; the temporary file goes
    to the system temp dir instead of the package folder (which may be read-only), and the
    tokenizer's chatter on stderr is captured. Whitespace inside a sentence (newlines, unicode
    line separators) is collapsed first so lines stay aligned.

    Args:
        sentences: raw captions.
    Returns:
        one lower-cased, space-separated token string per sentence.
    """
    require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR
    if not sentences:
        return []
    jar = pycocoevalcap_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    text = "\n".join(" ".join(s.split()) for s in sentences)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        proc = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", f.name],
                              capture_output=True, timeout=600)
    finally:
        os.remove(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")[:len(sentences)]
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in lines]


# --------------------------------------------------------------------------- METEOR scorer cache
_METEOR = None
_METEOR_LOCK = threading.Lock()


def meteor_scorer():
    """The process-wide pycocoevalcap ``Meteor`` (started lazily; its JVM is reused)."""
    global _METEOR
    require_java()
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor
            _METEOR = Meteor()
        return _METEOR


def _close(m) -> None:
    """Kill one ``Meteor``'s JVM, close its pipes, and release its lock if a failed call left
    it held (pycocoevalcap's ``compute_score`` does not release on error, and its ``__del__``
    would then block on the lock forever)."""
    with contextlib.suppress(Exception):
        m.meteor_p.kill()
        m.meteor_p.wait(timeout=30)
    for stream in (m.meteor_p.stdin, m.meteor_p.stdout, m.meteor_p.stderr):
        with contextlib.suppress(Exception):
            stream.close()
    if m.lock.locked():
        with contextlib.suppress(RuntimeError):
            m.lock.release()


def close_meteor(scorer=None) -> None:
    """Stop the cached METEOR subprocess (or only ``scorer`` if it is given and cached).

    Safe to call twice; registered at interpreter exit.
    """
    global _METEOR
    with _METEOR_LOCK:
        m = _METEOR if scorer is None or scorer is _METEOR else None
        if m is not None:
            _METEOR = None
    if m is not None:
        _close(m)
    elif scorer is not None:
        _close(scorer)


atexit.register(close_meteor)


def _meteor(gts: dict, res: dict, timeout: float) -> float:
    """Corpus METEOR with a watchdog: a hung or dead JVM is killed and raises RuntimeError."""
    scorer = meteor_scorer()
    result: dict = {}

    def work():
        try:
            result["score"] = scorer.compute_score(gts, res)[0]
        except Exception as e:  # noqa: BLE001 - reported to the caller below
            result["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive() or "error" in result:
        err = result.get("error") or TimeoutError(f"no answer within {timeout:.0f} s")
        stderr = ""
        with contextlib.suppress(Exception):
            scorer.meteor_p.kill()          # unblocks the worker thread's readline
            t.join(10)
            stderr = scorer.meteor_p.stderr.read().decode(errors="replace").strip()[-500:]
        close_meteor(scorer)
        raise RuntimeError(f"METEOR failed: {type(err).__name__}: {err}"
                           + (f" (java stderr: {stderr})" if stderr else ""))
    return float(result["score"])


# --------------------------------------------------------------------------- SPICE
def spice_missing_reason() -> str | None:
    """Why SPICE cannot run offline ("needs the Stanford CoreNLP 3.6.0 jars ..."), or None when
    its jars are present."""
    lib = pycocoevalcap_dir() / "spice" / "lib"
    missing = [j for j in SPICE_JARS if not (lib / j).is_file()]
    if missing:
        return (f"needs the Stanford CoreNLP 3.6.0 jars {', '.join(missing)} in {lib}; pycocoevalcap "
                "would download them and the grader never downloads")
    return None


def _spice(gts: dict, res: dict) -> float:
    from pycocoevalcap.spice.spice import Spice
    scorer = Spice.__new__(Spice)           # skip __init__: it is the downloader
    with contextlib.redirect_stdout(io.StringIO()):
        return float(scorer.compute_score(gts, res)[0])


# --------------------------------------------------------------------------- public entry point
def _normalise_inputs(predictions, references) -> tuple[list, list[str], list[list[str]]]:
    """dicts keyed by id, or aligned lists -> (ids, predictions, references)."""
    if isinstance(predictions, dict) != isinstance(references, dict):
        raise TypeError("predictions and references must both be dicts (by id) or both lists")
    if isinstance(predictions, dict):
        if set(predictions) != set(references):
            extra, missing = set(predictions) - set(references), set(references) - set(predictions)
            raise ValueError(f"id mismatch: {len(extra)} predictions without references "
                             f"{sorted(extra, key=str)[:5]}, {len(missing)} references without "
                             f"predictions {sorted(missing, key=str)[:5]}")
        ids = list(references)
        preds, refs = [predictions[i] for i in ids], [references[i] for i in ids]
    else:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
        ids, preds, refs = list(range(len(predictions))), list(predictions), list(references)
    if not ids:
        raise ValueError("nothing to score")
    for i, p, r in zip(ids, preds, refs):
        if not isinstance(p, str):
            raise TypeError(f"prediction for {i!r} must be a str, got {type(p).__name__}")
        if isinstance(r, str) or not r:
            raise ValueError(f"references for {i!r} must be a non-empty list of str")
    return ids, preds, [list(r) for r in refs]


def score_captions(predictions, references, metrics=ALL_METRICS, meteor_timeout: float = 600.0,
                   per_image: bool = False) -> dict:
    """Score generated captions against reference captions with the COCO caption metrics.

    Args:
        predictions: ``{id: caption}`` or ``[caption]`` (one generated caption per image).
        references: ``{id: [ref, ...]}`` or ``[[ref, ...]]`` (aligned with predictions).
        metrics: any of ``"BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"``.
        meteor_timeout: seconds before a silent METEOR process is killed (then reported skipped).
        per_image: also return ``"per_image": {"ids": [...], metric: [score per id]}`` for
            BLEU-4, ROUGE_L, CIDEr (ids in the references' order; METEOR/SPICE not kept).
    Returns:
        ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE_L", "CIDEr", ["SPICE"]: float, "skipped":
        {metric: reason}, "n_images": int, "tokenizer": "PTB"}`` for the requested metrics.
    Raises:
        JavaMissingError: no Java runtime (the PTB tokenizer cannot run).
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    ids, preds, refs = _normalise_inputs(predictions, references)
    require_java()
    flat = ptb_tokenize(preds + [r for rs in refs for r in rs])
    res_tok, gts_tok, pos = {}, {}, len(preds)            # keyed by position 0..N-1
    for k, rs in enumerate(refs):
        res_tok[k] = [flat[k]]
        gts_tok[k] = flat[pos:pos + len(rs)]
        pos += len(rs)
    out: dict = {"n_images": len(ids), "tokenizer": "PTB"}
    skipped: dict[str, str] = {}
    per: dict[str, list] = {"ids": ids}
    quiet = contextlib.redirect_stdout(io.StringIO())
    if "BLEU" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu
        with quiet:
            scores, each = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
        out.update({f"BLEU-{n + 1}": float(s) for n, s in enumerate(scores)})
        per["BLEU-4"] = [float(x) for x in each[3]]
    if "METEOR" in metrics:
        try:
            out["METEOR"] = _meteor(gts_tok, res_tok, meteor_timeout)
        except Exception as e:  # noqa: BLE001 - a METEOR failure must not sink the other metrics
            skipped["METEOR"] = str(e)
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge
        score, each = Rouge().compute_score(gts_tok, res_tok)
        out["ROUGE_L"], per["ROUGE_L"] = float(score), [float(x) for x in each]
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider
        score, each = Cider().compute_score(gts_tok, res_tok)
        out["CIDEr"], per["CIDEr"] = float(score), [float(x) for x in each]
    if "SPICE" in metrics:
        reason = spice_missing_reason()
        if reason is None:
            try:
                out["SPICE"] = _spice(gts_tok, res_tok)
            except Exception as e:  # noqa: BLE001
                reason = f"SPICE failed (SPICE 1.0 is known to need Java 8): {type(e).__name__}: {e}"
        if reason is not None:
            skipped["SPICE"] = reason
    out["skipped"] = skipped
    if per_image:
        out["per_image"] = per
    return out
