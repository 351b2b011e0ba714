"""The run directory: the source of truth of a run (MLflow is a view of it).

runs/<utc-stamp>-<suite>/ run.json, records.jsonl, images/ref/, images/<policy>/, plans/,
summary.json, verdict.json, summary.md; notes.json (what the run had to change) and mlflow.json
(where MLflow holds it) when there is something to say. Every JSON file is written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def new_run_dir(runs_root: Path, suite_name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = runs_root / f"{stamp}-{suite_name}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def _renamed_into(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` once written (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    yield tmp
    os.replace(tmp, path)


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
