"""Human evaluation of prompt match: write the sheet of generated images, record a person's yes/no.

    # 1. write the sheet (100 images + prompts) from a trained text-to-image checkpoint
    #    (`python grader.py m5` already writes it to runs/m5/human_eval/)
    python -m apps.human_eval write --checkpoint runs/m5/checkpoint.pt --out runs/m5/human_eval
    # 2. a person answers "does the image show the prompt's colour, shape and position?"
    python -m apps.human_eval record runs/m5/human_eval            # asks in the terminal
    python -m apps.human_eval record runs/m5/human_eval --answers answers.txt   # y/n per line
    # -> runs/m5/human_eval.json, which `python grader.py m5` reads as the human gate

The folder holds ``sheet.png`` (all images, numbered, prompt under each), ``index.html`` (the
same as a page), ``images/NNN.png`` and ``template.json`` (prompts, image files and the run's
identity: checkpoint hash, seed, guidance, sampler). ``human_eval.json`` repeats that identity,
so a grader run can tell answers about *its* images from stale ones (:mod:`eval.human_eval`
holds the sheet, answer and record logic; this is its command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apps.cli import fail, missing_checkpoint
from eval.human_eval import ask, read_answers, record, sheet_meta, write_sheet

DEFAULT_DIR = Path("runs/m5/human_eval")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apps.human_eval", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="generate the images and write the sheet + template")
    w.add_argument("--checkpoint", default="runs/m5/checkpoint.pt")
    w.add_argument("--out", default=str(DEFAULT_DIR))
    w.add_argument("-n", type=int, default=100, help="number of prompts (test-split world scenes)")
    w.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's recipe value")
    w.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's recipe)")
    w.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("record", help="record a person's yes/no answers")
    r.add_argument("folder", nargs="?", default=str(DEFAULT_DIR))
    r.add_argument("--answers", default=None, help="file with answers (one y/n per line, or JSON); '-' = stdin lines")
    r.add_argument("--out", default=None, help="output JSON (default: FOLDER/../human_eval.json)")
    r.add_argument("--annotator", default="", help="who answered")
    r.add_argument("--show", action="store_true", help="open each image in a window while asking")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "write":
            return _write_cmd(a)
        folder = Path(a.folder)
        if not (folder / "template.json").is_file():
            raise FileNotFoundError(f"no {folder / 'template.json'}: run `python -m apps.human_eval write` "
                                    f"(or `python grader.py m5`) first")
        items = json.loads((folder / "template.json").read_text())["items"]
        if a.answers == "-":
            answers = ask(items, folder, sys.stdin, sys.stderr)
        elif a.answers:
            answers = read_answers(a.answers, len(items))
        else:
            answers = ask(items, folder, show=a.show)
        res = record(folder, answers, a.out, a.annotator)
        print(f"human prompt match {res['human_prompt_match']:.3f} ({res['yes']}/{res['n']}) -> {res['path']}")
        return 0
    except (FileNotFoundError, ValueError, EOFError) as e:
        return fail(str(e))


def _write_cmd(a) -> int:
    from eval.prompt_match import world_prompts
    from mmsys.checkpoint import CheckpointError, sha256_file
    from mmsys.text2image import load_text2image, checkpoint_sampling
    if problem := missing_checkpoint(a.checkpoint, "text-to-image", "m5"):
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
