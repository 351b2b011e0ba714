"""Run directories against hostile files and concurrent writers: nothing is written outside a run
directory, no sample is counted twice, every bad input is exit 2 with nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from evals.cli import main
from evals.models.names import check_name, tame_name
from evals.models.yamlspec import InputError
from tests.conftest import REPO, TEST_SUITES, write

FAST = ["--no-mlflow", "--no-progress"]
SMOKE = str(TEST_SUITES / "smoke.yaml")


def copy_run(finished: Path, where: Path, keep: int = 16) -> Path:
    """The finished run as a run interrupted after `keep` records."""
    run_dir = where / finished.name
    shutil.copytree(finished, run_dir)
    lines = (run_dir / "records.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "records.jsonl").write_text("".join(lines[:keep]))
    (run_dir / "verdict.json").unlink()
    return run_dir


@pytest.mark.parametrize("name", ["../x", "..", ".hidden", "a/b", "A-upper", "", "x" * 65, "ok\n", "c:evil", 7, None])
def test_the_one_name_rule_refuses_what_could_leave_a_folder(name: object) -> None:
    with pytest.raises(InputError, match="it names files"):
        check_name(name, "test name")
    assert check_name("fp8-e4m3.rowwise_2", "test name") == "fp8-e4m3.rowwise_2"
    assert tame_name("../../My Model (FP8)") == "my-model-fp8" and tame_name("../..") == "unnamed"


def test_a_second_writer_is_refused_while_the_first_runs_and_nothing_is_counted_twice(
    finished: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two resumes of one run directory at once: the one that started later exits 2 naming the
    first (a real second process), which finishes the run with each sample once."""
    run_dir = copy_run(finished, workdir, keep=12)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "evals", "run", "--resume", str(run_dir), *FAST],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (run_dir / ".lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert main(["run", "--resume", str(run_dir), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"is being written by pid {first.pid}" in err and "evals run --resume" in err
    assert first.wait(timeout=180) == 0, first.stderr.read() if first.stderr else ""
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    assert len(lines) == 16 and len({(json.loads(x)["policy"], json.loads(x)["sample_id"]) for x in lines}) == 16
    assert not (run_dir / ".lock").exists()


def test_a_planted_link_is_refused_and_its_target_untouched(
    finished: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = copy_run(finished, workdir, keep=10)
    outside = write(workdir / "precious.txt", "keep me")
    sample = json.loads((finished / "records.jsonl").read_text().splitlines()[12])["sample_id"]  # not kept
    for planted in (run_dir / "images" / "ref" / f".{sample}.png.tmp", run_dir / "records.jsonl.link"):
        planted.symlink_to(outside)
        assert main(["run", "--resume", str(run_dir), *FAST]) == 2
        assert f"{planted.relative_to(run_dir)} is a symbolic link" in capsys.readouterr().err
        planted.unlink()
    (run_dir / "images" / "fp8-e4m3-rowwise").rename(workdir / "elsewhere")
    (run_dir / "images" / "fp8-e4m3-rowwise").symlink_to(workdir / "elsewhere")  # a whole folder
    assert main(["run", "--resume", str(run_dir), *FAST]) == 2
    shutil.copy(finished / "verdict.json", run_dir / "verdict.json")
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 2  # the report is written into the run directory too
    assert "images/fp8-e4m3-rowwise is a symbolic link" in capsys.readouterr().err
    assert outside.read_text() == "keep me" and not (run_dir / ".lock").exists()


def test_writers_never_follow_a_link_at_a_temporary_or_final_name(tmp_path: Path) -> None:
    from evals.records import RecordsWriter
    from evals.rundir import save_png, write_json

    outside = write(tmp_path / "outside.txt", "keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".a.png.tmp").symlink_to(outside)  # the name a fixed temporary name would have had
    (folder / "b.png").symlink_to(outside)
    (folder / "c.json").symlink_to(outside)
    image = np.zeros((8, 8, 3), np.uint8)
    save_png(folder / "a.png", image)
    save_png(folder / "b.png", image)
    write_json(folder / "c.json", {"x": 1})
    assert outside.read_text() == "keep me"
    assert not (folder / "b.png").is_symlink() and not (folder / "c.json").is_symlink()
    assert oct((folder / "a.png").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    (folder / "records.jsonl").symlink_to(outside)
    with pytest.raises(OSError):
        RecordsWriter(folder / "records.jsonl")
    assert outside.read_text() == "keep me"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "rowwise.safetensors"
    assert main(["quantize", "fp8-e4m3-rowwise", "--out", str(out), "--device", "cpu"]) == 0
    return out


def _with_metadata(source: Path, target: Path, **changes: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**(f.metadata() or {}), **changes}
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.mark.parametrize("named", [False, True], ids=["metadata names it", "NAME=FILE names it"])
@pytest.mark.parametrize("policy", ["../../../x", "../runs", "Evil/..", ".hidden"])
def test_a_checkpoint_cannot_choose_where_files_go(
    checkpoint: Path, workdir: Path, capsys: pytest.CaptureFixture[str], policy: str, named: bool
) -> None:
    (workdir / "in").mkdir()
    hostile = _with_metadata(checkpoint, workdir / "in" / "hostile.safetensors", policy=policy)
    arg = f"mine={hostile}" if named else str(hostile)
    assert main(["run", SMOKE, "--candidate-checkpoint", arg, *FAST]) == 2
    err = capsys.readouterr().err
    assert str(hostile) in err and "metadata 'policy'" in err and "it names files" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["in"]  # failed before any run directory


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("name", "../../x", "policies[0].name"),
        ("baseline_of", "../../etc/x", "policies[0].baseline_of"),
        ("sha256", 5, "policies[0].sha256"),
    ],
)
def test_resume_reads_run_json_as_untrusted(
    finished: Path, workdir: Path, capsys: pytest.CaptureFixture[str], key: str, value: object, message: str
) -> None:
    run_dir = copy_run(finished, workdir, keep=8)
    run = json.loads((run_dir / "run.json").read_text())
    run["policies"][0][key] = value
    (run_dir / "run.json").write_text(json.dumps(run))
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert main(["run", "--resume", str(run_dir), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_a_record_cannot_point_the_report_outside(finished: Path, workdir: Path, capsys) -> None:
    run_dir = copy_run(finished, workdir)
    shutil.copy(finished / "verdict.json", run_dir / "verdict.json")
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    record = json.loads(lines[3])
    lines[3] = json.dumps({**record, "reference_image": "/etc/passwd"})
    (run_dir / "records.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "records.jsonl:4: bad record: reference_image '/etc/passwd'" in err


def test_the_report_of_a_run_missing_an_image_still_renders(finished: Path, workdir: Path) -> None:
    run_dir = copy_run(finished, workdir)
    shutil.copy(finished / "verdict.json", run_dir / "verdict.json")
    for image in (run_dir / "images" / "fp8-e4m3-rowwise").iterdir():
        image.unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").stat().st_size > 1000


def _a_file(root: Path) -> Path:
    return write(root / "in" / "a-file", "x")


def _under_a_file(root: Path) -> Path:
    return _a_file(root) / "runs"


def _read_only(root: Path) -> Path:
    folder = root / "in" / "locked"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    return folder / "runs"


@pytest.mark.parametrize("option", ["--runs-dir", "--cache-dir"])
@pytest.mark.parametrize(
    ("make", "message"),
    [(_a_file, "expected a directory"), (_under_a_file, "is not a directory"), (_read_only, "is not writable")],
    ids=["a file", "under a file", "read-only"],
)
def test_output_folders_that_cannot_be_written_are_exit_2(
    workdir: Path, capsys: pytest.CaptureFixture[str], option: str, make, message: str
) -> None:
    if make is _read_only and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (workdir / "in").mkdir()
    target = make(workdir)
    assert main(["run", SMOKE, option, str(target), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} {target}: ") and message in err
    assert sorted(p.name for p in workdir.iterdir()) == ["in"]


def _write_entries(worker: int) -> int:
    """Write the same cache keys as every other worker, many times; return how many reads failed."""
    from evals.cache import ReferenceCache

    cache = ReferenceCache(Path(os.environ["CACHE_UNDER_TEST"]))
    bad = 0
    for round_ in range(15):
        for key in (f"{i:02x}" * 32 for i in range(8)):
            image = np.full((16, 16, 3), (round_ * 8 + worker) % 255, np.uint8)
            cache.put(key, image, {"detectors": [], "seconds": worker})
            got = cache.get(key)
            bad += got is None or got[0].shape != (16, 16, 3)
    return bad


def test_concurrent_cache_writers_of_the_same_keys_never_collide(tmp_path: Path, monkeypatch) -> None:
    import multiprocessing

    monkeypatch.setenv("CACHE_UNDER_TEST", str(tmp_path / "cache"))
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        failures = list(pool.map(_write_entries, range(4)))
    assert failures == [0, 0, 0, 0]  # and no worker raised (pool.map re-raises)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "Fp8"])
def test_a_baseline_name_is_a_file_name_and_checked_first(
    workdir: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert main(["run", SMOKE, "--baseline", name, *FAST]) == 2
    assert f"--baseline: {name!r} must match" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []
