"""The blind review's page server over HTTP: nothing it sends tells the sides, the images it serves
are where it records them, votes are synced and survive a restart, and the order is reproducible."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evals.models.yamlspec import InputError
from evals.records import read_records
from evals.review.server import ReviewServer, load_pairs, serve
from evals.review.trials import SEEDS_FILE, read_seeds, reviewer_seed, trial_order
from evals.review.votes import read_votes
from tests.conftest import TEST_SUITES

CANDIDATE = "fp8-e4m3-rowwise"
TRIAL_KEYS = {"done", "trial_id", "left", "right", "trial", "total"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One light smoke run for the module (16 samples of one candidate); tests review copies of it."""
    from evals.cli import main

    home = tmp_path_factory.mktemp("review")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        patch.setenv("EVALS_CACHE_DIR", str(home / "cache"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["run", str(TEST_SUITES / "smoke.yaml"), "--no-mlflow", "--no-progress"]) == 0
    (run_dir,) = (home / "runs").iterdir()
    return run_dir


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def server(run_dir: Path) -> Iterator[ReviewServer]:
    started = ReviewServer(run_dir, seed=11).start()
    yield started
    started.stop()


def request(url: str, data: Any = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    body = None if data is None else json.dumps(data).encode()
    headers = headers if headers is not None else ({"Content-Type": "application/json"} if body else {})
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(server: ReviewServer, path: str, data: Any) -> tuple[int, dict[str, Any]]:
    status, body = request(server.url.rstrip("/") + path, data)
    return status, json.loads(body)


def image(server: ReviewServer, path: str) -> bytes:
    status, body = request(server.url.rstrip("/") + path)
    assert status == 200
    return body


def identify(run_dir: Path, server: ReviewServer, trial: dict[str, Any]) -> tuple[str, str, str]:
    """(candidate, sample_id, reference side) of a trial, found by comparing the served bytes with the files."""
    left, right = image(server, trial["left"]), image(server, trial["right"])
    for record in read_records(run_dir / "records.jsonl"):
        candidate, reference = (run_dir / record.image).read_bytes(), (run_dir / record.reference_image).read_bytes()
        assert candidate != reference
        if (left, right) == (reference, candidate):
            return record.policy, record.sample_id, "left"
        if (left, right) == (candidate, reference):
            return record.policy, record.sample_id, "right"
    raise AssertionError(f"trial {trial['trial']}: the served images are not a (reference, candidate) pair")


def test_a_bad_reviewer_name_is_a_400(server: ReviewServer) -> None:
    for name in ("Bad Name", "../etc", "", 7, None):
        status, answer = post(server, "/api/start", {"reviewer": name})
        assert status == 400, name
        assert "reviewer name" in answer["error"]


def test_nothing_sent_tells_which_image_is_the_original(run_dir: Path, server: ReviewServer) -> None:
    status, page = request(server.url)
    assert status == 200
    texts = [page.decode()]
    status, trial = post(server, "/api/start", {"reviewer": "alice"})
    while not trial["done"]:
        assert status == 200 and set(trial) == TRIAL_KEYS
        texts.append(json.dumps(trial))
        status, trial = post(server, "/api/vote", {"trial_id": trial["trial_id"], "answer": "cant_tell"})
    texts.append(json.dumps(trial))
    samples = [r.sample_id for r in read_records(run_dir / "records.jsonl")]
    for text in texts:
        lowered = text.lower()
        for leak in (CANDIDATE, "ref", "images/", ".png", *samples):
            assert leak not in lowered, f"{leak!r} in {text[:200]!r}"
    assert "<script src" not in texts[0] and "://" not in texts[0]  # offline: nothing loaded from elsewhere


def test_served_images_are_on_the_recorded_sides(run_dir: Path, server: ReviewServer) -> None:
    answers = ("left", "right", "cant_tell")
    status, trial = post(server, "/api/start", {"reviewer": "alice"})
    seen: list[tuple[str, str, str, str]] = []
    while not trial["done"]:
        assert trial["trial"] == len(seen) and trial["total"] == 16
        candidate, sample_id, side = identify(run_dir, server, trial)
        answer = answers[len(seen) % 3]
        seen.append((candidate, sample_id, side, answer))
        old_urls = (trial["left"], trial["right"])
        status, trial = post(server, "/api/vote", {"trial_id": trial["trial_id"], "answer": answer})
        assert status == 200
        assert all(request(server.url.rstrip("/") + url)[0] == 404 for url in old_urls)  # tokens end with the trial
        votes = read_votes(run_dir)  # synced before the answer came
        assert len(votes) == len(seen)
    assert trial == {"done": True, "trial": 16, "total": 16}
    votes = read_votes(run_dir)
    assert [(v.candidate, v.sample_id, v.reference_side, v.answer) for v in votes] == seen
    assert [v.trial for v in votes] == list(range(16)) and {v.reviewer for v in votes} == {"alice"}
    assert all(0 <= v.seconds < 60 for v in votes)
    assert {side for _, _, side, _ in seen} == {"left", "right"}  # randomised
    assert sorted(sample for _, sample, _, _ in seen) == sorted(
        r.sample_id for r in read_records(run_dir / "records.jsonl")
    )


def test_bad_requests_are_refused(run_dir: Path, server: ReviewServer) -> None:
    base = server.url.rstrip("/")
    _, trial = post(server, "/api/start", {"reviewer": "alice"})
    assert post(server, "/api/vote", {"trial_id": trial["trial_id"], "answer": "maybe"})[0] == 400
    assert post(server, "/api/vote", {"trial_id": "nope", "answer": "left"})[0] == 409
    assert request(base + "/api/vote", {"trial_id": trial["trial_id"]}, {"Content-Type": "text/plain"})[0] == 415
    assert request(base + "/", headers={"Host": "evil.example:80"})[0] == 403
    for path in ("/img/nope", "/img/../run.json", "/run.json", "/records.jsonl"):
        assert request(base + path)[0] == 404
    _, again = post(server, "/api/start", {"reviewer": "alice"})  # a reload withdraws the trial shown before
    assert again["trial"] == 0 and again["trial_id"] != trial["trial_id"]
    assert post(server, "/api/vote", {"trial_id": trial["trial_id"], "answer": "left"})[0] == 409
    assert read_votes(run_dir) == []


def test_votes_survive_a_restart_and_the_reviewer_continues(run_dir: Path) -> None:
    first = ReviewServer(run_dir).start()
    try:
        _, trial = post(first, "/api/start", {"reviewer": "bob"})
        for _ in range(3):
            _, trial = post(first, "/api/vote", {"trial_id": trial["trial_id"], "answer": "left"})
    finally:
        first.stop()
    seed = read_seeds(run_dir)["bob"]
    assert len(read_votes(run_dir)) == 3
    second = ReviewServer(run_dir).start()
    try:
        _, trial = post(second, "/api/start", {"reviewer": "bob"})
        assert trial["trial"] == 3
        expected = trial_order(list(load_pairs(run_dir)), "bob", seed)[3]
        assert identify(run_dir, second, trial) == (expected.candidate, expected.sample_id, expected.reference_side)
        post(second, "/api/vote", {"trial_id": trial["trial_id"], "answer": "right"})
    finally:
        second.stop()
    votes = read_votes(run_dir)
    assert [v.trial for v in votes] == [0, 1, 2, 3] and read_seeds(run_dir) == {"bob": seed}
    order = trial_order(list(load_pairs(run_dir)), "bob", seed)
    assert [(v.candidate, v.sample_id, v.reference_side) for v in votes] == [
        (t.candidate, t.sample_id, t.reference_side) for t in order[:4]
    ]


def test_the_order_is_reproducible_for_a_reviewer_and_seed(finished_run: Path, tmp_path: Path) -> None:
    orders = []
    for copy in ("a", "b"):
        run_dir = Path(shutil.copytree(finished_run, tmp_path / copy))
        server = ReviewServer(run_dir, seed=5).start()
        try:
            _, trial = post(server, "/api/start", {"reviewer": "carol"})
            shown = []
            for _ in range(5):
                shown.append(identify(run_dir, server, trial))
                _, trial = post(server, "/api/vote", {"trial_id": trial["trial_id"], "answer": "left"})
        finally:
            server.stop()
        orders.append(shown)
        assert json.loads((run_dir / SEEDS_FILE).read_text()) == {"carol": 5}
    assert orders[0] == orders[1]


def test_trial_order() -> None:
    pairs = [(c, f"s{i}") for c in ("a", "b") for i in range(20)]
    order = trial_order(pairs, "dan", 3)
    assert order == trial_order(list(reversed(pairs)), "dan", 3)  # the listing order does not matter
    assert sorted((t.candidate, t.sample_id) for t in order) == sorted(pairs)  # every pair once a round
    assert [t.index for t in order] == list(range(40))
    assert order != trial_order(pairs, "erin", 3) and order != trial_order(pairs, "dan", 4)
    assert {t.reference_side for t in order} == {"left", "right"}
    two = trial_order(pairs, "dan", 3, rounds=2)
    assert two[:40] == order and sorted((t.candidate, t.sample_id) for t in two[40:]) == sorted(pairs)


def test_reviewer_seeds_are_kept(tmp_path: Path) -> None:
    assert reviewer_seed(tmp_path, "ann", 1) == 1
    chosen = reviewer_seed(tmp_path, "ben")
    assert reviewer_seed(tmp_path, "ann") == 1 and reviewer_seed(tmp_path, "ben", chosen) == chosen
    assert read_seeds(tmp_path) == {"ann": 1, "ben": chosen}
    with pytest.raises(InputError, match="started with seed 1"):
        reviewer_seed(tmp_path, "ann", 2)
    (tmp_path / SEEDS_FILE).write_text('{"ann": "x"}')
    with pytest.raises(InputError, match="seed of 'ann'"):
        read_seeds(tmp_path)


def test_bad_input(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a run directory"):
        ReviewServer(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"no candidate 'fp8-e4m3-rowwis'.*did you mean"):
        ReviewServer(run_dir, candidates=["fp8-e4m3-rowwis"])
    run = json.loads((run_dir / "run.json").read_text())
    run["policies"][0]["noise_floor"] = "batch"
    (run_dir / "run.json").write_text(json.dumps(run))
    with pytest.raises(InputError, match="but the noise floor"):
        ReviewServer(run_dir)
    assert len(ReviewServer(run_dir, candidates=[CANDIDATE]).pairs) == 16  # chosen by name, it is reviewed
    (run_dir / "records.jsonl").write_text("")
    with pytest.raises(InputError, match="no sample with both images"):
        ReviewServer(run_dir, candidates=[CANDIDATE])


def test_serve_stops_on_ctrl_c(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[ReviewServer] = []

    def interrupted(self: ReviewServer) -> None:
        started.append(self)
        assert request(self.url)[0] == 200
        raise KeyboardInterrupt

    monkeypatch.setattr(ReviewServer, "wait", interrupted)
    assert serve(run_dir) == 0
    assert "http://127.0.0.1:" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        _ = started[0].url  # stopped: the port is given back
