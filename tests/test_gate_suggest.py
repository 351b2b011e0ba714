"""`evals gates suggest`: thresholds from synthetic runs of known distributions, checked against
values computed here independently, loaded through the suite loader and evaluated by evals.gates."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from evals.cli import main
from evals.gate_suggest import NOISE_FLOOR_NAME, lenient, parse_margin, render, suggest
from evals.gates import evaluate_gates
from evals.records import RecordsWriter, SampleRecord, summarize, summary_to_json
from evals.rundir import write_json
from evals.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
STEP = 0.5  # PSNR values of a policy: base, base + STEP, ... (10 distinct values, repeated)


def values(base: float, step: float, n: int) -> list[float]:
    return [base + (i % 10) * step for i in range(n)]


def policy_records(
    policy: str, n: int, psnr: float, ssim: float, lpips: float, delta: float, flags: dict[str, set[int]] | None = None
) -> list[SampleRecord]:
    """n samples of known metric distributions; `flags`: detector -> sample indices flagged on the candidate."""
    ps, ss, ls, ds = values(psnr, STEP, n), values(ssim, 0.002, n), values(lpips, 0.004, n), values(delta, 0.04, n)
    out = []
    for i in range(n):
        case, seed = f"case-{i // 2}", i % 2
        ref_flags = {"black_frame": False, "nonfinite": i == 0}  # sample 0's reference is flagged by nonfinite
        cand = {d: (i in (flags or {}).get(d, set())) or (d == "nonfinite" and i == 0) for d in ref_flags}
        out.append(
            SampleRecord(
                policy=policy,
                sample_id=f"{case}-s{seed}",
                case_id=case,
                prompt=f"prompt {i // 2}",
                seed=seed,
                tags=("dark",) if i % 4 < 2 else ("day",),
                metrics={
                    "psnr": ps[i],
                    "ssim": ss[i],
                    "lpips": ls[i],
                    "clip_score": 30.0 + ds[i],
                    "clip_score_ref": 30.0,
                    "clip_score_delta": ds[i],
                },
                detectors={d: {"flagged": f, "score": float(f), "reason": ""} for d, f in cand.items()},
                reference_detectors={d: {"flagged": f, "score": float(f), "reason": ""} for d, f in ref_flags.items()},
                image=f"images/{policy}/{case}-s{seed}.png",
                reference_image=f"images/ref/{case}-s{seed}.png",
                seconds_per_image=0.1,
            )
        )
    return out


def trusted_records(n: int = 20, noise_floor: bool = True, b_flags: dict[str, set[int]] | None = None) -> list:
    recs = policy_records("fp8-a", n, psnr=30.0, ssim=0.95, lpips=0.05, delta=-0.2)
    recs += policy_records("fp8-b", n, psnr=28.0, ssim=0.93, lpips=0.08, delta=-0.4, flags=b_flags)
    if noise_floor:
        recs += policy_records(NOISE_FLOOR_NAME, n, psnr=45.0, ssim=0.995, lpips=0.001, delta=-0.01)
    return recs


def write_run(run_dir: Path, records: list[SampleRecord]) -> Path:
    """A run directory written as the runner writes one: run.json, records.jsonl, summary.json."""
    run_dir.mkdir(parents=True)
    names = list(dict.fromkeys(r.policy for r in records))
    write_json(
        run_dir / "run.json",
        {
            "suite": {"name": "synthetic", "path": "suite.yaml", "sha256": "0"},
            "reference_dtype": "bfloat16",
            "environment": {"device": "cuda:0"},
            "policies": [{"name": p, "noise_floor": "batch" if p == NOISE_FLOOR_NAME else None} for p in names],
        },
    )
    with RecordsWriter(run_dir / "records.jsonl") as writer:
        for record in records:
            writer.write(record)
    (run_dir / "summary.json").write_text(summary_to_json(summarize(records)) + "\n")
    return run_dir


SUITE_HEAD = """name: synthetic
generation: {height: 16, width: 16, steps: 1, guidance: 1.0, batch_size: 2}
seeds: [0, 1]
cases:
  - {id: case-0, prompt: "a prompt", tags: [dark]}
  - {id: case-1, prompt: "another prompt", tags: [day]}
metrics: [psnr, ssim, lpips, clip_score]
detectors: [black_frame, nonfinite]
"""


def run_cli(*argv: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["gates", "suggest", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gates_of(text: str) -> dict[tuple[str, str, bool], dict[str, Any]]:
    """(subject, stat, is baseline gate) -> gate mapping."""
    out = {}
    for g in yaml.safe_load(text)["gates"]:
        out[(g.get("metric") or g["detector"], g["stat"], "baseline" in g)] = g
    return out


def assert_lenient(actual: float, expected: float, higher_is_better: bool) -> None:
    """Rounded toward leniency, to 4 significant digits."""
    assert (actual <= expected) if higher_is_better else (actual >= expected)
    assert actual == pytest.approx(expected, rel=1e-3)


def test_default_gates_match_independent_math(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", trusted_records(n=20))
    code, out, _ = run_cli(run_dir, capsys=capsys)
    assert code == 0
    gates = gates_of(out)
    worst_b = {
        "psnr": values(28.0, STEP, 20),
        "ssim": values(0.93, 0.002, 20),
        "lpips": values(0.08, 0.004, 20),
        "clip_score_delta": values(-0.4, 0.04, 20),
    }  # fp8-b is the worse candidate on every metric
    margins = {"psnr": 1.0, "ssim": 0.01, "lpips": 0.01, "clip_score_delta": 0.5}
    for name, vals in worst_b.items():
        higher = name != "lpips"
        sign, tail = (-1, "min") if higher else (1, "max")  # 20 < 40 samples: min/max, not p05/p95
        mean_gate, tail_gate = gates[(name, "mean", False)], gates[(name, tail, False)]
        assert mean_gate["op"] == tail_gate["op"] == (">=" if higher else "<=")
        assert_lenient(mean_gate["value"], statistics.fmean(vals) + sign * margins[name], higher)
        assert_lenient(tail_gate["value"], (min(vals) if higher else max(vals)) + sign * margins[name], higher)
    assert ("clip_score", "mean", False) not in gates and ("clip_score_ref", "mean", False) not in gates
    assert gates[("psnr", "mean", True)]["baseline"] == {"max_drop": 1.0}
    assert gates[("ssim", "mean", True)]["baseline"] == {"max_drop": 0.01}
    assert ("lpips", "mean", True) not in gates
    assert gates[("black_frame", "new_count", False)] == {
        "detector": "black_frame",
        "stat": "new_count",
        "op": "==",
        "value": 0,
    }
    # nonfinite flags sample 0 in the reference and in every candidate: count 1, new_count 0
    assert gates[("nonfinite", "new_count", False)]["value"] == 0
    assert "fp8-a new_count 0 (count 1)" in out and "reference images flagged: 1 of 20" in out
    # the evidence: per-policy distributions and the noise floor, above the gates
    assert "fp8-b (n=20): mean 30.25 min 28" in out and "noise-floor (reference vs itself) (n=20)" in out
    assert "margin 1 (default: 1 dB" in out


def test_p05_p95_from_40_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", trusted_records(n=40))
    gates = gates_of(run_cli(run_dir, capsys=capsys)[1])
    psnr = values(28.0, STEP, 40)
    lpips = values(0.08, 0.004, 40)
    assert_lenient(gates[("psnr", "p05", False)]["value"], float(np.percentile(psnr, 5)) - 1.0, True)
    assert_lenient(gates[("lpips", "p95", False)]["value"], float(np.percentile(lpips, 95)) + 0.01, False)
    assert ("psnr", "min", False) not in gates


def test_margins_absolute_and_relative(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", trusted_records(n=20))
    code, out, _ = run_cli(
        run_dir, "--margin", "psnr=2.5", "--margin", "lpips=10%", "--margin", "ssim=1%", capsys=capsys
    )
    assert code == 0
    gates = gates_of(out)
    assert_lenient(gates[("psnr", "mean", False)]["value"], 30.25 - 2.5, True)
    lpips_mean = statistics.fmean(values(0.08, 0.004, 20))
    assert_lenient(gates[("lpips", "mean", False)]["value"], lpips_mean * 1.10, False)
    assert gates[("psnr", "mean", True)]["baseline"] == {"max_drop": 2.5}
    assert gates[("ssim", "mean", True)]["baseline"] == {"max_rel_drop": 0.01}
    assert "margin 2.5 (--margin)" in out and "margin 10% of the value (--margin)" in out


def test_policy_option_trusts_only_that_candidate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", trusted_records(n=20))
    gates = gates_of(run_cli(run_dir, "--policy", "fp8-a", capsys=capsys)[1])
    assert_lenient(gates[("psnr", "mean", False)]["value"], statistics.fmean(values(30.0, STEP, 20)) - 1.0, True)


def test_output_loads_and_passes_on_the_trusted_run_and_fails_on_a_degraded_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = trusted_records(n=20, b_flags={"black_frame": {3}})
    run_dir = write_run(tmp_path / "run", records)
    code, out, _ = run_cli(run_dir, capsys=capsys)
    assert code == 0
    suite = load_suite(_write(tmp_path / "suite.yaml", SUITE_HEAD + out))
    assert (
        len(suite.gates) == len(yaml.safe_load(out)["gates"]) == 12
    )  # 4 metrics x (mean, tail), 2 baseline, 2 detectors
    policies = ["fp8-a", "fp8-b"]
    trusted = summarize(records)
    baselines = {p: trusted[p].flat() for p in policies}
    verdict = evaluate_gates(trusted, suite.gates, policies, records=records, baselines=baselines)
    assert verdict.passed, [r.reason for r in verdict.results if not r.passed]

    def worse(r: SampleRecord) -> SampleRecord:
        m = dict(r.metrics)
        # worse than the worst trusted candidate by more than the gap between the two plus the margin
        m.update(psnr=m["psnr"] - 5, ssim=m["ssim"] - 0.05, lpips=m["lpips"] + 0.05)
        m.update(clip_score_delta=m["clip_score_delta"] - 1, clip_score=m["clip_score"] - 1)
        flags = {d: dict(f, flagged=True) for d, f in r.detectors.items()}  # every image flagged
        return replace(r, metrics=m, detectors=flags)

    degraded = [worse(r) for r in records]
    verdict = evaluate_gates(summarize(degraded), suite.gates, policies, records=degraded, baselines=baselines)
    assert [r.gate.describe() for r in verdict.results if r.passed] == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_trusted_run_with_new_detector_flags_gets_the_observed_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run(tmp_path / "run", trusted_records(n=20, b_flags={"black_frame": {3, 5}}))
    code, out, err = run_cli(run_dir, capsys=capsys)
    assert code == 0
    assert gates_of(out)[("black_frame", "new_count", False)] == {
        "detector": "black_frame",
        "stat": "new_count",
        "op": "<=",
        "value": 2,
    }
    assert "WARNING: the trusted run itself has new black_frame flags (fp8-b: case-1-s1, case-2-s1)" in out
    assert "warning: the trusted run itself has new black_frame flags" in err


def test_noise_floor_refuses_a_stricter_threshold_and_warns_within_its_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the candidate is closer to the reference than the reference is to itself under a harmless change
    recs = policy_records("fp8-a", 20, psnr=50.0, ssim=0.95, lpips=0.05, delta=-0.2)
    recs += policy_records(NOISE_FLOOR_NAME, 20, psnr=40.0, ssim=0.99, lpips=0.01, delta=0.0)
    code, out, err = run_cli(write_run(tmp_path / "run", recs), capsys=capsys)
    assert code == 0
    gates = gates_of(out)
    nf = values(40.0, STEP, 20)
    # not 52.25 - 1 (the candidate's mean minus the margin): the noise floor's mean minus the margin
    assert_lenient(gates[("psnr", "mean", False)]["value"], statistics.fmean(nf) - 1.0, True)
    assert_lenient(gates[("psnr", "min", False)]["value"], min(nf) - 1.0, True)
    assert "the noise floor's mean 42.25 would not pass >= 51.25 with the margin; threshold set to 41.25" in out
    assert "lies within the noise floor's per-sample spread [40, 44.5]" in out  # 41.25 is inside
    assert "would not pass" in err
    # ssim: the candidate (0.95..) is far below the noise floor (0.99..): neither clamped nor warned about
    ssim_comments = out.split("# ssim (")[1].split("# lpips (")[0]
    assert "WARNING" not in ssim_comments


def test_no_noise_floor_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(write_run(tmp_path / "run", trusted_records(noise_floor=False)), capsys=capsys)
    assert code == 0 and "no noise floor: thresholds not checked against arithmetic noise" in out


def test_out_writes_refuses_to_overwrite_and_force_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", trusted_records())
    out = tmp_path / "gates" / "suggested.yaml"
    code, stdout, err = run_cli(run_dir, "--out", out, capsys=capsys)
    assert code == 0 and stdout == "" and f"written: {out}" in err
    first = out.read_text()
    assert yaml.safe_load(first)["gates"]
    code, _, err = run_cli(run_dir, "--out", out, "--margin", "psnr=3", capsys=capsys)
    assert code == 2 and "already exists" in err and out.read_text() == first
    code, _, _ = run_cli(run_dir, "--out", out, "--margin", "psnr=3", "--force", capsys=capsys)
    assert code == 0 and out.read_text() != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["suggested.yaml"]  # no temporary file left


def _only_noise_floor(run_dir: Path) -> None:
    write_run(run_dir, policy_records(NOISE_FLOOR_NAME, 4, 40.0, 0.99, 0.01, 0.0))


def _garbage_records(run_dir: Path) -> None:
    write_run(run_dir, trusted_records())
    with (run_dir / "records.jsonl").open("a") as f:
        f.write("{not json\n")


def _unfinished(run_dir: Path) -> None:
    write_run(run_dir, trusted_records())
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["policies"]["fp8-a"]["n"] = 3
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize(
    ("make", "argv", "expected"),
    [
        (lambda d: None, [], "no such directory"),
        (lambda d: write_run(d, []), [], "records.jsonl: no records"),
        (_only_noise_floor, [], "only the noise floor was scored"),
        (_garbage_records, [], "records.jsonl: cannot read it"),
        (lambda d: (write_run(d, trusted_records()), (d / "summary.json").unlink()), [], "summary.json: missing"),
        (lambda d: (write_run(d, trusted_records()), (d / "run.json").write_text("[")), [], "run.json: cannot read"),
        (_unfinished, [], "expected a finished run"),
        (lambda d: write_run(d, trusted_records()), ["--policy", "fp8-z"], "--policy fp8-z: not a candidate"),
        (lambda d: write_run(d, trusted_records()), ["--policy", NOISE_FLOOR_NAME], "the noise floor is evidence"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, argv: list[str], expected: str
) -> None:
    run_dir = tmp_path / "run"
    make(run_dir)
    out = tmp_path / "out.yaml"
    code, stdout, err = run_cli(run_dir, "--out", out, *argv, capsys=capsys)
    assert code == 2 and expected in err and stdout == ""
    assert not out.exists()


def test_bad_margin_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path / "run", trusted_records())
    for bad in ("psnx=1", "psnr", "psnr=-1", "psnr=abc"):
        with pytest.raises(SystemExit) as exc:
            main(["gates", "suggest", str(run_dir), "--margin", bad])
        assert exc.value.code == 2
    assert "did you mean 'psnr'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="finite number >= 0"):
        parse_margin("ssim=nan")


def test_lenient_rounding() -> None:
    assert lenient(27.43219, True) == 27.43 and lenient(27.43219, False) == 27.44
    assert lenient(0.098765, False) == 0.09877 and lenient(-0.61234, True) == -0.6124
    assert lenient(30.0, True) == 30.0 and lenient(0.0, True) == 0.0


def test_non_finite_and_nan_values_get_no_gate() -> None:
    recs = trusted_records(noise_floor=False)
    recs[0] = replace(recs[0], metrics=dict(recs[0].metrics, psnr=float("inf")))  # fp8-a: one identical image
    recs[-1] = replace(recs[-1], metrics=dict(recs[-1].metrics, ssim=float("nan")))  # fp8-b: one broken sample
    text = render(suggest(recs, ["fp8-a", "fp8-b"]))
    gates = gates_of(text)
    assert ("psnr", "mean", False) in gates  # the worst mean (fp8-b's) is finite
    assert ("ssim", "mean", False) not in gates and ("ssim", "min", False) not in gates
    assert "ssim mean is NaN for fp8-b" in text
    assert "no gate: a non-finite ssim mean" in text
    only_a = render(suggest(recs, ["fp8-a"]))
    assert ("psnr", "mean", False) not in gates_of(only_a) and "worst trusted value is inf" in only_a
    assert "inf" not in "".join(line for line in only_a.splitlines() if not line.lstrip().startswith("#"))


def test_noise_floor_name_matches_the_candidates_module() -> None:
    from evals.candidates import NOISE_FLOOR

    assert NOISE_FLOOR == NOISE_FLOOR_NAME


def test_importing_the_modules_imports_no_torch() -> None:
    code = "import sys, evals.gate_suggest, evals.cli_gates; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_step_error_gets_gates_of_its_own_direction_and_a_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lower step error is better, higher cosine is: each gets the direction of its own; the mean of
    step error gets a 2% relative regression gate against the baseline."""
    records = []
    for r in trusted_records(n=20, noise_floor=False):
        i = int(r.sample_id.split("-")[1]) * 2 + r.seed
        error, cosine = 0.16 + 0.001 * (i % 10), 0.99 - 0.0001 * (i % 10)
        records.append(replace(r, metrics={**r.metrics, "step_error": error, "step_cosine": cosine}))
    run_dir = write_run(tmp_path / "run", records)
    code, out, _ = run_cli(run_dir, capsys=capsys)
    assert code == 0
    gates = gates_of(out)
    mean = statistics.fmean(0.16 + 0.001 * (i % 10) for i in range(20))
    assert_lenient(gates[("step_error", "mean", False)]["value"], mean * 1.02, False)
    assert gates[("step_error", "mean", False)]["op"] == "<="
    assert gates[("step_cosine", "mean", False)]["op"] == ">="
    assert gates[("step_error", "mean", True)]["baseline"] == {"max_rel_drop": 0.02}
