"""`evals run --resume RUN_DIR`: finish an interrupted run so that it ends with the records an
uninterrupted run gives.

run.json is read as untrusted input (a run directory may come from elsewhere): every key resume
uses is type-checked, every name must be a safe name. The run directory is locked before its records
are read; records that cannot be kept (unreadable, a second copy, not a sample of this run, or
pointing at an image that is missing or damaged) are dropped, and their samples generated again.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evals.api import (
    CheckpointArg,
    RunRequest,
    build_candidates,
    early_tracker,
    execute,
    prepare,
    settled_on_error,
    tracking_uri_of,
)
from evals.models.names import SAFE_NAME
from evals.models.yamlspec import InputError, format_key_path
from evals.step_error.screening import keep_usable_screening
from evals.suite_types import REFERENCE_DTYPES

if TYPE_CHECKING:
    from evals.runner import RunOutcome
    from evals.suite_types import Suite

log = logging.getLogger(__name__)

SafeName = Annotated[str, Field(pattern=SAFE_NAME.pattern)]


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # run.json says more than resume reads


class _SuiteInfo(_Read):
    name: SafeName
    path: str
    sha256: str


class _ModelInfo(_Read):
    source: str
    fingerprint: str


class _CandidateInfo(_Read):
    name: SafeName
    sha256: str
    checkpoint: str | None = None
    policy_path: str | None = None
    noise_floor: str | None = None
    baseline_of: SafeName | None = None


class RunInfo(_Read):
    """What `--resume` reads of run.json."""

    suite: _SuiteInfo
    model: _ModelInfo
    reference_dtype: Literal[REFERENCE_DTYPES]  # type: ignore[valid-type]
    policies: list[_CandidateInfo]


def read_run_info(run_dir: Path) -> RunInfo:
    path = run_dir / "run.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"--resume {run_dir}: not a run directory (run.json: {exc})") from exc
    try:
        return RunInfo.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InputError(f"{path}: {format_key_path(tuple(first['loc']))}: {first['msg']}") from exc


def _stored_path(text: str, run_dir: Path, what: str) -> Path:
    """A file run.json names (absolute since it records resolved paths; older runs: as typed,
    relative to where the run started, tried from here)."""
    path = Path(text)
    if not path.exists():
        raise InputError(f"--resume {run_dir}: its {what} {text} no longer exists; a resume needs the same file")
    return path.resolve()


def _readable_png(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    if path.is_symlink() or not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.verify()  # checks the chunks' checksums without decoding the pixels
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


def keep_usable_records(run_dir: Path, names: set[str], sample_ids: set[str]) -> set[tuple[str, str]]:
    """(candidate, sample id) of the records a resume keeps; records.jsonl is rewritten without the
    others (each named in a warning), so every sample ends with exactly one record."""
    from evals.records import SampleRecord
    from evals.rundir import write_atomic

    path = run_dir / "records.jsonl"
    if not path.is_file():
        return set()
    kept: list[str] = []
    done: set[tuple[str, str]] = set()
    dropped: list[str] = []
    # Every candidate's record of a sample names the same reference image: check each file once.
    readable = functools.cache(_readable_png)
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            record = SampleRecord.from_dict(json.loads(line))
        except (ValueError, TypeError, KeyError, InputError, RecursionError) as exc:
            dropped.append(f"line {line_no}: unreadable ({str(exc)[:120]})")
            continue
        key = (record.policy, record.sample_id)
        if record.policy not in names or record.sample_id not in sample_ids:
            dropped.append(f"line {line_no}: {record.policy}/{record.sample_id} is not a sample of this run")
        elif key in done:
            dropped.append(f"line {line_no}: a second record of {record.policy}/{record.sample_id}")
        elif not (readable(run_dir / record.image) and readable(run_dir / record.reference_image)):
            dropped.append(f"line {line_no}: {record.policy}/{record.sample_id}'s image is missing or damaged")
        else:
            kept.append(line)
            done.add(key)
    if dropped:
        for reason in dropped:
            log.warning(f"{path}: dropped {reason}; the sample is generated again")
        write_atomic(path, "".join(f"{line}\n" for line in kept))
    return done


def _request_for(run: RunInfo, run_dir: Path, request: RunRequest) -> RunRequest:
    infos = [p for p in run.policies if not p.noise_floor]  # the noise floor is rebuilt from the suite
    if any(not p.policy_path and not p.checkpoint for p in infos):
        raise InputError(f"--resume {run_dir}: run.json does not say where its candidates came from")
    model = run.model.source
    if Path(model).is_absolute():  # a local folder or file (names like `tiny` stay names)
        model = str(_stored_path(model, run_dir, "model"))
    return RunRequest(
        **{
            **request.__dict__,
            "suite": _stored_path(run.suite.path, run_dir, "suite"),
            "model": model,
            "reference_dtype": run.reference_dtype,
            "policies": [str(_stored_path(p.policy_path, run_dir, "policy")) for p in infos if p.policy_path],
            "candidate_checkpoints": [
                CheckpointArg(_stored_path(p.checkpoint, run_dir, "checkpoint"), p.name) for p in infos if p.checkpoint
            ],
        }
    )


def resume_run(run_dir: Path, request: RunRequest) -> tuple[RunOutcome, Suite, str | None]:
    """Finish an interrupted run: same suite, model and candidates as its run.json says; every
    usable sample already in records.jsonl is kept and skipped."""
    from evals.models.precision import load_policy
    from evals.run_lock import lock_run_dir
    from evals.rundir import check_no_links
    from evals.suite import load_suite

    if not run_dir.is_dir():
        raise InputError(f"--resume {run_dir}: no such run directory")
    check_no_links(run_dir)
    run = read_run_info(run_dir)
    with lock_run_dir(run_dir):  # before its records are read: a second resume waits for nothing, it stops
        request = _request_for(run, run_dir, request)
        suite = load_suite(request.suite)
        if suite.sha256 != run.suite.sha256:
            raise InputError(f"--resume {run_dir}: {request.suite} changed since the run started; start a new run")
        early = early_tracker(request)
        with settled_on_error(early):
            prepared = prepare(request, suite)
            if prepared.model.fingerprint != run.model.fingerprint:
                raise InputError(f"--resume {run_dir}: the model's files changed since the run started")
            policies = [load_policy(p) for p in request.policies]
            candidates = build_candidates(prepared, policies, request.candidate_checkpoints, request.baseline)
            _check_same_candidates(run, candidates, run_dir, request.baseline)
            names = {c.name for c in candidates}
            ids = {s.id for s in suite.samples()}
            done = keep_usable_records(run_dir, names, ids)
            keep_usable_screening(run_dir, names, ids)  # the runner reads what is kept
        outcome, tracker = execute(prepared, candidates, request, resume=(run_dir, done), tracker=early)
    return outcome, suite, tracking_uri_of(tracker)


def _check_same_candidates(run: RunInfo, candidates: list[Any], run_dir: Path, baseline: str | None) -> None:
    """The rebuilt candidates are the run's (same names and hashes); each keeps the baseline it was
    compared with, unless `--baseline` says otherwise now."""
    recorded = {p.name: p for p in run.policies if not p.noise_floor}
    built = {c.name: c for c in candidates if not c.noise_floor}
    if sorted((n, p.sha256) for n, p in recorded.items()) != sorted((n, c.policy_sha256) for n, c in built.items()):
        raise InputError(f"--resume {run_dir}: a candidate's policy or checkpoint changed since the run started")
    for name, candidate in built.items():
        if not baseline and recorded[name].baseline_of:
            candidate.baseline_of = recorded[name].baseline_of
