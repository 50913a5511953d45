"""Human evaluation of prompt match (a grading instrument): the sheet of generated images with
their prompts, a person's yes/no answers, and the grader's reading of a recorded answer file.

The command line is ``python -m apps.human_eval`` (write / record). The grader (m5) writes the
sheet of its gate images with :func:`write_sheet` and reads ``human_eval.json`` with
:func:`read_record`, which counts only answers about exactly those images.

The folder holds ``sheet.png`` (all images, numbered, prompt under each), ``index.html`` (the
same as a page), ``images/NNN.png`` and ``template.json`` (prompts, image files and the run's
identity: checkpoint hash, seed, guidance, sampler). ``human_eval.json`` repeats that identity,
so a grader run can tell answers about *its* images from stale ones. Every annotator's answers
are kept (one entry each, with annotator id and time); the gate is their mean, reported with each
one's score and their agreement (:mod:`eval.agreement`).
"""

from __future__ import annotations

import hashlib
import html
import json
import sys
import time
from pathlib import Path

import torch

from eval.reference.data.paths import atomic_write_text

RECORD_FORMAT = "mmsys-human-eval/2"  # {"format", "question", "records": [one entry per recording]}
GATE_VALUE = "the mean over annotators of each one's share of yes answers"
QUESTION = "Does the image show the prompt's colour, shape AND position? (size does not matter)"
YES, NO = {"y", "yes", "1", "true", "t"}, {"n", "no", "0", "false", "f"}


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """uint8 (3, H, W) -> PNG file."""
    from PIL import Image
    Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy()).save(path)


def write_sheet(images: torch.Tensor, prompts: list[str], out_dir: str | Path, meta: dict | None = None,
                cols: int = 10) -> dict[str, str]:
    """Write images uint8 (N, 3, H, W) with their N prompts for a person to judge.

    Returns the paths written: ``sheet`` (PNG), ``html``, ``template`` (JSON), ``images`` (folder)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(prompts):
        raise ValueError(f"need uint8 (N, 3, H, W) images and N prompts, got {tuple(images.shape)} "
                         f"{images.dtype} and {len(prompts)} prompts")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i, (img, p) in enumerate(zip(images, prompts)):
        name = f"images/{i:03d}.png"
        save_png(img, out / name)
        items.append({"i": i, "prompt": p, "image": name, "answer": None})
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for it, ax in zip(items, axes.flat):
        ax.imshow(images[it["i"]].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        words = it["prompt"].split()
        half = (len(words) + 1) // 2
        ax.set_title(f"#{it['i']}\n{' '.join(words[:half])}\n{' '.join(words[half:])}", fontsize=6.5)
    fig.suptitle(QUESTION, fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "sheet.png", dpi=110)
    plt.close(fig)
    cells = "".join(f"<tr><td>{it['i']}</td><td><img src='{it['image']}' width=128 "
                    f"style='image-rendering:pixelated'></td><td>{html.escape(it['prompt'])}</td></tr>"
                    for it in items)
    (out / "index.html").write_text(f"<html><body><h3>{html.escape(QUESTION)}</h3><table border=1>"
                                    f"<tr><th>#</th><th>image</th><th>prompt</th></tr>{cells}</table></body></html>")
    template = {"question": QUESTION, "meta": meta or {}, "items": items,
                "how": "fill each 'answer' with true/false, or run `python -m apps.human_eval record "
                       f"{out}` (interactive, or --answers FILE with one y/n per line)"}
    (out / "template.json").write_text(json.dumps(template, indent=2))
    return {"sheet": str(out / "sheet.png"), "html": str(out / "index.html"),
            "template": str(out / "template.json"), "images": str(out / "images")}


def parse_answer(text) -> bool:
    """'y'/'yes'/'1'/true -> True, 'n'/'no'/'0'/false -> False; anything else raises ValueError."""
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in YES:
        return True
    if t in NO:
        return False
    raise ValueError(f"answer {text!r} is not yes/no (use y or n)")


def read_answers(path: str | Path, n: int) -> list[bool]:
    """Answers from a file: a filled-in template/JSON list, or text with one y/n per line."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [ln.split("#")[0].strip() for ln in text.splitlines()]
        data = [ln for ln in data if ln]
    if isinstance(data, dict):
        data = [it.get("answer") for it in data.get("items", [])] or data.get("answers", [])
    if len(data) != n or any(a is None for a in data):
        raise ValueError(f"{path}: need {n} yes/no answers, found {sum(a is not None for a in data)} of {len(data)}")
    return [parse_answer(a) for a in data]


def ask(items: list[dict], folder: Path, stdin=sys.stdin, stdout=sys.stdout, show: bool = False) -> list[bool]:
    """Ask for each item in the terminal; returns the answers. ``show`` opens each image in a
    matplotlib window (needs a display)."""
    answers = []
    print(QUESTION + f"\n(images: {folder / 'sheet.png'} or {folder / 'index.html'})", file=stdout)
    for it in items:
        if show:
            import matplotlib.pyplot as plt
            plt.imshow(plt.imread(folder / it["image"]), interpolation="nearest")
            plt.title(it["prompt"])
            plt.show(block=False)
        while True:
            print(f"#{it['i']:3d} {it['prompt']!r} ({it['image']}) [y/n]: ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:
                raise EOFError(f"input ended after {len(answers)} of {len(items)} answers")
            try:
                answers.append(parse_answer(line))
                break
            except ValueError as e:
                print(f"  {e}", file=stdout)
    return answers


def record(folder: str | Path, answers: list[bool], out: str | Path | None = None, annotator: str = "",
           force: bool = False) -> dict:
    """Add one annotator's answers for the sheet in ``folder`` to the record file ``out`` (default
    ``folder/../human_eval.json``), keeping every earlier annotator's.

    The file is append-only: ``{"format", "question", "records": [entry, ...]}``, one entry per
    recording (``annotator``, ``recorded_at``, the sheet's ``meta``, ``answers`` ...). Recording
    again as an annotator who already answered these very images raises ValueError unless
    ``force``; with ``force`` the new answers are added and the earlier ones are kept, marked
    ``superseded_at``. An old single-annotator file becomes the first entry. Written atomically."""
    folder = Path(folder)
    template = json.loads((folder / "template.json").read_text())
    items = template["items"]
    if len(answers) != len(items):
        raise ValueError(f"{len(answers)} answers for {len(items)} images")
    out = Path(out) if out else folder.parent / "human_eval.json"
    entries = _entries(out) if out.is_file() else []
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    mine = [e for e in _current(entries, template["meta"]) if e.get("annotator", "") == annotator]
    if mine and not force:
        raise ValueError(f"annotator {annotator!r} already answered these images in {out} (recorded at "
                         f"{mine[-1].get('recorded_at', '?')}): pass --force to record a new version (the "
                         f"earlier one is kept, marked superseded) or --annotator NAME for another person")
    for e in mine:
        e["superseded_at"] = now
    n_yes = sum(bool(a) for a in answers)
    entry = {"annotator": annotator, "recorded_at": now, "meta": template["meta"], "n": len(items), "yes": n_yes,
             "human_prompt_match": n_yes / len(items),
             "answers": [{"i": it["i"], "prompt": it["prompt"], "answer": bool(a)} for it, a in zip(items, answers)]}
    entries.append(entry)
    atomic_write_text(out, json.dumps({"format": RECORD_FORMAT, "question": template["question"],
                                       "records": entries}, indent=2))
    return {**entry, "path": str(out), "n_annotators": len(_current(entries, template["meta"]))}


def _entries(path: Path) -> list[dict]:
    """The recorded entries of a record file (an old single-annotator file is one entry)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a human-eval record ({type(e).__name__}): move it aside") from None
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        return data["records"]
    if isinstance(data, dict) and isinstance(data.get("answers"), list):
        return [data]  # the single-annotator format (no "records")
    raise ValueError(f"{path} is not a human-eval record (no 'records' or 'answers'): move it aside")


def _current(entries: list[dict], meta: dict) -> list[dict]:
    """The entries about the images ``meta`` describes that no later recording superseded."""
    return [e for e in entries if (e.get("meta") or {}) == meta and not e.get("superseded_at")]


def sheet_meta(checkpoint_sha256: str, prompts: list[str], seed: int, guidance: float, sampler: str,
               steps: int, eta: float = 0.0) -> dict:
    """The identity of a set of generated images (what makes answers about them reusable)."""
    return {"checkpoint_sha256": checkpoint_sha256, "seed": seed, "guidance": float(guidance),
            "sampler": sampler, "steps": int(steps), "eta": float(eta), "n": len(prompts),
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def read_record(path: str | Path, meta: dict) -> dict:
    """The grader's reading of a record file: ``{"status": "not recorded"}`` when there is none,
    ``"stale: ..."`` when no answers are about the images graded now (``meta``, their identity),
    ``"unreadable: ..."`` for a file that is not a record, else ``{"status": "recorded", "value",
    "n", "n_annotators", "annotators", "agreement"}``.

    ``value`` (the gate) is the MEAN OVER ANNOTATORS of each one's share of yes (:data:`GATE_VALUE`);
    ``annotators`` lists each one's ``value``, ``yes``, ``n``, ``recorded_at``; ``agreement``
    (None for one annotator) is :func:`eval.agreement.agreement`: Cohen's kappa for two,
    Fleiss' kappa for more, and the mean pairwise percent agreement."""
    from eval.agreement import agreement
    path = Path(path)
    if not path.is_file():
        return {"status": "not recorded"}
    try:
        entries = _entries(path)
    except ValueError as e:
        return {"status": f"unreadable: {e}"}
    current = _current(entries, meta)
    if not current:
        theirs = (entries[-1].get("meta") or {}) if entries else {}
        diff = sorted(k for k in set(meta) | set(theirs) if theirs.get(k) != meta.get(k))
        return {"status": f"stale: the answers are about other images (differs in {diff})"}
    people = [{"annotator": e.get("annotator", ""), "recorded_at": e.get("recorded_at", ""),
               "value": e["human_prompt_match"], "yes": e["yes"], "n": e["n"]} for e in current]
    answers = [[a["answer"] for a in sorted(e["answers"], key=lambda a: a["i"])] for e in current]
    return {"status": "recorded", "value": sum(p["value"] for p in people) / len(people), "n": current[0]["n"],
            "n_annotators": len(people), "gate_value": GATE_VALUE, "annotators": people,
            "agreement": agreement(answers) if len(answers) > 1 else None}


def describe_record(human: dict) -> str:
    """One phrase for a log about a :func:`read_record` result: its status, or when recorded the
    gate value, each annotator's score and their agreement."""
    if human["status"] != "recorded":
        return human["status"]
    people = ", ".join(f"{p['annotator'] or '?'} {p['value']:.2f}" for p in human["annotators"])
    agr = human.get("agreement")
    kappa = "" if not agr else (f"; {agr['statistic']} " + ("undefined" if agr["kappa"] is None
                                                             else f"{agr['kappa']:.2f}"))
    return f"{human['value']:.2f}, mean of {human['n_annotators']} annotator(s) ({people}{kappa})"
