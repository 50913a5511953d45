"""Human evaluation of prompt match: write the sheet of generated images, record a person's yes/no.

    # 1. write the sheet (100 images + prompts) from a trained text-to-image checkpoint
    #    (`python grader.py m5` already writes it to runs/m5/human_eval/)
    python -m apps.human_eval write --checkpoint runs/m5/checkpoint.pt --out runs/m5/human_eval
    # 2. a person answers "does the image show the prompt's colour, shape and position?"
    python -m apps.human_eval record runs/m5/human_eval            # asks in the terminal
    python -m apps.human_eval record runs/m5/human_eval --answers answers.txt   # y/n per line
    python -m apps.human_eval record runs/m5/human_eval --annotator bob --answers bob.txt   # a second person
    # -> runs/m5/human_eval.json, which `python grader.py m5` reads as the human gate

Every annotator's answers are kept in ``human_eval.json`` (one entry each, with the annotator id
-- default: the login name -- and the time); recording again as the same annotator needs
``--force`` and keeps the earlier answers too (marked superseded). The gate is the mean over
annotators; the grader also reports each one's score and their agreement (Cohen's / Fleiss' kappa).

The folder holds ``sheet.png`` (all images, numbered, prompt under each), ``index.html`` (the
same as a page), ``images/NNN.png`` and ``template.json`` (prompts, image files and the run's
identity: checkpoint hash, seed, guidance, sampler). ``human_eval.json`` repeats that identity,
so a grader run can tell answers about *its* images from stale ones (:mod:`eval.human_eval`
holds the sheet, answer and record logic; this is its command line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from apps.cli import (GUIDANCE_MAX, ArgumentParser, fail, finite_float, missing_checkpoint, positive_int, seed,
                      unwritable, would_overwrite)
from eval.human_eval import ask, read_answers, record, sheet_meta, write_sheet

DEFAULT_DIR = Path("runs/m5/human_eval")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m apps.human_eval", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="generate the images and write the sheet + template")
    w.add_argument("--checkpoint", default="runs/m5/checkpoint.pt")
    w.add_argument("--out", default=str(DEFAULT_DIR))
    w.add_argument("--force", action="store_true", help="replace the sheet in an --out folder that has one")
    w.add_argument("-n", type=positive_int, default=100, help="number of prompts (test-split world scenes)")
    w.add_argument("--guidance", type=finite_float(0, GUIDANCE_MAX), default=None,
                   help="default: the checkpoint's recipe value")
    w.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: the checkpoint's recipe)")
    w.add_argument("--seed", type=seed, default=0)
    r = sub.add_parser("record", help="record a person's yes/no answers")
    r.add_argument("folder", nargs="?", default=str(DEFAULT_DIR))
    r.add_argument("--answers", default=None, help="file with answers (one y/n per line, or JSON); '-' = stdin lines")
    r.add_argument("--out", default=None, help="output JSON (default: FOLDER/../human_eval.json)")
    r.add_argument("--annotator", default=None, help="who answered (default: your login name)")
    r.add_argument("--force", action="store_true",
                   help="record a new version of this annotator's answers (the earlier one is kept, superseded)")
    r.add_argument("--show", action="store_true", help="open each image in a window while asking")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "write":
            return _write_cmd(a)
        folder = Path(a.folder)
        if not (folder / "template.json").is_file():
            raise FileNotFoundError(f"no {folder / 'template.json'}: run `python -m apps.human_eval write` "
                                    f"(or `python grader.py m5`) first")
        annotator = (a.annotator if a.annotator is not None else _login()).strip()
        out = Path(a.out) if a.out else folder.parent / "human_eval.json"
        problem = ("--annotator is empty: give the person's name" if not annotator else None) \
            or unwritable(out, "--out") \
            or (f"--answers {a.answers}: no such file" if a.answers not in (None, "-") and not Path(a.answers).is_file()
                else None)
        if problem:
            return fail(problem)
        items = json.loads((folder / "template.json").read_text())["items"]
        if a.answers == "-":
            answers = ask(items, folder, sys.stdin, sys.stderr)
        elif a.answers:
            answers = read_answers(a.answers, len(items))
        else:
            answers = ask(items, folder, show=a.show)
        res = record(folder, answers, out, annotator, force=a.force)
        print(f"human prompt match {res['human_prompt_match']:.3f} ({res['yes']}/{res['n']}) by {annotator!r} "
              f"-> {res['path']} ({res['n_annotators']} annotator(s) of these images)")
        return 0
    except (FileNotFoundError, ValueError, EOFError) as e:
        return fail(str(e))


def _login() -> str:
    """The login name (the default annotator id), or "" when there is none."""
    import getpass
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _write_cmd(a) -> int:
    from eval.prompt_match import world_prompts
    from mmsys.checkpoint import CheckpointError, sha256_file
    from mmsys.text2image import load_text2image, checkpoint_sampling
    out = Path(a.out)
    if problem := (unwritable(out, "--out", create_parents=True, folder=True)
                   or missing_checkpoint(a.checkpoint, "text-to-image", "m5")
                   or would_overwrite([out / "template.json"], a.force)):
        return fail(problem)
    try:
        model, ck = load_text2image(a.checkpoint)
    except CheckpointError as e:
        return fail(str(e))
    sampling = checkpoint_sampling(ck, guidance=a.guidance, steps=a.steps, sampler="ddim")
    prompts, _ = world_prompts("test", a.n)
    images = model.sample_images(prompts, seed=a.seed, progress=True, **sampling)
    meta = sheet_meta(sha256_file(a.checkpoint), prompts, a.seed, sampling["guidance"], sampling["sampler"],
                      sampling["steps"], sampling["eta"])
    paths = write_sheet(images, prompts, a.out, meta)
    print(f"wrote {paths['sheet']}, {paths['html']} and {paths['template']}; now run "
          f"`python -m apps.human_eval record {a.out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
