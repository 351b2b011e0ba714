"""FP8 SD3.5 quality gate: suites, metrics, detectors, gates and MLflow logging."""

import time

STARTED = time.perf_counter()
"""When this package was first imported: a process's first run counts its start-up from here."""
_runs_started = 0


def startup_origin() -> float:
    """Where a run's start-up is counted from: the package's import for the first run of a process
    (its imports are part of it), the call itself for later ones (pytest plugin, sweeps)."""
    global _runs_started
    _runs_started += 1
    return STARTED if _runs_started == 1 else time.perf_counter()
