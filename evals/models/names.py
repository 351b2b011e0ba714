"""The one rule for names that become paths: suite names, case and sample ids, candidate and policy
names, baseline names. Whatever their source (a YAML file, a checkpoint's metadata, a run.json read
on resume, the command line), they are checked here before they are joined to a folder.

Lower-case letters, digits, '_', '.', '-', starting with a letter or digit, at most 64 characters:
no separator, no `..`, no hidden file, and no two names that differ only in case (which would be
one file on a case-insensitive file system). Imports no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from evals.models.yamlspec import InputError

SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SAFE_NAME_RULE = "lower-case letters, digits, '_', '.', '-', starting with a letter or digit, at most 64"


def is_safe_name(name: object) -> bool:
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None  # `$` would let a final newline by


def check_name(name: object, what: str) -> str:
    """`name` itself when it may name a file; else an InputError that says `what` it is and where it
    came from (e.g. "metadata 'policy' of x.safetensors")."""
    if not is_safe_name(name):
        raise InputError(f"{what}: {name!r} must match {SAFE_NAME.pattern} ({SAFE_NAME_RULE}): it names files")
    assert isinstance(name, str)
    return name


def tame_name(text: str) -> str:
    """A free text (a file's stem) made into a safe name: lower-cased, runs of other characters
    become '-'; empty results become 'unnamed'."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-._")[:64].rstrip("-._")
    return name or "unnamed"


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative` when `relative` stays inside `root` (no absolute path, no `..`, no link
    leading out); else an InputError naming `what`."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise InputError(f"{what}: {relative!r} is not a path inside {root}")
    path = root / candidate
    if not path.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{what}: {relative!r} leads out of {root}")
    return path
