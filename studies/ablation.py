"""What every ablation study shares: each setting trained in its own process (one torch thread),
then one JSON record, one Markdown table and one plot written from the settings' rows.

A study supplies its knobs (``{knob: [values]}``), a ``run_setting((knob, value, seed)) -> row``
function importable at module level (the settings run in spawned processes) and its columns;
:func:`main` does the rest. ``studies/ssl_ablations.py`` (m7's SimCLR / MoCo) and
``studies/clip_ablations.py`` (m2's CLIP) are the two studies.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from studies.common import add_common_args, check_common_args, provenance


@dataclass(frozen=True)
class Column:
    """One table column: its header and how a row's value is shown."""

    header: str
    show: Callable[[dict], str]


def metric(key: str, header: str, digits: int = 4) -> Column:
    """A column showing ``row[key]`` with ``digits`` decimals."""
    return Column(header, lambda r: f"{r[key]:.{digits}f}")


STEPS_X_BATCH = Column("steps x batch", lambda r: f"{r['steps']} x {r['batch_size']}")
FINAL_LOSS = Column("final loss", lambda r: f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-")
TRAIN_WALL = Column("training wall", lambda r: f"{r['train_wall_s']:.0f} s")


@dataclass(frozen=True)
class Study:
    """An ablation study: what it varies and how each setting is trained, scored and shown.

    ``plotted`` are ``(row key, label)`` pairs drawn against the settings; ``intro(record)`` is the
    sentence after the command line (what was held fixed, which split scored it), ``footer`` the
    last paragraph (how much of a difference is noise)."""

    name: str  # e.g. "m7": the table's title is "<name> ablation: <knob>"
    module: str  # the command is ``python -m <module> KNOB ...``
    description: str  # the command's --help line
    knobs: dict[str, list]
    run_setting: Callable[[tuple], dict]
    columns: list[Column]
    plotted: list[tuple[str, str]]
    ylabel: str
    intro: Callable[[dict], str]
    footer: str
    default_out: Path


def at_batch(recipe, batch_size: int):
    """``recipe`` (a milestone recipe dataclass) at another batch size with the steps and warm-up
    scaled so that it sees as many items as before: the batch-size ablations' comparison."""
    return replace(recipe, batch_size=batch_size, steps=recipe.steps * recipe.batch_size // batch_size,
                   warmup_steps=recipe.warmup_steps * recipe.batch_size // batch_size)


def run_all(study: Study, knob: str, seed: int, jobs: int) -> list[dict]:
    """One row per value of ``knob`` (in the knob's order), ``jobs`` settings at a time (spawned
    processes); a line is printed as each setting finishes."""
    settings = [(knob, value, seed) for value in study.knobs[knob]]
    t0, rows = time.perf_counter(), []

    def done(row: dict) -> dict:
        rows.append(row)
        print(f"[{len(rows)}/{len(settings)}] {knob} {row['setting']} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        return row
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            return [done(r) for r in pool.imap(study.run_setting, settings)]
    return [done(study.run_setting(s)) for s in settings]


def plot(study: Study, knob: str, rows: list[dict], path: Path) -> None:
    """The plotted metrics against the settings (one line each), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    for key, label in study.plotted:
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xticks(list(xs), [r["setting"] for r in rows], rotation=20)
    ax.set_xlabel(knob)
    ax.set_ylabel(study.ylabel)
    ax.legend()
    ax.set_title(f"{study.name} quick recipe, {knob} varied (one seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(study: Study, knob: str, record: dict) -> list[str]:
    """The Markdown report: title, provenance sentence, one row per setting, footer."""
    cols = [Column("setting", lambda r: r["setting"]), *study.columns]
    lines = [f"# {study.name} ablation: {knob}", "",
             f"`{record['command']}` at `{record['commit']}`{' (dirty)' if record['dirty'] else ''}, {record['cpu']}, "
             f"one torch thread per setting, {record['jobs']} at a time, {record['wall_s']:.0f} s in all. "
             + study.intro(record),
             "", "| " + " | ".join(c.header for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.show(r) for c in cols) + " |" for r in record["rows"]]
    return lines + ["", f"Plot: `{knob}.png`. " + study.footer]


def main(study: Study, argv=None) -> int:
    """The command line of ``study``: ``python -m <module> KNOB [--jobs N] [--seed S] [--out DIR]``."""
    p = argparse.ArgumentParser(prog=f"python -m {study.module}", description=study.description)
    p.add_argument("knob", choices=sorted(study.knobs))
    add_common_args(p, study.default_out)
    a = p.parse_args(argv)
    check_common_args(p, a)
    record = {"knob": a.knob, **provenance(study.module, argv, a)}
    t0 = time.perf_counter()
    rows = run_all(study, a.knob, a.seed, a.jobs)
    record.update(wall_s=time.perf_counter() - t0, rows=rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.knob}.json").write_text(json.dumps(record, indent=2))
    plot(study, a.knob, rows, a.out / f"{a.knob}.png")
    lines = table(study, a.knob, record)
    (a.out / f"{a.knob}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
