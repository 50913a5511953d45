"""What a milestone is: acceptance criteria, gates with per-profile thresholds, and a run.

A milestone file (``milestones/m1_vit.py`` ...) reads like its spec. It defines

- ``criteria``: each acceptance criterion and what proves it (a pytest test or a gate);
- ``gates``: the measured numbers that must clear a threshold, and ``thresholds`` — the one
  place per milestone where the numbers live, per profile ("quick" on the embedded world,
  "full" on real data);
- ``recipes``: the training recipe per profile;
- ``interface``: what it needs from an implementation, generated from the seam
  (:mod:`milestones.adapters`, the only module that reaches the code under test);
- ``run(ctx)``: train (or load ``ctx.checkpoint``), evaluate, save figures -> :class:`RunResult`.

The grader (``grader.py``) turns a RunResult into gate verdicts and reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES = ("quick", "full")


@dataclass(frozen=True)
class Gate:
    """A measured metric that must clear a threshold.

    ``key`` names the metric in :attr:`RunResult.metrics`; ``direction`` is ">" (higher is
    better) or "<"; ``description`` says exactly what is measured on what data."""

    key: str
    description: str
    direction: str = ">"

    def passes(self, value: float | None, threshold: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return value > threshold if self.direction == ">" else value < threshold

    def row(self, value: float | None, threshold: float, **extra) -> dict:
        """The report's row for this gate: key, description, value, direction, threshold, passed
        (+ ``extra``, e.g. ``note="not measured"``)."""
        return {"gate": self.key, "description": self.description, "value": value, "direction": self.direction,
                "threshold": threshold, "passed": self.passes(value, threshold), **extra}


@dataclass(frozen=True)
class Criterion:
    """One acceptance criterion and the proof: ``"test:<pytest node>"`` or ``"gate:<key>"``."""

    text: str
    proof: str


@dataclass
class RunContext:
    """Everything a milestone run may depend on; the grader builds it from the command line."""

    profile: str = "quick"
    seed: int = 0
    out_dir: Path = Path("runs/tmp")
    device: str = "cpu"
    data_root: Path | None = None
    checkpoint: Path | None = None
    download: bool = False
    progress: bool = True
    resume: bool = False  # continue from out_dir/checkpoint.pt when it exists (resumable milestones)
    smoke: bool = False  # --smoke: the profile's smoke recipe (tiny models, few steps: proves the path, not quality)
    log_lines: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        self.log_lines.append(msg)

    def path(self, name: str) -> Path:
        """A file in this run's output folder (created on demand)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name


@dataclass
class RunResult:
    """What a milestone run measured and made.

    metrics: gate keys (and any other numbers) -> value.
    info: anything else an auditor wants (temperature, probes, FID protocol, timings ...).
    datasets: :meth:`DataSplit.summary` of every split used (identity, counts, hashes).
    checkpoint: path of the checkpoint evaluated (the grader hashes it).
    config: resolved training recipe and model configuration.
    figures: paths of PNG figures written.
    """

    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    datasets: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)


class Milestone:
    """Base class; subclasses fill in the class attributes and :meth:`run`."""

    id: str = ""
    title: str = ""
    marker: str = ""  # pytest marker selecting this milestone's shape tests
    test_files: tuple[str, ...] = ()
    criteria: tuple[Criterion, ...] = ()
    gates: tuple[Gate, ...] = ()
    thresholds: dict[str, dict[str, float]] = {}
    recipes: dict[str, Any] = {}
    data_needed: dict[str, str] = {}  # profile -> what data it needs and where to get it
    resumable: bool = False  # True: run() honours ctx.resume (training checkpoints and resumes exactly)
    checkpoint_kind: str = ""  # the ``kind`` of the checkpoint run() writes and ``--checkpoint`` must have

    smoke_recipes: dict[str, Any] = {}  # profile -> the recipe ``--smoke`` runs instead

    @property
    def interface(self) -> str:
        """What this milestone needs from an implementation, generated from the seam."""
        from milestones.adapters import interface
        return interface(self.id)

    def recipe(self, ctx: RunContext):
        """The recipe of ``ctx.profile``, or its smoke recipe with ``ctx.smoke``."""
        if ctx.smoke:
            if ctx.profile not in self.smoke_recipes:
                raise ValueError(f"{self.id} has no smoke recipe for the {ctx.profile} profile")
            return self.smoke_recipes[ctx.profile]
        return self.recipes[ctx.profile]

    def run(self, ctx: RunContext) -> RunResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def verdicts(self, result: RunResult, profile: str) -> list[dict]:
        """One row per gate: key, description, value, threshold, direction, passed."""
        return [gate.row(result.metrics.get(gate.key), self.thresholds[profile][gate.key]) for gate in self.gates]
