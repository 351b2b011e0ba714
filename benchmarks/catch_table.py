"""Mutation check of a suite's gates: quantize the tiny model with fp8-e4m3-rowwise, break copies of
the checkpoint and of policies (benchmarks/mutants.py), run every shipped sound policy and every
mutant as candidates of ONE `evals run`, and print which mutants the gates caught.

    python benchmarks/catch_table.py [--suite suites/smoke.yaml] [--out-dir DIR]

Exit status: 0 when every must-fail mutant was caught and every sound policy passed, 1 otherwise
(2 when the run itself broke). A mutant counts as caught by a blocking failed gate that measured
something: a baseline gate that failed only because no baseline exists is listed, marked
"(no baseline)", and catches nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mutants import Mutant, make_mutants

REPO = Path(__file__).resolve().parents[1]
STEP_GATES = ("step_error", "step_cosine", "max_ratio")
SOURCE_POLICY = "fp8-e4m3-rowwise"


def sound_policies(suite: Path) -> tuple[str, ...]:
    """The shipped policies the suite says are sound on its model (its `policies`): each must pass."""
    from evals.suite import load_suite

    return load_suite(suite).policies


@dataclass(frozen=True)
class Row:
    name: str
    """Candidate name: a mutant's or a sound policy's."""
    expect: str
    """fail (a must-fail mutant), pass (a sound policy) or report (a coarser but correct build)."""
    psnr_mean: float
    psnr_min: float
    failed: tuple[str, ...]
    """`subject stat` of each blocking failed gate; `(no baseline)` marks one that measured nothing."""
    caught: bool
    """A blocking gate that measured something failed."""
    mutant: Mutant | None = None
    step_error: float = math.nan
    """Mean step error (teacher-forced) over the samples it finished."""
    named: str = ""
    """The part its step error jumps at (locate.json), for a failed candidate."""

    @property
    def by_step_error(self) -> bool:
        """Failed by a step-error gate (step_error, step_cosine or the layer profile) that measured something."""
        return any(label.split()[0] in STEP_GATES and "(no baseline)" not in label for label in self.failed)

    @property
    def ok(self) -> bool:
        if self.expect == "fail":
            return self.caught
        return self.expect == "report" or not self.failed


def _evals(*args: str, log: Path) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with log.open("a") as out:
        return subprocess.run(
            [sys.executable, "-m", "evals", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def quantize_source(out_dir: Path) -> Path:
    """The tiny model quantized with fp8-e4m3-rowwise by `evals quantize`."""
    path = out_dir / f"{SOURCE_POLICY}.safetensors"
    log = out_dir / "quantize.log"
    if _evals("quantize", SOURCE_POLICY, "--model", "tiny", "--out", str(path), log=log) != 0:
        raise RuntimeError(f"evals quantize failed:\n{_tail(log)}")
    return path


def run_arguments(
    suite: Path, mutants: list[Mutant], runs_dir: Path, cache_dir: Path, fail_fast: bool = False
) -> list[str]:
    args = [
        "run",
        str(suite),
        "--no-mlflow",
        "--no-progress",
        "--runs-dir",
        str(runs_dir),
        "--cache-dir",
        str(cache_dir),
        *(["--fail-fast"] if fail_fast else []),
    ]
    for policy in sound_policies(suite):
        args += ["--policy", policy]
    for m in mutants:
        if m.policy is not None:
            args += ["--policy", str(m.policy)]
        elif m.checkpoint is not None:
            args += ["--candidate-checkpoint", f"{m.name}={m.checkpoint}"]
    return args


def run_suite(suite: Path, mutants: list[Mutant], out_dir: Path, fail_fast: bool = False) -> Path:
    """One `evals run` of every sound policy and mutant; its run directory. With `fail_fast`, each
    mutant stops once a gate of it has failed for good (same verdicts; its figures then cover the
    samples it finished)."""
    runs_dir, log = out_dir / "runs", out_dir / "run.log"
    before = set(runs_dir.glob("*")) if runs_dir.is_dir() else set()
    code = _evals(*run_arguments(suite, mutants, runs_dir, out_dir / "cache", fail_fast), log=log)
    made = sorted(set(runs_dir.glob("*")) - before)
    if code not in (0, 1) or len(made) != 1 or not (made[0] / "verdict.json").is_file():
        raise RuntimeError(f"evals run exited {code} without a verdict ({log}):\n{_tail(log)}")
    return made[0]


def prepare(suite: Path, out_dir: Path, fail_fast: bool = False) -> tuple[list[Mutant], Path]:
    """Quantize, make the mutants, run the suite: (mutants, run directory)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mutants = make_mutants(quantize_source(out_dir), out_dir / "mutants")
    return mutants, run_suite(suite, mutants, out_dir, fail_fast)


def _baseline_gate(result: dict[str, Any]) -> bool:
    return bool(result.get("baseline_gate", "vs baseline" in str(result["gate"])))


def measured(result: dict[str, Any]) -> bool:
    """False for a baseline gate that failed only because there is no baseline (or no baseline layer
    profile) to compare with."""
    from evals.gates import NO_PROFILE

    return not (_baseline_gate(result) and result.get("baseline") is None) and result.get("reason") != NO_PROFILE


def _label(result: dict[str, Any]) -> str:
    """`psnr min`, `psnr mean vs baseline`, `psnr mean vs baseline (no baseline)`."""
    label = f"{result['subject']} {result['stat']}" + (" vs baseline" if _baseline_gate(result) else "")
    return label + ("" if measured(result) else " (no baseline)")


def blocking(verdict: dict[str, Any], candidate: str) -> list[dict[str, Any]]:
    """The candidate's failed gates of severity fail (GateResult.to_dict)."""
    return [r for r in verdict["results"] if r["policy"] == candidate and not r["passed"] and r["severity"] == "fail"]


def read_rows(run_dir: Path, mutants: list[Mutant], sound: tuple[str, ...]) -> list[Row]:
    verdict = json.loads((run_dir / "verdict.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())["policies"]
    located = json.loads((run_dir / "locate.json").read_text()) if (run_dir / "locate.json").is_file() else {}
    gated = {r["policy"] for r in verdict["results"]}
    rows = []
    candidates = [(m.name, "fail" if m.must_fail else "report", m) for m in mutants]
    for name, expect, mutant in [*candidates, *((p, "pass", None) for p in sound)]:
        psnr = summary.get(name, {}).get("metrics", {}).get("psnr", {})
        results = blocking(verdict, name)
        failed = tuple(_label(r) for r in results)
        if name not in gated:
            failed = ("not in verdict.json",)
        caught = name in gated and any(measured(r) for r in results)
        step = summary.get(name, {}).get("metrics", {}).get("step_error", {}).get("mean", math.nan)
        named = located.get(name, {}).get("part", "")
        mean, low = psnr.get("mean", math.nan), psnr.get("min", math.nan)
        rows.append(Row(name, expect, mean, low, failed, caught, mutant, step, named))
    return rows


def _f(value: float) -> str:
    return f"{value:.2f}"


def render(rows: list[Row]) -> str:
    """The Markdown catch table, then the sound policies."""
    lines = [
        "| mutant | layer | kind | position | must fail | step error | PSNR mean | PSNR min | failed gates "
        "| caught | named layer |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        if r.mutant is not None:
            m = r.mutant
            lines.append(
                f"| {m.name} | {m.layer} | {m.kind} | {m.position} | {'yes' if m.must_fail else 'no (report)'} "
                f"| {r.step_error:.4f} | {_f(r.psnr_mean)} | {_f(r.psnr_min)} | {', '.join(r.failed) or '-'} "
                f"| {'yes' if r.caught else 'NO' if m.must_fail else 'no'} | {r.named or '-'} |"
            )
    lines += ["", "| sound policy (must pass) | step error | PSNR mean | PSNR min | failed gates | passed |"]
    lines.append("| --- | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        if r.expect == "pass":
            status = "yes" if r.ok else "NO"
            lines.append(
                f"| {r.name} | {r.step_error:.4f} | {_f(r.psnr_mean)} | {_f(r.psnr_min)} "
                f"| {', '.join(r.failed) or '-'} | {status} |"
            )
    single = [r for r in rows if r.mutant is not None and r.mutant.checkpoint is not None and r.expect == "fail"]
    right = [r for r in single if r.named == r.mutant.layer] if single else []  # type: ignore[union-attr]
    lines += ["", f"single-layer mutants named at the mutated layer: {len(right)} of {len(single)}"]
    return "\n".join(lines)


def problems(rows: list[Row]) -> list[str]:
    missed = [f"must-fail mutant {r.name} passed the gates" for r in rows if r.expect == "fail" and not r.ok]
    return missed + [
        f"sound policy {r.name} failed: {', '.join(r.failed)}" for r in rows if r.expect == "pass" and not r.ok
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--suite", type=Path, default=REPO / "suites" / "smoke.yaml", help="suite YAML")
    parser.add_argument("--out-dir", type=Path, help="where the checkpoint, mutants and run go (default: a temp dir)")
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop each mutant once a gate of it has failed for good (what the tests do; the table then shows "
        "the gates failed on the samples it finished)",
    )
    args = parser.parse_args(argv)
    out_dir = (args.out_dir or Path(tempfile.mkdtemp(prefix="catch-table-"))).resolve()
    start = time.perf_counter()
    try:
        mutants, run_dir = prepare(args.suite.resolve(), out_dir, args.fail_fast)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    rows = read_rows(run_dir, mutants, sound_policies(args.suite.resolve()))
    print(render(rows))
    bad = problems(rows)
    must_fail = [r for r in rows if r.expect == "fail"]
    print(
        f"\ncaught {sum(r.caught for r in must_fail)} of {len(must_fail)} must-fail mutants; "
        f"run {run_dir}; {time.perf_counter() - start:.0f} s"
    )
    for line in bad:
        print(f"FAIL: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
