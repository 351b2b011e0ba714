"""nox sessions: `eval` (the CI gate on the tiny model), `tests`, `lint`, `ui` (the MLflow UI).

Each session installs what it needs into its own virtualenv on first use; torch is pinned in
pyproject.toml so pip takes the wheel already on disk instead of downloading another build.
"""

from __future__ import annotations

import nox

INSTALLING = "installing the project into this session's virtualenv (first time: a few minutes, torch is large)"

nox.options.sessions = ["eval", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def eval(session: nox.Session) -> None:
    """Run the smoke suite on the built-in tiny model, log to MLflow, apply the gates (exit code = verdict)."""
    session.log(INSTALLING)
    session.install("-e", ".")
    args = session.posargs or ["suites/smoke.yaml"]
    session.run("evals", "run", *args, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (offline; GPU tests skip without a GPU)."""
    session.log(INSTALLING)
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy."""
    session.log(INSTALLING)
    session.install("-e", ".[test,lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def ui(session: nox.Session) -> None:
    """The MLflow UI on 127.0.0.1:5000 for the store `nox -s eval` logs to (Ctrl-C stops it)."""
    session.log(INSTALLING)
    session.install("-e", ".")
    session.run("evals", "ui", *session.posargs)
