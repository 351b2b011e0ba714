"""Strict YAML input: load with line numbers, check keys and types, fail with file:line and key.

Shared by precision policies (`evals.models.precision`) and suites (`evals.suite`): it lives in `models`, the
lower layer, so that `models` imports nothing from `evals`. Imports no torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

MAX_YAML_BYTES = 1 << 20  # suites and policies are small; a huge file is a mistake or an attack


class InputError(Exception):
    """Bad input from a user (a file, a key, an argument). The CLI turns it into exit code 2."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        self.source = source
        self.line = line
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {message}" if source else message)


class Errors:
    """The errors of a file's independent parts, so that one pass reports all of them (a part that
    depends on a broken one is not checked: its errors would only echo the first)."""

    def __init__(self) -> None:
        self.found: list[InputError] = []

    def attempt(self, parse: Callable[[], T], fallback: T) -> T:
        try:
            return parse()
        except InputError as exc:
            self.found.append(exc)
            return fallback

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            self.found.sort(key=lambda e: e.line or 0)
            first = self.found[0]
            error = InputError(f"{len(self.found)} errors:\n" + "\n".join(f"  {e}" for e in self.found))
            error.source, error.line = first.source, first.line
            raise error


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; expected one of: {', '.join(choices)}"


class YamlDoc:
    """A parsed YAML file plus the line of every key path, for error messages."""

    def __init__(self, path: Path, data: Any, lines: dict[tuple[Any, ...], int]):
        self.path = path
        self.data = data
        self._lines = lines

    def line(self, key_path: tuple[Any, ...]) -> int | None:
        # Fall back to the nearest enclosing key that has a line.
        for n in range(len(key_path), -1, -1):
            if key_path[:n] in self._lines:
                return self._lines[key_path[:n]]
        return None

    def error(self, key_path: tuple[Any, ...], message: str) -> InputError:
        dotted = format_key_path(key_path)
        text = f"{dotted}: {message}" if dotted else message
        return InputError(text, source=str(self.path), line=self.line(key_path))


def format_key_path(key_path: tuple[Any, ...]) -> str:
    out = ""
    for part in key_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _node_lines(node: yaml.Node, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            out[prefix + (key,)] = key_node.start_mark.line + 1
            _node_lines(value_node, prefix + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, prefix + (index,), out)


def load_yaml(path: str | Path, what: str) -> YamlDoc:
    """Read a YAML mapping safely; every problem is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found", source=str(path))
    if path.stat().st_size > MAX_YAML_BYTES:
        raise InputError(f"{what} file is larger than {MAX_YAML_BYTES} bytes", source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} file: {exc}", source=str(path)) from exc
    try:
        # Aliases let a few lines expand exponentially ("billion laughs"); suites never need them.
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else None
                raise InputError(
                    f"YAML aliases (*{event.anchor}) are not allowed in a {what}", source=str(path), line=line
                )
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"invalid YAML: {problem}", source=str(path), line=line) from exc
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise InputError(f"a {what} must be a YAML mapping, got {kind}", source=str(path), line=1)
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    return YamlDoc(path, data, lines)


def check_mapping(
    doc: YamlDoc,
    value: Any,
    key_path: tuple[Any, ...],
    *,
    required: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> Mapping[str, Any]:
    """Assert `value` is a mapping with exactly the allowed keys."""
    if not isinstance(value, dict):
        raise doc.error(key_path, f"expected a mapping, got {type(value).__name__}")
    required, optional = set(required), set(optional)
    allowed = required | optional
    for key in value:
        if key not in allowed:
            raise doc.error(key_path + (key,), "unknown key" + did_you_mean(str(key), allowed))
    for key in sorted(required - set(value)):
        raise doc.error(key_path, f"missing required key {key!r}")
    return value


def expect(doc: YamlDoc, value: Any, key_path: tuple[Any, ...], kind: type | tuple[type, ...], what: str) -> Any:
    """Assert a value's type (bool is never accepted as a number)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise doc.error(key_path, f"expected {what}, got {value!r}")
    if not isinstance(value, kinds):
        raise doc.error(key_path, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def expect_choice(doc: YamlDoc, value: Any, key_path: tuple[Any, ...], choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise doc.error(key_path, f"unknown value {value!r}" + did_you_mean(str(value), choices))
    return value
