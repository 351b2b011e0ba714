"""The run directory: the source of truth of a run (MLflow is a view of it).

runs/<utc-stamp>-<suite>/ run.json, records.jsonl, images/ref/, images/<policy>/, plans/,
summary.json, verdict.json, summary.md; notes.json (what the run had to change) and mlflow.json
(where MLflow holds it) when there is something to say. Every JSON file is written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import numpy as np

from evals.models.names import USUAL_FILE_MODE, check_name
from evals.models.yamlspec import InputError


def new_run_dir(runs_root: Path, suite_name: str) -> Path:
    """A new, empty run directory under `runs_root` (created with its parents); never one that exists."""
    check_name(suite_name, "suite name")
    while True:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = runs_root / f"{stamp}-{suite_name}"
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:  # another run started in the same microsecond
            continue


def check_no_links(run_dir: Path) -> None:
    """A run directory holds only its own files: a symbolic link inside one (planted, or copied in)
    would make a writer follow it out of the directory, so a run that finds one refuses to write."""
    for folder, dirs, files in os.walk(run_dir, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                raise InputError(
                    f"{run_dir}: {path.relative_to(run_dir)} is a symbolic link; a run directory holds only "
                    "the files its run wrote (remove the link, or start a new run)"
                )


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    with _renamed_into(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def _renamed_into(path: Path) -> Iterator[Path]:
    """A new temporary file beside `path` to write, renamed onto `path` once written (never half a
    file). Its name is unique and it is created exclusively, so concurrent writers of one path (the
    reference cache) never share it, and a link planted at a temporary name is never followed; the
    rename replaces a link at `path` itself rather than writing through it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, USUAL_FILE_MODE)  # mkstemp makes it private; the file gets the usual permissions
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png(path: Path, image_u8: np.ndarray) -> None:
    from PIL import Image

    with _renamed_into(path) as tmp:
        Image.fromarray(image_u8).save(tmp, format="PNG")


def copy_png(source: Path, path: Path) -> None:
    """An encoded PNG copied into place as save_png writes one."""
    import shutil

    with _renamed_into(path) as tmp:
        shutil.copyfile(source, tmp)


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def check_writable_dir(path: Path, what: str) -> None:
    """InputError (its message starting with `what`, e.g. "--runs-dir runs") unless `path` is a
    directory this process can write, or one it can create (its nearest existing parent is a writable
    directory). Creates nothing: checked before any work, so that a bad option leaves nothing behind."""
    for existing in (path, *path.parents):
        if existing.exists() or existing.is_symlink():
            break
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is not a directory)"
        raise InputError(f"{what}: expected a directory{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what}: {existing} is not writable")


class SyncedLines:
    """An append-only file of JSON lines (records, screening, votes): each write is flushed and
    synced before it returns, so a crash keeps every line written; never through a link planted at
    its name (O_NOFOLLOW): lines go to this run's file only. Thread-safe."""

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write_lines(self, lines: Iterable[str]) -> None:
        with self._lock:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
