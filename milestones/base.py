"""What a milestone is: acceptance criteria, gates with per-profile thresholds, and a run.

A milestone file (``milestones/m1_vit.py`` ...) reads like its spec. It defines

- ``criteria``: each acceptance criterion and what proves it (a pytest test or a gate);
- ``gates``: the measured numbers that must clear a threshold, and ``thresholds`` — the one
  place per milestone where the numbers live, per profile ("quick" on the embedded world,
  "full" on real data);
- ``controls``: models that must *fail* the gates (an untrained model, shuffled labels, a
  constant output ...), measured in every run with the gates' own protocol: a control that
  clears its gate makes the grade fail, because that gate cannot fail;
- ``pitfalls``: the spec's known mistakes and the measured symptom that betrays each, named in
  the report beside a failing gate;
- ``recipes``: the training recipe per profile;
- ``interface``: what it needs from an implementation, generated from the seam
  (:mod:`milestones.adapters`, the only module that reaches the code under test);
- ``run(ctx)``: train (or load ``ctx.checkpoint``), evaluate, save figures -> :class:`RunResult`.

The grader (``grader.py``) turns a RunResult into gate verdicts and reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

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

    def row(self, value: float | None, threshold: float, pending: str | None = None, **extra) -> dict:
        """The report's row for this gate: key, description, value, direction, threshold, passed,
        status ("pass", "fail", "pending" or "not measured") (+ ``extra``, e.g. ``note=...``).
        ``pending`` (why, e.g. "no answers recorded") marks a gate that waits for a person: it
        neither passes nor fails until measured (``grader.py --require-human`` fails it)."""
        passed = pending is None and self.passes(value, threshold)
        status = "pending" if pending else "pass" if passed else "not measured" if value is None else "fail"
        row = {"gate": self.key, "description": self.description, "value": value, "direction": self.direction,
               "threshold": threshold, "passed": passed, "status": status, **extra}
        if pending:
            row["pending"] = pending
        return row


@dataclass(frozen=True)
class Control:
    """A model that must NOT clear ``gates``: measured in every run with the gates' own protocol
    (a reduced sample size is fine, and ``description`` says so). If it clears one, that gate
    cannot fail and the grade fails."""

    name: str  # e.g. "untrained model"
    description: str  # what exactly was measured
    gates: tuple[str, ...]

    def rows(self, values: dict[str, float], gates: dict[str, Gate], thresholds: dict[str, float]) -> list[dict]:
        """One report row per gate: the control's value, the gate's threshold, ``cleared`` (it
        passed the gate: a defect) and ``passed`` (measured and failed the gate, as it must)."""
        out = []
        for key in self.gates:
            value = values.get(key)
            cleared = gates[key].passes(value, thresholds[key])
            out.append({"control": self.name, "description": self.description, "gate": key, "value": value,
                        "direction": gates[key].direction, "threshold": thresholds[key], "cleared": cleared,
                        "passed": value is not None and not cleared,
                        "status": "not measured" if value is None else "cleared the gate" if cleared else "fails, as it must"})
        return out


@dataclass(frozen=True)
class Pitfall:
    """A known way to get the spec wrong, and the measured symptom that betrays it.

    ``symptom`` names a number in :attr:`RunResult.symptoms`; ``holds(value)`` says whether it
    shows the pitfall; ``explain`` (formatted with ``value``) is the report's sentence beside a
    failing gate among ``gates``."""

    name: str  # e.g. "temperature at its clamp"
    gates: tuple[str, ...]
    symptom: str
    holds: Callable[[float], bool]
    explain: str

    def diagnose(self, symptoms: dict[str, float]) -> dict | None:
        value = symptoms.get(self.symptom)
        if value is None or (isinstance(value, float) and math.isnan(value)) or not self.holds(value):
            return None
        return {"pitfall": self.name, "symptom": self.symptom, "value": value, "explain": self.explain.format(value=value)}


@dataclass(frozen=True)
class Criterion:
    """One acceptance criterion and the proof: ``"test:<pytest node>"`` or ``"gate:<key>"``."""

    text: str
    proof: str


TEST_SPLITS = ("test", "heldout")  # the world splits gates are measured on


BF16_FIELDS = ("bf16", "sample_bf16")  # the recipe switches that ask for bf16 (training, sampling)
PRECISIONS = ("auto", "float32")  # --precision: bf16 where asked for and native / never bf16


def float32_recipe(recipe):
    """``recipe`` with every bf16 switch off (:data:`BF16_FIELDS`), in nested recipe dataclasses
    too (m6's CLIP): ``--precision float32``. Other recipes are returned as they are."""
    if not is_dataclass(recipe):
        return recipe
    changes = {f.name: False for f in fields(recipe) if f.name in BF16_FIELDS}
    changes.update({f.name: float32_recipe(v) for f in fields(recipe)
                    if is_dataclass(v := getattr(recipe, f.name)) and not isinstance(v, type)})
    return replace(recipe, **changes)


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
    world_seed: int = 0  # --world-seed: the embedded world's seed (every split of it; calibration varies it)
    # the seed of the world's test splits (test, heldout): world_seed unless --hidden-seed drew one
    # for this run, revealed only in the report (a candidate cannot regenerate the test split)
    test_world_seed: int | None = None
    progress: bool = True
    resume: bool = False  # continue from out_dir/checkpoint.pt when it exists (resumable milestones)
    smoke: bool = False  # --smoke: the profile's smoke recipe (tiny models, few steps: proves the path, not quality)
    precision: str = "auto"  # --precision: "auto" (bf16 where asked for and native) or "float32" (never bf16)
    log_lines: list[str] = field(default_factory=list)

    def split_world_seed(self, split: str) -> int:
        """The world seed ``split`` is drawn from: :attr:`test_world_seed` for the test splits
        ("test", "heldout"), :attr:`world_seed` for the rest."""
        if split in TEST_SPLITS and self.test_world_seed is not None:
            return self.test_world_seed
        return self.world_seed

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
    controls: control name -> {gate key: value}, each measured with that gate's protocol.
    symptoms: numbers the pitfalls read (temperature, attention entropy, loss ratios ...).
    validation: what recipes are chosen on (:func:`eval.validation.record`): the numbers on a
        validation split carved from training data, never the test split; empty when the
        profile has none (the report says so).
    """

    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    datasets: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    controls: dict[str, dict[str, float]] = field(default_factory=dict)
    symptoms: dict[str, float] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)


class Milestone:
    """Base class; subclasses fill in the class attributes and :meth:`run`."""

    id: str = ""
    title: str = ""
    marker: str = ""  # pytest marker selecting this milestone's shape tests
    test_files: tuple[str, ...] = ()
    criteria: tuple[Criterion, ...] = ()
    gates: tuple[Gate, ...] = ()
    controls: tuple[Control, ...] = ()  # every gate has at least one (tests/test_grader.py checks)
    pitfalls: tuple[Pitfall, ...] = ()
    thresholds: dict[str, dict[str, float]] = {}
    points: dict[str, float] = {}  # gate key -> points in a course platform's score (grader.gradescope)
    hidden_gates: tuple[str, ...] = ()  # gates whose threshold and protocol public feedback leaves out
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
        """The recipe of ``ctx.profile``, or its smoke recipe with ``ctx.smoke``; every bf16
        switch off with ``ctx.precision == "float32"`` (:func:`float32_recipe`)."""
        if ctx.smoke:
            if ctx.profile not in self.smoke_recipes:
                raise ValueError(f"{self.id} has no smoke recipe for the {ctx.profile} profile")
            recipe = self.smoke_recipes[ctx.profile]
        else:
            recipe = self.recipes[ctx.profile]
        return float32_recipe(recipe) if ctx.precision == "float32" else recipe

    def run(self, ctx: RunContext) -> RunResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def verdicts(self, result: RunResult, profile: str) -> list[dict]:
        """One row per gate: key, description, value, threshold, direction, passed, status."""
        return [gate.row(result.metrics.get(gate.key), self.thresholds[profile][gate.key]) for gate in self.gates]

    def control_rows(self, result: RunResult, profile: str) -> list[dict]:
        """One row per (control, gate): each must be measured and fail the gate."""
        gates = {g.key: g for g in self.all_gates()}
        return [row for c in self.controls
                for row in c.rows(result.controls.get(c.name, {}), gates, self.thresholds[profile])]

    def all_gates(self) -> tuple[Gate, ...]:
        """Every gate a report may carry (subclasses add gates measured only sometimes)."""
        return self.gates

    def diagnose(self, rows: list[dict], result: RunResult) -> None:
        """Add ``likely_pitfalls`` to each failed gate row: the pitfalls of that gate whose
        symptom ``result.symptoms`` shows."""
        for row in rows:
            if row["status"] == "fail":
                found = [d for p in self.pitfalls if row["gate"] in p.gates
                         for d in [p.diagnose(result.symptoms)] if d]
                if found:
                    row["likely_pitfalls"] = found
