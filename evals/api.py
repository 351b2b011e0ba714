"""One call that runs a suite file end to end: what `evals run` and the pytest plugin share."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.models.yamlspec import InputError

if TYPE_CHECKING:
    from evals.background_tracker import BackgroundTracker
    from evals.candidates import Candidate
    from evals.distributed import Shard
    from evals.models.precision import PrecisionPolicy
    from evals.models.sources import LoadedModel
    from evals.runner import RunOutcome
    from evals.suite_types import Suite
    from evals.tracker_protocol import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointArg:
    path: Path
    """A quantized transformer file."""
    name: str | None = None
    """The candidate's name (default: the policy its metadata names, else the file's name)."""

    @classmethod
    def parse(cls, text: str) -> CheckpointArg:
        """`FILE` or `NAME=FILE`."""
        name, sep, rest = text.partition("=")
        if sep and name and "/" not in name and os.sep not in name:
            from evals.models.names import check_name

            return cls(Path(rest), check_name(name, f"--candidate-checkpoint {text}: the name"))
        return cls(Path(text))


@dataclass
class RunRequest:
    suite: Path
    """Suite YAML file."""
    model: str | None = None
    """Model source; None takes the suite's."""
    model_config: str | None = None
    """Local diffusers folder for a single-file model."""
    no_t5: bool = False
    """Load the model without T5."""
    policies: list[str] = field(default_factory=list)
    """Candidate policies; empty takes the suite's (unless checkpoints are given)."""
    candidate_checkpoints: list[CheckpointArg] = field(default_factory=list)
    """Quantized transformer files evaluated as they are, each optionally named."""
    baseline: str | None = None
    """Compare every candidate's baseline gates with this policy's baseline instead of its own."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    reference_dtype: str | None = None
    """None takes the suite's."""
    runs_dir: Path = Path("runs")
    """Where the run directory goes."""
    cache_dir: Path | None = None
    """Reference cache; None is the default location."""
    use_cache: bool = True
    """Reuse cached reference images."""
    mlflow: bool = True
    """Log to MLflow."""
    progress: bool = True
    """Show a progress bar."""
    weights: dict[str, str] = field(default_factory=dict)
    """Metric weights files."""
    compile: str | None = None
    """Compile the candidates' transformer blocks (`blocks`) or not (`none`); None takes the suite's."""
    fail_fast: bool = False
    """Stop generating a candidate once one of its gates has failed for good (evals.fail_fast)."""
    cuda_graphs: bool = True
    """On a GPU, replay the transformers' steps from CUDA graphs (evals.graphed); False: launched."""


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return name


def ci_tags() -> dict[str, str]:
    for var in ("GITHUB_RUN_ID", "GITHUB_JOB", "CI_JOB_ID", "BUILD_ID"):
        if os.environ.get(var):
            return {"ci_job": f"{var}={os.environ[var]}"}
    return {}


def _one_process() -> Shard:
    from evals.distributed import Shard

    return Shard()


@dataclass
class Prepared:
    suite: Suite
    """The loaded suite."""
    model: LoadedModel
    """The reference model."""
    device: str
    """Resolved device."""
    reference_dtype: str
    """Resolved reference dtype name."""
    shard: Shard = field(default_factory=_one_process)
    """This process's torchrun shard."""
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds of each start-up step (`startup.model`, ...), for timings.json."""
    started: float = 0.0
    """Where the run's start-up is counted from (`evals.startup_origin`)."""
    compile: str = "none"
    """`blocks` or `none` for the candidates' transformer blocks (request, else suite; auto resolved)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The suite's metrics, loaded on `device`."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Metric -> why it cannot run here (weights absent); gates on it fail unless optional."""


def prepare(request: RunRequest, suite: Suite | None = None) -> Prepared:
    """Validate the suite (unless already loaded), options and files, then load the reference model."""
    from evals import startup_origin

    started = startup_origin()
    from evals.suite import load_suite

    suite = suite or load_suite(request.suite)
    check_output_dirs(request)
    if request.baseline:
        from evals.models.names import check_name

        check_name(request.baseline, "--baseline")  # it names a baseline file
    if request.mlflow:
        from evals.mlflow_reach import budget

        budget()  # a bad EVALS_MLFLOW_TIMEOUT stops the run before the model loads
    for checkpoint in request.candidate_checkpoints:
        path = checkpoint.path
        if path.suffix != ".safetensors" or not path.is_file():
            raise InputError(f"--candidate-checkpoint {path}: expected an existing .safetensors file (never pickle)")
    for name, weights_file in request.weights.items():
        if not Path(weights_file).is_file():
            raise InputError(f"--weights {name}={weights_file}: no such file")
    from evals import distributed

    shard = distributed.from_environment()
    if request.fail_fast and shard.active:
        raise InputError("--fail-fast decides on one process's records; run without torchrun, or without it")
    device = shard.device(resolve_device(request.device))
    distributed.start(shard, device)
    from evals.models.sources import load_source, resolved_dtype_name

    start = time.perf_counter()
    source = request.model or suite.model
    early_warning = device == "cpu" and source.startswith("random:")
    if early_warning and shard.main:  # building its random weights alone takes a while
        log.warning(
            f"{source} is a full-size SD3.5 transformer on the CPU: building it "
            "takes a minute and each image minutes (`--device cuda` on a GPU; `--model tiny` for a quick check)"
        )
    # Resolved (auto -> float32/bfloat16) so the cache key and run.json say what really ran.
    reference_dtype = resolved_dtype_name(request.reference_dtype or suite.reference_dtype, device)
    model = load_source(source, reference_dtype, device, config=request.model_config, drop_t5=request.no_t5)
    startup = {"startup.model": time.perf_counter() - start}
    from evals.models.sources import check_generation_fits, cpu_warning

    check_generation_fits(model.pipeline, suite.generation.height, suite.generation.width, f"{suite.path} on {source}")
    warning = cpu_warning(model.pipeline, source) if device == "cpu" and not early_warning else None
    if warning and shard.main:
        log.warning(warning)
    compiled = compile_mode(request.compile or suite.compile, device)
    from evals.scoring import load_metrics

    metrics, unavailable = load_metrics(suite, device, request.weights)  # a bad weights file stops us here
    return Prepared(suite, model, device, reference_dtype, shard, startup, started, compiled, metrics, unavailable)


def check_output_dirs(request: RunRequest) -> None:
    """The run directory's parent and the reference cache must be directories this process can
    write (or create): checked before any work, so that a bad option leaves nothing behind."""
    from evals.cache import CACHE_ENV, default_cache_dir
    from evals.rundir import check_writable_dir

    check_writable_dir(request.runs_dir, f"--runs-dir {request.runs_dir}")
    if request.use_cache:
        cache = request.cache_dir or default_cache_dir()
        what = "--cache-dir" if request.cache_dir else f"the reference cache (${CACHE_ENV} or the default; --no-cache)"
        check_writable_dir(cache, f"{what} {cache}")


def compile_mode(choice: str, device: str) -> str:
    """`auto` resolved: the candidates' blocks are compiled on a GPU (inductor's CPU code is slow to
    build and gains little there)."""
    if choice == "auto":
        return "blocks" if device.startswith("cuda") else "none"
    return choice


def check_unique_names(candidates: list[Candidate]) -> None:
    """Names become folders and MLflow runs: two candidates may not share one."""
    names = [c.name for c in candidates]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(
            f"two candidates are named {', '.join(twice)}: name checkpoints with --candidate-checkpoint NAME=FILE"
        )


def build_candidates(
    prepared: Prepared, policies: list[PrecisionPolicy], checkpoints: list[CheckpointArg], baseline: str | None = None
) -> list[Candidate]:
    """Candidates from loaded policies (rule typos surface here) and from quantized checkpoint files;
    their transformer blocks compiled when `prepared.compile` says `blocks`. `baseline`: the policy
    whose baseline every candidate is compared with (default: each its own)."""
    from evals.candidates import build_candidate, candidate_from_checkpoint

    start = time.perf_counter()
    candidates = [build_candidate(prepared.model, p, prepared.suite.generation) for p in policies]
    candidates += [candidate_from_checkpoint(prepared.model, c.path, c.name) for c in checkpoints]
    check_unique_names(candidates)
    from evals.suite_guard import guarded_names

    guarded_names(prepared.suite, [c.name for c in candidates])  # a guard naming no candidate stops here
    if baseline:
        for candidate in candidates:
            candidate.baseline_of = baseline
    if prepared.compile == "blocks":
        from evals.compiling import compile_blocks

        for candidate in candidates:  # before the noise floor, which may share the reference's transformer
            compile_blocks(candidate.pipeline.transformer)
    if prepared.suite.noise_floor:
        from evals.candidates import NOISE_FLOOR, noise_floor_candidate

        if NOISE_FLOOR in [c.name for c in candidates]:
            raise InputError(f"{NOISE_FLOOR!r} names the suite's noise floor; rename that policy")
        if prepared.suite.noise_floor == "float32" and prepared.reference_dtype == "float32":
            raise InputError(
                f"{prepared.suite.path}: noise_floor: float32 changes nothing for a float32 reference; use batch"
            )
        candidates.append(noise_floor_candidate(prepared.model, prepared.suite.noise_floor))
    prepared.startup["startup.candidates"] = time.perf_counter() - start
    return candidates


def execute(
    prepared: Prepared,
    candidates: list[Candidate],
    request: RunRequest,
    runs_dir: Path | None = None,
    resume: tuple[Path, set[tuple[str, str]]] | None = None,
    tracker: Tracker | None = None,
) -> tuple[RunOutcome, Tracker]:
    """Run candidates against the reference into a new run directory (or finish the one in `resume`,
    skipping its finished samples); returns (RunOutcome, tracker). `tracker`: one opened earlier."""
    from evals.background_tracker import open_tracker
    from evals.run_lock import lock_run_dir
    from evals.rundir import new_run_dir

    check_unique_names(candidates)
    suite, shard = prepared.suite, prepared.shard
    # Only rank 0 writes the run directory and talks to MLflow; the others compute and send.
    if tracker is None:
        start = time.perf_counter()
        tracker = open_tracker(request.mlflow and shard.main)
        prepared.startup["startup.mlflow"] = time.perf_counter() - start
    if resume:
        run_dir, done = resume[0], shard.broadcast(resume[1] if shard.main else None)
    else:
        run_dir, done = (
            Path(shard.broadcast(str(new_run_dir(runs_dir or request.runs_dir, suite.name)) if shard.main else None)),
            None,
        )
    # A resume holds its run directory's lock already (taken before it read the records).
    with lock_run_dir(run_dir) if shard.main and not resume else nullcontext():
        outcome = _run_locked(prepared, candidates, request, run_dir, done, tracker, bool(resume))
    if shard.active:  # every rank leaves with rank 0's outcome, hence the same exit code
        from evals import distributed

        outcome = shard.broadcast(outcome)
        distributed.stop(shard)
    assert outcome is not None  # rank 0's, on every rank
    return outcome, tracker


def _run_locked(
    prepared: Prepared,
    candidates: list[Candidate],
    request: RunRequest,
    run_dir: Path,
    done: set[tuple[str, str]] | None,
    tracker: Tracker,
    resumed: bool,
) -> RunOutcome | None:
    """`execute`'s run, in a run directory this process owns (rank 0) or computes for (the others)."""
    from evals.cache import ReferenceCache, default_cache_dir
    from evals.environment import git_commit
    from evals.runner import SuiteRunner

    suite, model, shard = prepared.suite, prepared.model, prepared.shard
    names = [c.name for c in candidates]
    cache = ReferenceCache(request.cache_dir or default_cache_dir()) if request.use_cache else None
    if shard.main:
        workers = f" ({shard.world} processes)" if shard.active else ""
        log.info(f"run directory: {run_dir}{' (resumed)' if resumed else ''}{workers}")
    runner = SuiteRunner(
        suite,
        model,
        candidates,
        run_dir,
        tracker,
        cache,
        prepared.device,
        prepared.reference_dtype,
        metrics=prepared.metrics,
        unavailable=prepared.unavailable,
        progress=request.progress,
        done=done,
        shard=shard,
        started=prepared.started,
        startup=prepared.startup,
        fail_fast=request.fail_fast,
        cuda_graphs=request.cuda_graphs,
    )
    params = {
        "suite": suite.name,
        "suite_sha256": suite.sha256,
        "model": model.source,
        "model_fingerprint": model.fingerprint,
        "reference_dtype": prepared.reference_dtype,
        "device": prepared.device,
        "policies": ",".join(names),
        "samples": len(suite.samples()),
        "compile": prepared.compile,
        **{k: runner.env[k] for k in ("torch", "diffusers", "transformers", "device_kind")},
    }
    tags = {"git_commit": git_commit(), "run_dir": str(run_dir), **ci_tags()}
    try:
        return runner.run(params, tags)
    except BaseException:
        if shard.main:
            log.error(f"the run broke; every finished sample is in {run_dir / 'records.jsonl'}")
            tracker.interrupted()  # its MLflow runs end KILLED, not RUNNING; a resume reopens them
        raise


def early_tracker(request: RunRequest) -> BackgroundTracker | None:
    """The tracker, opened now by its worker thread while the model loads, if that creates nothing
    (a bad input found later must leave no new store behind); else None: `execute` opens it."""
    from evals.background_tracker import open_mlflow_in_background
    from evals.distributed import from_environment
    from evals.tracking import store_exists

    if request.mlflow and from_environment().main and store_exists():
        return open_mlflow_in_background()
    return None


@contextmanager
def settled_on_error(tracker: BackgroundTracker | None) -> Iterator[None]:
    """On an error, let an early tracker finish opening (a store migration must not be cut off by
    the exit) before it propagates."""
    try:
        yield
    except BaseException:
        if tracker is not None:
            tracker.wait()
        raise


def tracking_uri_of(tracker: Tracker) -> str | None:
    from evals.background_tracker import mlflow_tracker

    found = mlflow_tracker(tracker)
    return found.tracking_uri if found is not None else None


def run_suite_file(request: RunRequest) -> tuple[RunOutcome, Suite, str | None]:
    """Validate everything, then run; returns (RunOutcome, Suite, MLflow tracking URI or None).

    Every input is checked before any work or any file is written: an InputError leaves nothing.
    """
    from evals.models.precision import load_policy
    from evals.suite import load_suite

    suite = load_suite(request.suite)
    policy_names = request.policies or ([] if request.candidate_checkpoints else list(suite.policies))
    if not policy_names and not request.candidate_checkpoints:
        raise InputError(
            f"{request.suite}: no candidate; pass --policy or --candidate-checkpoint, or list `policies:` in the suite"
        )
    policies = [load_policy(name) for name in policy_names]
    early = early_tracker(request)
    with settled_on_error(early):
        prepared = prepare(request, suite)
        candidates = build_candidates(prepared, policies, request.candidate_checkpoints, request.baseline)
    outcome, tracker = execute(prepared, candidates, request, tracker=early)
    return outcome, prepared.suite, tracking_uri_of(tracker)
