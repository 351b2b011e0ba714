"""The production log `evals monitor` reads: JSON Lines, one generation per line (docs/production.md).

    {"id": "req-000123", "prompt": "a red cube", "seed": 42, "image": "images/req-000123.png",
     "height": 1024, "width": 1024, "steps": 28, "guidance": 4.5, "tags": ["objects"]}

`prompt`, `seed` and `image` (a file, relative to the log's folder) are required; generation settings
left out are the suite's; `id` (default `line-<n>`) names the entry's files; `max_sequence_length`,
`tags` and `seconds` (the time production took for the image) are optional. Every line is checked
before any work: a bad one is an InputError naming the file and line. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError

from evals.models.names import check_name
from evals.models.yamlspec import MAX_SEED, InputError, StrictModel
from evals.suite_schema import MAX_GUIDANCE, MAX_SEQUENCE_LENGTH, MAX_SIDE, MAX_STEPS
from evals.suite_types import SIDE_MULTIPLE, Generation, Suite


class LogLine(StrictModel):
    """One production generation."""

    id: str | None = None
    prompt: str = Field(min_length=1)
    seed: int = Field(ge=0, le=MAX_SEED)
    image: str = Field(min_length=1)
    height: int | None = Field(None, ge=SIDE_MULTIPLE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)
    width: int | None = Field(None, ge=SIDE_MULTIPLE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    max_sequence_length: int | None = Field(None, ge=1, le=MAX_SEQUENCE_LENGTH)
    tags: list[str] = Field(default_factory=list)
    seconds: float | None = Field(None, ge=0, allow_inf_nan=False)


@dataclass(frozen=True)
class LogEntry:
    id: str
    """Names the entry's files and its record (`<id>-s<seed>`)."""
    line: int
    """Where it is in the log, for errors."""
    prompt: str
    seed: int
    image: Path
    """The logged image, resolved against the log's folder."""
    generation: Generation
    """Its generation settings (the suite's where the line gives none)."""
    tags: tuple[str, ...] = ()
    seconds: float | None = None


def read_log(path: Path, suite: Suite) -> list[LogEntry]:
    """Every entry of the log, checked; the images must exist. InputError naming file and line."""
    if not path.is_file():
        raise InputError("no such log file (JSON Lines: one generation per line)", source=str(path))
    entries: list[LogEntry] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                given = LogLine.model_validate(json.loads(raw.decode("utf-8")))
            except (ValueError, ValidationError, RecursionError) as exc:
                why = str(exc).splitlines()
                raise InputError(f"bad log line: {'; '.join(why[:3])}", source=str(path), line=number) from exc
            entry_id = given.id if given.id is not None else f"line-{number}"
            try:
                check_name(entry_id, "id")
            except InputError as exc:
                raise InputError(str(exc), source=str(path), line=number) from exc
            if entry_id in seen:
                raise InputError(f"id {entry_id!r} is also on line {seen[entry_id]}", source=str(path), line=number)
            seen[entry_id] = number
            image = Path(given.image) if Path(given.image).is_absolute() else path.parent / given.image
            if not image.is_file():
                raise InputError(f"image {given.image!r}: no such file ({image})", source=str(path), line=number)
            g = suite.generation
            generation = Generation(
                height=given.height or g.height,
                width=given.width or g.width,
                steps=given.steps or g.steps,
                guidance=g.guidance if given.guidance is None else given.guidance,
                batch_size=g.batch_size,
                max_sequence_length=given.max_sequence_length or g.max_sequence_length,
            )
            tags = tuple(given.tags)
            entries.append(LogEntry(entry_id, number, given.prompt, given.seed, image, generation, tags, given.seconds))
    if not entries:
        raise InputError("the log holds no generation", source=str(path))
    return entries


def sample_key(entry: LogEntry) -> float:
    """A number in [0, 1) fixed by the entry's id, prompt and seed: the sample does not depend on the
    log's order, and an entry sampled once is sampled again when the log grows."""
    digest = hashlib.sha256(f"{entry.id}\0{entry.prompt}\0{entry.seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sampled(entries: list[LogEntry], rate: float | None = None, count: int | None = None) -> set[str]:
    """The ids whose reference is regenerated: those whose `sample_key` is below `rate`, or the
    `count` with the smallest keys; the whole log when neither is given."""
    if rate is not None:
        return {e.id for e in entries if sample_key(e) < rate}
    if count is not None:
        return {e.id for e in sorted(entries, key=sample_key)[:count]}
    return {e.id for e in entries}
