"""Reading a safetensors file that may be anything: every failure to read it is one InputError
naming the file (random bytes, a truncated download, a Git LFS pointer). Imports no torch itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError


@contextmanager
def opened_safetensors(path: Path, hint: str = "") -> Iterator[Any]:
    """`safetensors.safe_open(path)` for the block; what it raises while the file is read becomes an
    InputError naming `path`, with `hint` (what was expected, how to get it) after it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})" + (f"; {hint}" if hint else "")) from exc
