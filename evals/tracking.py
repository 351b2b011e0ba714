"""Experiment tracking through MLflow (the `Tracker` protocol and the null tracker:
tracker_protocol.py; the tracker a run talks to, on worker threads, and how it is opened:
background_tracker.py; how long a run waits for a tracking server: mlflow_reach.py).

One experiment per suite; one parent run per `evals run` (reference images, verdict); one nested
run per candidate policy (its metrics, per-sample table, images, plan). A tracker that fails
mid-run is switched off with a warning: results stay in the run directory either way.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evals.rundir import load_png

log = logging.getLogger(__name__)


def _finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    # MLflow stores NaN but refuses/rewrites infinities inconsistently across stores; +inf (PSNR of
    # identical images) is logged as a large finite number the UI can plot, NaN is kept.
    return {k: (v if math.isfinite(v) or math.isnan(v) else math.copysign(1e9, v)) for k, v in metrics.items()}


@contextmanager
def sqlite_store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local sqlite store. MLflow creates and migrates the store on
    first use; processes doing that at once corrupt it, and experiments get created twice."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class MlflowTracker:
    """Logs through `MlflowClient` with explicit run ids: no global active-run state."""

    def __init__(self, tracking_uri: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        # MLflow's INFO lines (system metrics started/stopped, ...) would cut through the progress bar.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self._mlflow = mlflow
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        with sqlite_store_lock(self.tracking_uri):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.client.search_experiments(max_results=1)  # create and migrate the store now, under the lock
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self.candidate_ids: dict[str, str] = {}
        self._monitor: Any = None
        self._runs_with_images: set[str] = set()
        self._images_lock = threading.Lock()  # images may be logged from several threads
        self.state_file: Path | None = None
        self.experiment_name = ""
        self.reopened = False  # a resumed run that continues its MLflow run (its images are there)
        self._ended: set[str] = set()

    def start_run(
        self,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        state_file: Path | None = None,
    ) -> None:
        """The parent run, created, or the one `state_file` (a run directory's mlflow.json) names
        reopened: a resumed run goes on in the MLflow run it started. Runs of this experiment left
        RUNNING by a process that died are marked KILLED first."""
        from evals import mlflow_review

        with sqlite_store_lock(self.tracking_uri):
            self.experiment_id = mlflow_review.experiment_id(self.client, experiment)
        mlflow_review.end_abandoned_runs(self.client, self.experiment_id)
        self.state_file, self.experiment_name = state_file, experiment
        reopened = self._reopen(state_file) if state_file is not None else None
        if reopened is not None:
            self.parent_id, self.candidate_ids = reopened
            self.reopened = True
            self.client.update_run(self.parent_id, status="RUNNING")
            for key, value in mlflow_review.owner_tags().items():
                self.client.set_tag(self.parent_id, key, value)
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=run_name, tags={**tags, **mlflow_review.owner_tags()}
            )
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)
        self._write_state(complete=False)
        self._monitor = _system_metrics(self.parent_id, self.tracking_uri)

    def _reopen(self, state_file: Path) -> tuple[str, dict[str, str]] | None:
        """(parent id, candidate ids) of the run `state_file` names, if it is in this store, in this
        experiment and not deleted."""
        import json

        try:
            state = json.loads(state_file.read_text())
            if state.get("tracking_uri") != self.tracking_uri:
                return None
            run = self.client.get_run(state["run_id"])
        except Exception:  # noqa: BLE001 - no file, a foreign file, a run this store lacks: start a new run
            return None
        if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
            return None
        return run.info.run_id, dict(state.get("candidates", {}))

    def _write_state(self, complete: bool) -> None:
        """The run directory's mlflow.json: where the run is, and whether MLflow holds all of it."""
        if self.state_file is None:
            return
        from evals.rundir import write_json

        state = {"tracking_uri": self.tracking_uri, "run_id": self.parent_id, "candidates": self.candidate_ids}
        write_json(self.state_file, {**state, "complete": complete})

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters.
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def start_candidate(self, policy: str, params: dict[str, Any]) -> None:
        assert self.experiment_id is not None and self.parent_id is not None
        if policy in self.candidate_ids:  # reopened
            self.client.update_run(self.candidate_ids[policy], status="RUNNING")
            return
        tags = {"mlflow.parentRunId": self.parent_id, "policy": policy, "suite": self.experiment_name}
        run = self.client.create_run(self.experiment_id, run_name=policy, tags=tags)
        self.candidate_ids[policy] = run.info.run_id
        self._log_params(run.info.run_id, params)
        self._write_state(complete=False)

    def log_earlier_images(self, images: list[tuple[str, str, Path, Path]]) -> None:
        """A resumed run's images from before the interruption, when its MLflow run is a new one:
        (candidate, sample id, image, reference image)."""
        if self.reopened:
            return
        logged: set[str] = set()
        for policy, sample_id, path, reference in images:
            if sample_id not in logged:
                self.log_reference_image(sample_id, reference)
                logged.add(sample_id)
            self.log_candidate_image(policy, sample_id, path, reference)

    def log_reference_image(self, sample_id: str, path: Path) -> None:
        assert self.parent_id is not None
        self._log_keyed_image(self.parent_id, sample_id, load_png(path), png=path)

    def log_candidate_image(self, policy: str, sample_id: str, path: Path, reference: Path) -> None:
        """The candidate image, and beside it a grid (reference | candidate | difference heatmap)."""
        from evals.reports.images import comparison_grid

        image = load_png(path)
        run_id = self.candidate_ids[policy]
        self._log_keyed_image(run_id, sample_id, image, png=path)
        self._log_keyed_image(run_id, f"grid-{sample_id}", comparison_grid(load_png(reference), image))

    def _log_keyed_image(self, run_id: str, key: str, image: Any, png: Path | None = None) -> None:
        """What `MlflowClient.log_image(run_id, image, key=key, step=0)` stores (MLflow 3: under
        `images/`, `<key>+step+0+timestamp+<ms>+<uuid>.png` and a `+compressed.webp` thumbnail, and
        the run's logged-images tag), in one upload and with less work: `png`, the file the run
        directory holds already, is copied instead of encoded again (log_image re-encodes at PNG's
        slow default level: 85 ms for a 512-pixel grid here), a grid at a fast level, and the tag is
        set once per run. tests/test_tracking_images.py checks the names against log_image's own."""
        import shutil
        import tempfile
        import uuid

        from mlflow.tracking.multimedia import compress_image_size
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES
        from PIL import Image

        picture = Image.fromarray(image)
        stem = f"{key.replace('/', '~')}+step+0+timestamp+{_now_ms()}+{uuid.uuid4()}"
        with tempfile.TemporaryDirectory(prefix="evals-image-") as tmp:
            if png is not None:
                shutil.copyfile(png, Path(tmp) / f"{stem}.png")
            else:
                picture.save(Path(tmp) / f"{stem}.png", compress_level=1)
            compress_image_size(picture).save(Path(tmp) / f"{stem}+compressed.webp")
            self.client.log_artifacts(run_id, tmp, "images")
        with self._images_lock:
            if run_id not in self._runs_with_images:
                self.client.set_tag(run_id, MLFLOW_LOGGED_IMAGES, True)
                self._runs_with_images.add(run_id)

    def finish_candidate(
        self,
        policy: str,
        metrics: dict[str, float],
        table: dict[str, list[Any]],
        artifacts: list[Path],
        tags: dict[str, str],
    ) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.candidate_ids[policy]
        stamp = _now_ms()
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, stamp, 0) for k, v in _finite_metrics(metrics).items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        self.client.log_table(run_id, data=table, artifact_file="samples.json")
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        if "verdict" in tags:
            from evals.mlflow_review import candidate_run_name

            self.client.update_run(run_id, name=candidate_run_name(policy, tags["verdict"] == "pass"))
        self.client.set_terminated(run_id, "FINISHED")
        self._ended.add(run_id)

    def finish_run(
        self,
        artifacts: list[Path],
        tags: dict[str, str],
        failed: bool,
        metrics: dict[str, float] | None = None,
        name: str | None = None,
    ) -> None:
        """The parent's tags, headline metrics (`<candidate>/psnr_mean`, ...), files and name; the
        experiment's review view lists its candidates' columns; mlflow.json says MLflow has it all."""
        from mlflow.entities import Metric, RunTag

        from evals import mlflow_review

        assert self.parent_id is not None and self.experiment_id is not None
        self.client.log_batch(
            self.parent_id,
            metrics=[Metric(k, v, _now_ms(), 0) for k, v in _finite_metrics(metrics or {}).items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        if self._monitor is not None:
            _stop_system_metrics(self._monitor)
            self._monitor = None
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path))
        if metrics:
            means = {k.split("/", 1)[1].removesuffix("_mean") for k in metrics if "/" in k and k.endswith("_mean")}
            headline = _headline_order(means)
            mlflow_review.save_review_view(self.client, self.experiment_id, list(self.candidate_ids), headline)
        if name:
            self.client.update_run(self.parent_id, name=name)
        self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")
        self._ended.add(self.parent_id)
        self._write_state(complete=True)

    def interrupted(self) -> None:
        """The run broke or was stopped: its runs end as KILLED instead of staying RUNNING (a resume
        reopens them)."""
        for run_id in [*self.candidate_ids.values(), self.parent_id]:
            if run_id is not None and run_id not in self._ended:
                self.client.set_terminated(run_id, "KILLED")
        if self._monitor is not None:
            _stop_system_metrics(self._monitor)
            self._monitor = None

    def baselines(self, experiment: str, policies: list[str]) -> dict[str, dict[str, float]] | None:
        """Policy -> summary metrics of its accepted baseline run in this suite's experiment."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return {}
        out: dict[str, dict[str, float]] = {}
        for policy in policies:
            runs = self.client.search_runs(
                [found.experiment_id],
                filter_string=f"tags.baseline = 'true' and tags.policy = '{policy}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                out[policy] = dict(runs[0].data.metrics)
        return out

    def accept(self, run_id: str, force: bool = False) -> list[tuple[str, str, str | None]]:
        """Make a run the baseline of its suite for each of its policies (a parent run: all its
        candidates; a candidate run: its policy); the previous baselines are unmarked. A candidate
        whose verdict failed is refused unless `force`. Returns (policy, run id, replaced run id)."""
        run = self.client.get_run(run_id)
        if "policy" in run.data.tags:
            candidates = [run]
        else:
            candidates = self.client.search_runs(
                [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
            )
        if not candidates:
            raise ValueError(f"run {run_id} has no candidate runs to accept")
        failed = sorted(c.data.tags["policy"] for c in candidates if c.data.tags.get("verdict") == "fail")
        if failed and not force:
            raise ValueError(f"{', '.join(failed)} failed gates in this run; a baseline must be a build you accept")
        accepted = []
        for candidate in candidates:
            policy = candidate.data.tags["policy"]
            previous = self.client.search_runs(
                [run.info.experiment_id], filter_string=f"tags.baseline = 'true' and tags.policy = '{policy}'"
            )
            for old in previous:
                self.client.set_tag(old.info.run_id, "baseline", "false")
            self.client.set_tag(candidate.info.run_id, "baseline", "true")
            replaced = next((o.info.run_id for o in previous if o.info.run_id != candidate.info.run_id), None)
            accepted.append((policy, candidate.info.run_id, replaced))
        return accepted


def _headline_order(metrics: set[str]) -> list[str]:
    first = [m for m in ("psnr", "ssim", "lpips", "clip_score") if m in metrics]
    return first + sorted(metrics - set(first))


def _system_metrics(run_id: str, tracking_uri: str) -> Any:
    """MLflow's system metrics (CPU, memory, GPU through pynvml) sampled every 2 s into the run,
    when psutil is installed; None otherwise."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=2, tracking_uri=tracking_uri)
        monitor.first_step = monitor._logging_step  # type: ignore[attr-defined]
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 - optional: psutil missing, or no way to sample here
        return None


def _stop_system_metrics(monitor: Any) -> None:
    """Stop MLflow's sampler. It publishes only after its first 2-second interval, so a shorter run
    (MLflow opened beside the first batch) gets its one sample published here."""
    monitor.finish()
    try:
        if monitor._logging_step == monitor.first_step:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
    except Exception:  # noqa: BLE001 - system metrics are a nicety; MLflow's internals may change
        pass


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def store_exists() -> bool:
    """Whether opening the MLflow store creates nothing: a tracking server, or a local sqlite file
    that is already there (MLflow's default store is ./mlflow.db)."""
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    if uri.startswith(("http://", "https://")):
        return True
    return uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).is_file()


def log_bench(report: dict[str, Any], out_dir: Path) -> str | None:
    """One MLflow run in experiment `bench`: every variant's figures as `<variant>/<figure>` metrics."""
    try:
        tracker = MlflowTracker()
        params = {"model": report["model"], **report["setup"], "device_kind": report["environment"]["device_kind"]}
        tracker.start_run("bench", out_dir.name, params, {"run_dir": str(out_dir)})
        assert tracker.parent_id is not None
        metrics: dict[str, float] = {}
        for r in report["results"]:
            figures = ("step_ms", "compile_s", "weights_gib", "peak_gib", "pipeline_s_per_image")
            for key in (*figures, "pipeline_weights_gib", "pipeline_peak_gib"):
                if r.get(key) is not None:
                    metrics[f"{r['name']}/{key}"] = float(r[key])
        for name, ratio in report["ratios"].items():
            metrics.update({f"{name}/{k}": v for k, v in ratio.items()})
        from mlflow.entities import Metric

        stamp = _now_ms()
        tracker.client.log_batch(tracker.parent_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()])
        tracker.finish_run([out_dir / "bench.json", out_dir / "bench.md"], {}, failed=False)
        return tracker.tracking_uri
    except Exception as exc:  # noqa: BLE001 - the figures are in the bench directory either way
        log.warning(f"MLflow logging failed ({type(exc).__name__}: {exc}); see {out_dir}")
        return None
