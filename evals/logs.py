"""Messages for people: warnings and progress lines go through `logging` (loggers `evals.*`,
`evals.models.*` among them); the CLI shows them on stderr as `warning: ...`, `error: ...` and plain progress lines.

Used as a library (the pytest plugin, `evals.api`), nothing is configured here: Python shows
warnings and errors only, so tests stay quiet unless they ask.
"""

from __future__ import annotations

import logging
import sys

PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return PREFIX.get(record.levelno, "") + record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (a test's capture, a redirect made
    after the CLI started), not to the stream it was created with."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


_handler: logging.Handler | None = None


def setup_cli_logging(verbosity: int = 0) -> None:
    """Progress lines and warnings to the current stderr (-q: warnings only; -v: debug too). Called
    once per CLI invocation; a second call replaces the first's handler."""
    global _handler
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("evals")
    if _handler is not None:
        logger.removeHandler(_handler)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # shown once, by this handler
    _handler = handler
