"""The wrappers around a tracker that keep a run going whatever MLflow does: `GuardedTracker` turns
the first error into one warning and stops tracking; `BackgroundTracker` opens the tracker and logs
on worker threads so that MLflow overlaps generation."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class GuardedTracker:
    """Wraps a tracker: the first error is reported once and tracking stops; the run goes on."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.failed: str | None = None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.failed:
                return None
            try:
                return method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any tracking failure must not lose the run
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning(
                    f"MLflow logging failed and is off for the rest of this run ({self.failed}); "
                    "results are complete in the run directory; `evals log RUN_DIR` uploads them later"
                )
                return None

        return guarded


class BackgroundTracker:
    """One worker thread opens the tracker (importing MLflow and checking the store take seconds)
    and starts the runs, in order; the images go to a few threads of their own (decoding, encoding
    and copying release the GIL), so that all of it overlaps generation. Every other call first
    waits for everything queued, images included."""

    QUEUED = ("start_run", "start_candidate", "log_earlier_images", "log_reference_image", "log_candidate_image")
    IMAGES = ("log_reference_image", "log_candidate_image")
    IMAGE_THREADS = 4

    def __init__(self, open_inner: Callable[[], Any]):
        import queue
        from concurrent.futures import ThreadPoolExecutor

        self.inner: Any = None
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._queue.put(("", (open_inner,)))
        self._images = ThreadPoolExecutor(max_workers=self.IMAGE_THREADS, thread_name_prefix="mlflow-images")
        self._worker = threading.Thread(target=self._drain_forever, name="mlflow", daemon=True)
        self._worker.start()

    def wait(self) -> None:
        """Until everything queued is done."""
        self._queue.join()

    @property
    def failed(self) -> str | None:
        return getattr(self.inner, "failed", None)

    def _drain_forever(self) -> None:
        while True:
            item = self._queue.get()
            done_later = False
            try:
                if item is not None:
                    name, args = item
                    if not name:
                        self.inner = args[0]()  # opening: never raises (NullTracker on failure)
                    elif name in self.IMAGES:  # the runs they go to are started: the queue is in order
                        future = self._images.submit(getattr(self.inner, name), *args)
                        future.add_done_callback(lambda _: self._queue.task_done())  # joins wait for it
                        done_later = True
                    else:
                        getattr(self.inner, name)(*args)  # the guarded tracker: errors become one warning
            finally:
                if not done_later:
                    self._queue.task_done()

    def __getattr__(self, name: str) -> Any:
        if name in self.QUEUED:
            return lambda *args: self._queue.put((name, args))

        def after_queue(*args: Any, **kwargs: Any) -> Any:
            self._queue.join()
            return getattr(self.inner, name)(*args, **kwargs)

        return after_queue
