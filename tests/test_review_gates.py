"""Human gates: parsed from a suite, shown as not evaluated by `evals run`, judged by `evals review
--gate` on the votes (too few fail, saying how many are missing), in the reports, review.json and
MLflow; bad votes files are refused naming file and line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from evals.cli import main
from evals.review.votes import REVIEWS_FILE, Vote, VotesWriter
from tests.conftest import TEST_SUITES, write

HUMAN_GATE = '  - {human: indistinguishable_rate, op: ">=", value: 0.9, min_votes: 50}\n'
CANDIDATE = "fp8-e4m3-rowwise"


@pytest.fixture(scope="module")
def reviewed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished light smoke run whose suite has a human gate, logged to its own MLflow store."""
    home = tmp_path_factory.mktemp("review")
    suite = write(home / "smoke.yaml", (TEST_SUITES / "smoke.yaml").read_text() + HUMAN_GATE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        patch.setenv("EVALS_CACHE_DIR", str(home / "cache"))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        assert main(["run", str(suite), "--no-progress"]) == 0  # the human gate does not fail a run
    (run_dir,) = (home / "runs").iterdir()
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name, symlinks=True))


def vote(reviewer: str, answer_for: str, n: int, seed: int = 0) -> list[Vote]:
    """`n` votes of a scripted reviewer: `right` picks the reference's side, `wrong` the other,
    `cant_tell` never picks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        side = rng.choice(("left", "right"))
        answer = {"right": side, "wrong": "left" if side == "right" else "right", "cant_tell": "cant_tell"}[answer_for]
        out.append(Vote(reviewer, CANDIDATE, f"red-cube-s{i % 2}", side, answer, 1.5, i))
    return out


def add_votes(run_dir: Path, votes: list[Vote]) -> None:
    with VotesWriter(run_dir / REVIEWS_FILE) as writer:
        for v in votes:
            writer.write(v)


def test_evals_run_leaves_a_human_gate_to_the_review(reviewed_run: Path) -> None:
    verdict = json.loads((reviewed_run / "verdict.json").read_text())
    (human,) = [r for r in verdict["results"] if r["human_gate"]]
    assert human["status"] == "not evaluated" and "evals review --gate" in human["reason"] and verdict["passed"]


def test_too_few_votes_fail_the_gate_saying_how_many_are_missing(
    reviewed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = copy_of(reviewed_run, tmp_path)
    add_votes(run_dir, vote("ann", "cant_tell", 10))
    assert main(["review", str(run_dir), "--gate"]) == 1
    out = capsys.readouterr().out
    assert "10 votes for fp8-e4m3-rowwise, 50 needed: 40 more" in out and "FAILED" in out


@pytest.mark.parametrize(("answers", "rate", "code"), [("cant_tell", 1.0, 0), ("right", 0.0, 1), ("wrong", 1.0, 0)])
def test_scripted_reviewers_decide_the_gate(
    reviewed_run: Path, tmp_path: Path, answers: str, rate: float, code: int
) -> None:
    run_dir = copy_of(reviewed_run, tmp_path)
    add_votes(run_dir, vote("ann", answers, 30) + vote("bob", answers, 30, seed=1))
    assert main(["review", str(run_dir), "--gate"]) == code
    verdict = json.loads((run_dir / "verdict.json").read_text())
    (human,) = [r for r in verdict["results"] if r["human_gate"]]
    assert human["actual"] == rate and verdict["passed"] is (code == 0)
    review = json.loads((run_dir / "review.json").read_text())["candidates"][CANDIDATE]
    assert review["overall"]["votes"] == 60 and set(review["by_reviewer"]) == {"ann", "bob"}
    assert review["overall"]["indistinguishable_rate"]["value"] == rate


def test_the_summary_reaches_the_reports_and_mlflow(
    reviewed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = copy_of(reviewed_run, tmp_path)
    state = json.loads((run_dir / "mlflow.json").read_text())
    add_votes(run_dir, vote("ann", "right", 20) + vote("ann", "cant_tell", 20))
    assert main(["review", str(run_dir), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "fp8-e4m3-rowwise, 40 votes: indistinguishable 0.500 [" in out and "(20 of 40)" in out
    summary_md = (run_dir / "summary.md").read_text()
    assert "## Blind A/B review" in summary_md and "told apart most: red-cube-s" in summary_md
    report = (run_dir / "report.html").read_text()
    assert 'id="review"' in report and 'src="images/ref/red-cube-s0.png"' in report
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["candidates"][CANDIDATE])
    assert run.data.metrics["human_indistinguishable_rate"] == 0.5 and run.data.metrics["human_votes"] == 40


def test_a_bad_vote_line_is_refused_naming_file_and_line(
    reviewed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = copy_of(reviewed_run, tmp_path)
    add_votes(run_dir, vote("ann", "right", 3))
    lines = (run_dir / REVIEWS_FILE).read_text().splitlines()
    lines[1] = lines[1].replace('"answer": "', '"answer": "maybe-')
    (run_dir / REVIEWS_FILE).write_text("\n".join(lines) + "\n")
    assert main(["review", str(run_dir), "--summary"]) == 2
    err = capsys.readouterr().err
    assert f"{REVIEWS_FILE}:2" in err and "answer" in err


def test_a_torn_last_vote_is_left_out(reviewed_run: Path, tmp_path: Path) -> None:
    run_dir = copy_of(reviewed_run, tmp_path)
    add_votes(run_dir, vote("ann", "right", 3))
    with (run_dir / REVIEWS_FILE).open("a") as f:
        f.write('{"reviewer": "ann", "candid')  # the server killed while writing
    assert main(["review", str(run_dir), "--summary"]) == 0
    assert json.loads((run_dir / "review.json").read_text())["votes"] == 3


@pytest.mark.parametrize(
    ("gate", "key"),
    [
        ('  - {metric: psnr, stat: mean, op: ">=", value: 1, min_votes: 5}\n', "min_votes"),
        ('  - {human: pick_accuracy, op: "<=", value: 0.6, tags: [people]}\n', "tags"),
        ('  - {human: accuracy, op: "<=", value: 0.6}\n', "human"),
    ],
)
def test_bad_human_gates_are_input_errors(
    workdir: Path, capsys: pytest.CaptureFixture[str], gate: str, key: str
) -> None:
    suite = write(workdir / "bad.yaml", (TEST_SUITES / "smoke.yaml").read_text() + gate)
    assert main(["run", str(suite), "--no-mlflow", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and key in err


def test_stopping_the_page_brings_the_votes_into_the_report_and_mlflow(
    reviewed_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evals run`, `evals review`, vote, Ctrl-C: the report and MLflow show the rate (the votes here
    come from a scripted reviewer while the real server runs)."""
    from evals.review.server import ReviewServer

    run_dir = copy_of(reviewed_run, tmp_path)
    state = json.loads((run_dir / "mlflow.json").read_text())

    def review_then_ctrl_c(server: ReviewServer) -> None:
        add_votes(run_dir, vote("ann", "cant_tell", 12))
        raise KeyboardInterrupt

    monkeypatch.setattr(ReviewServer, "wait", review_then_ctrl_c)
    assert main(["review", str(run_dir)]) == 0
    assert "fp8-e4m3-rowwise, 12 votes: indistinguishable 1.000 [" in capsys.readouterr().out
    assert "12 votes" in (run_dir / "summary.md").read_text() and 'id="review"' in (run_dir / "report.html").read_text()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["candidates"][CANDIDATE])
    assert run.data.metrics["human_indistinguishable_rate"] == 1.0
