"""The tracker a run talks to, and how it is opened: `BackgroundTracker` opens the real tracker
(MLflow) and logs to it on worker threads, so that MLflow overlaps generation, and owns its errors:
the first one becomes one warning and stops tracking; the run goes on, complete in its run
directory."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from evals.tracker_protocol import NullTracker, Tracker

if TYPE_CHECKING:
    from evals.tracking import MlflowTracker

log = logging.getLogger(__name__)
T = TypeVar("T")
Call = Callable[[Tracker], object]


class BackgroundTracker:
    """A Tracker. One worker thread opens the inner tracker (importing MLflow and checking the store
    take seconds) and starts the runs, in order; the images go to a few threads of their own
    (decoding, encoding and copying release the GIL). Every other call first waits for the opening
    and everything queued, images included."""

    IMAGE_THREADS = 4

    def __init__(self, open_inner: Callable[[], Tracker]):
        self.inner: Tracker | None = None
        self.failed: str | None = None
        """Why tracking stopped: the inner tracker's first error."""
        self._queue: queue.Queue[tuple[Call, bool]] = queue.Queue()
        self._opened = threading.Event()
        self._images = ThreadPoolExecutor(max_workers=self.IMAGE_THREADS, thread_name_prefix="mlflow-images")
        self._worker = threading.Thread(target=self._drain_forever, args=(open_inner,), name="mlflow", daemon=True)
        self._worker.start()

    def wait(self) -> None:
        """Until the inner tracker is open (or could not be) and everything queued is done."""
        self._opened.wait()
        self._queue.join()

    # Queued: the caller goes on at once.
    def start_run(
        self,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        state_file: Path | None = None,
    ) -> None:
        self._queue.put((lambda t: t.start_run(experiment, run_name, params, tags, state_file), False))

    def start_candidate(self, policy: str, params: dict[str, Any]) -> None:
        self._queue.put((lambda t: t.start_candidate(policy, params), False))

    def log_earlier_images(self, images: list[tuple[str, str, Path, Path]]) -> None:
        self._queue.put((lambda t: t.log_earlier_images(images), False))

    def log_reference_image(self, sample_id: str, path: Path) -> None:
        self._queue.put((lambda t: t.log_reference_image(sample_id, path), True))

    def log_candidate_image(self, policy: str, sample_id: str, path: Path, reference: Path) -> None:
        self._queue.put((lambda t: t.log_candidate_image(policy, sample_id, path, reference), True))

    # After everything queued: these end runs, or answer.
    def finish_candidate(
        self,
        policy: str,
        metrics: dict[str, float],
        table: dict[str, list[Any]],
        artifacts: list[Path],
        tags: dict[str, str],
    ) -> None:
        self._after_queue(lambda t: t.finish_candidate(policy, metrics, table, artifacts, tags))

    def finish_run(
        self,
        artifacts: list[Path],
        tags: dict[str, str],
        failed: bool,
        metrics: dict[str, float] | None = None,
        name: str | None = None,
    ) -> None:
        self._after_queue(lambda t: t.finish_run(artifacts, tags, failed, metrics, name))

    def interrupted(self) -> None:
        self._after_queue(lambda t: t.interrupted())

    def baselines(self, experiment: str, policies: list[str]) -> dict[str, dict[str, float]] | None:
        return self._after_queue(lambda t: t.baselines(experiment, policies))

    def _after_queue(self, call: Callable[[Tracker], T]) -> T | None:
        self.wait()
        return self._guarded(call)

    def _guarded(self, call: Callable[[Tracker], T]) -> T | None:
        """The call's answer; None once tracking has failed. Any tracking failure must not lose the
        run: the first is reported once and tracking stops."""
        if self.failed or self.inner is None:
            return None
        try:
            return call(self.inner)
        except Exception as exc:  # noqa: BLE001 - see above
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning(
                f"MLflow logging failed and is off for the rest of this run ({self.failed}); "
                "results are complete in the run directory; `evals log RUN_DIR` uploads them later"
            )
            return None

    def _drain_forever(self, open_inner: Callable[[], Tracker]) -> None:
        try:
            self.inner = open_inner()  # never raises: NullTracker when the store cannot be opened
        finally:
            self._opened.set()
        while True:
            call, is_image = self._queue.get()
            if is_image:  # the run it goes to is started: the queue is in order
                future = self._images.submit(self._guarded, call)
                future.add_done_callback(lambda _: self._queue.task_done())  # a join waits for it
                continue
            try:
                self._guarded(call)
            finally:
                self._queue.task_done()


def _open_mlflow(seconds: float) -> Tracker:
    """The MLflow tracker; a store that cannot be opened (a tracking server that does not answer
    within `seconds`: evals.mlflow_reach) costs the run its MLflow view, with a warning, never the
    run itself."""
    try:
        from evals.mlflow_reach import open_mlflow

        return open_mlflow(seconds)
    except Exception as exc:  # noqa: BLE001 - any store failure: the run directory still gets everything
        from evals.mlflow_reach import MlflowUnavailable

        reason = str(exc) if isinstance(exc, MlflowUnavailable) else f"{type(exc).__name__}: {exc}"
        log.warning(
            f"MLflow is unavailable ({reason}); results go to the run directory only; "
            "`evals log RUN_DIR` uploads them later"
        )
        return NullTracker()


def open_tracker(enabled: bool) -> BackgroundTracker | NullTracker:
    """The run's tracker: MLflow, opened by a worker thread while the run goes on, or NullTracker.
    A bad EVALS_MLFLOW_TIMEOUT is an InputError, raised here, on the caller's thread."""
    return open_mlflow_in_background() if enabled else NullTracker()


def open_mlflow_in_background() -> BackgroundTracker:
    """The MLflow tracker, opened by a worker thread while the caller goes on. A bad
    EVALS_MLFLOW_TIMEOUT is an InputError, raised here, on the caller's thread."""
    from evals.mlflow_reach import budget

    seconds = budget()
    return BackgroundTracker(lambda: _open_mlflow(seconds))


def mlflow_tracker(tracker: Tracker) -> MlflowTracker | None:
    """The MLflow tracker behind a run's tracker, once everything queued is done; None when there is
    none or its logging failed."""
    from evals.tracking import MlflowTracker

    if isinstance(tracker, BackgroundTracker):
        tracker.wait()
        if tracker.failed:
            return None
        tracker = tracker.inner  # type: ignore[assignment]
    return tracker if isinstance(tracker, MlflowTracker) else None
