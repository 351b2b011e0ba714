"""FP8 SD3.5 quality gate: suites, metrics, detectors, gates and MLflow logging."""

import time

STARTED = time.perf_counter()
"""When this package was first imported: a run's start-up (imports, models) is counted from here."""
