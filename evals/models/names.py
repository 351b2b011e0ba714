"""The one rule for names that become paths: suite names, case and sample ids, candidate and policy
names, baseline names. Whatever their source (a YAML file, a checkpoint's metadata, a run.json read
on resume, the command line), they are checked here before they are joined to a folder.

Lower-case letters, digits, '_', '.', '-', starting with a letter or digit, at most 64 characters:
no separator, no `..`, no hidden file, and no two names that differ only in case (which would be
one file on a case-insensitive file system). Also the mode new files get. Imports no torch.
"""

from __future__ import annotations

import os
import re

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


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it
USUAL_FILE_MODE = 0o666 & ~_UMASK
"""What a new file gets from the user's umask: a file written through mkstemp (private, 0600)
is given this before it is renamed into place."""
