"""How long a run waits for an MLflow tracking server: `EVALS_MLFLOW_TIMEOUT` seconds (default 5).

MLflow's own client retries a refused connection, a timeout or an HTTP 5xx 7 times with exponential
backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR 2, 120 s timeout per request): about four
minutes before a dead server is an error. A run gives MLflow the budget instead: a server (http or
https tracking URI) is asked `GET /health` first, and it and the first request must answer within the
budget; and unless the user set them, MLflow's requests for the rest of the run are not retried and
time out after the budget, so a server that goes away mid-run costs one request's wait. Local stores
(sqlite, files) do no networking and are opened as before."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from evals.models.yamlspec import InputError

if TYPE_CHECKING:
    from evals.tracking import MlflowTracker

BUDGET_ENV = "EVALS_MLFLOW_TIMEOUT"
DEFAULT_BUDGET = 5.0
MAX_BUDGET = 3600.0
T = TypeVar("T")


class MlflowUnavailable(Exception):
    """The tracking server did not answer, or answered that it is broken (5xx)."""


def budget() -> float:
    """Seconds a run waits for MLflow: EVALS_MLFLOW_TIMEOUT, else 5. A value that is not a number
    of seconds above 0 and at most an hour is an InputError (exit code 2)."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_BUDGET:  # NaN too
        raise InputError(
            f"{BUDGET_ENV}={raw!r}: expected how many seconds a run waits for MLflow, a positive number "
            f"up to {MAX_BUDGET:g} (default {DEFAULT_BUDGET:g})"
        )
    return value


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def fail_fast_defaults(seconds: float) -> dict[str, str]:
    """MLflow's request settings that give up on a server within `seconds`: one try, and a timeout
    (MLflow reads it as whole seconds). With no retry, backoff and jitter do not apply."""
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(seconds)))}


def set_fail_fast_defaults(seconds: float) -> None:
    """For every later MLflow request of this process (MLflow reads them at each request); the
    user's own MLFLOW_HTTP_REQUEST_* settings stay."""
    for name, value in fail_fast_defaults(seconds).items():
        os.environ.setdefault(name, value)


def open_mlflow(seconds: float) -> MlflowTracker:
    """The MLflow tracker. A tracking server must answer within `seconds` of wall clock (its health,
    then the tracker's first request), else MlflowUnavailable; a local store opens as before."""
    import mlflow
    from mlflow import MlflowClient  # noqa: F401 - imported before the clock starts
    from mlflow.utils.rest_utils import http_request  # noqa: F401 - likewise

    from evals.tracking import MlflowTracker

    uri = mlflow.get_tracking_uri()
    if not is_server(uri):
        return MlflowTracker()
    set_fail_fast_defaults(seconds)

    def probe_then_open() -> MlflowTracker:
        probe(uri, seconds)
        return MlflowTracker(uri)

    return within(seconds, probe_then_open, _no_answer(uri, seconds))


def probe(uri: str, seconds: float) -> None:
    """`GET <uri>/health` through MLflow's HTTP client (its TLS, certificate, proxy and header
    settings), once, within `seconds`. Refused, timed out or a 5xx: MlflowUnavailable. Any other
    answer (a proxy's 401 or 404 included) leaves the verdict to MLflow's own first request."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/health",
            "GET",
            max_retries=0,
            backoff_factor=0,
            backoff_jitter=0,
            timeout=seconds,
            raise_on_status=False,
        )
    except Exception as exc:  # MLflow wraps every request error in MlflowException
        cause = _root_cause(exc)
        if isinstance(cause, TimeoutError) or "timed out" in str(cause).lower():
            raise MlflowUnavailable(_no_answer(uri, seconds)) from exc
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise MlflowUnavailable(f"{uri}: {reason or type(cause).__name__}") from exc
    if response.status_code >= 500:
        raise MlflowUnavailable(f"{uri}/health answered HTTP {response.status_code}")


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error behind MLflow's, requests' and urllib3's wrappers (a refused connection,
    a socket timeout)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _no_answer(uri: str, seconds: float) -> str:
    return f"{uri}: no answer within {seconds:g} s ({BUDGET_ENV})"


def within(seconds: float, call: Callable[[], T], timeout_message: str) -> T:
    """`call()`'s answer or error, if it comes within `seconds`; else MlflowUnavailable. A call that
    overruns is left to finish on its own daemon thread: opening a server's tracker changes nothing
    there, and its requests time out by themselves."""
    outcome: list[T] = []
    error: list[BaseException] = []

    def attempt() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=attempt, name="mlflow-open", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise MlflowUnavailable(timeout_message)
    if error:
        raise error[0]
    return outcome[0]
