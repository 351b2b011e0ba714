"""Strict YAML input: load with line numbers, validate against a typed model (pydantic), fail with
file:line, key and "did you mean".

Shared by precision policies (`evals.models.precision`) and suites (`evals.suite`): it lives in
`evals.models`, the lower layer, so that `evals.models` imports nothing else from `evals`. The typed
models are the one description of a file's keys: they validate it and publish its JSON Schema.
Imports no torch.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

T = TypeVar("T")

MAX_YAML_BYTES = 1 << 20  # suites and policies are small; a huge file is a mistake or an attack
MAX_YAML_DEPTH = 32  # nested mappings and lists: the shipped files need 4; PyYAML's composer recurses
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


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


def _node_lines(node: yaml.Node, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int], source: str) -> None:
    """The line of every key path under `node`. A key given twice in one mapping is an error: PyYAML
    would keep the last value without a word."""
    out.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):  # `steps` and "steps" are one key: same tag, same text
                if (key_node.tag, key) in first:
                    where = f"{format_key_path(prefix)}: " if prefix else ""
                    message = f"{where}duplicate key {key!r} (first at line {first[key_node.tag, key]})"
                    raise InputError(message, source=source, line=line)
                first[key_node.tag, key] = line
            out[prefix + (key,)] = line
            _node_lines(value_node, prefix + (key,), out, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, prefix + (index,), out, source)


def _check_events(text: str, path: Path, what: str) -> None:
    """Refuse aliases and deep nesting on the event stream, which PyYAML's parser makes without
    recursing, before its composer (which recurses once per level) sees the document."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent):
            # Aliases let a few lines expand exponentially ("billion laughs"); suites never need them.
            raise InputError(f"YAML aliases (*{event.anchor}) are not allowed in a {what}", source=str(path), line=line)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                message = f"YAML nested more than {MAX_YAML_DEPTH} levels deep (mappings and lists)"
                raise InputError(message, source=str(path), line=line)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


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
        _check_events(text, path, what)
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
        _node_lines(node, (), lines, str(path))
    return YamlDoc(path, data, lines)


class StrictModel(BaseModel):
    """One YAML mapping: exactly these keys, values of exactly these types (no "3" for 3, no `true`
    for 1; an integer is a number), every number finite (no `.nan`, `.inf`): inherited by every model
    of a suite or policy, nested ones and `float | None` fields included."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


M = TypeVar("M", bound=BaseModel)


def validate(doc: YamlDoc, model: type[M]) -> M:
    """The document as `model`; every structural problem at once, each an InputError naming the
    file, line and key, with "did you mean" for unknown keys and values."""
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        errors = Errors()
        said: set[str] = set()
        for error in exc.errors(include_url=False):
            path, message = _explain(error, json_schema(model))
            found = doc.error(path, message)
            if str(found) not in said:  # a union reports one problem once per member
                said.add(str(found))
                errors.found.append(found)
        errors.raise_any()
        raise AssertionError("unreachable: a ValidationError has errors") from exc


@functools.cache
def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


_BOUNDS = {  # pydantic's error type: the sign and the name of the bound in the error's context
    "greater_than_equal": (">=", "ge"),
    "less_than_equal": ("<=", "le"),
    "greater_than": (">", "gt"),
    "less_than": ("<", "lt"),
}


def _number(x: Any) -> str:
    """A bound: an integer in full (2**64 - 1, not 1.84467e+19), a float as short as it reads (0, not 0.0)."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def _explain(error: ErrorDetails, schema: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """(key path, message) of one pydantic error, in this project's words."""
    loc, kind, value, ctx = tuple(error["loc"]), error["type"], error["input"], error.get("ctx", {})
    if loc and loc[-1] == "[key]":  # a mapping key outside its allowed names
        loc = loc[:-1]
        names = subschema(schema, loc[:-1]).get("propertyNames", {}).get("enum", [])
        return loc, "unknown key" + did_you_mean(str(loc[-1]), names)
    if kind == "missing":
        return loc[:-1], f"missing required key {loc[-1]!r}"
    if kind == "extra_forbidden":
        return loc, "unknown key" + did_you_mean(str(loc[-1]), subschema(schema, loc[:-1]).get("properties", {}))
    if kind == "literal_error":
        choices = [str(c) for c in subschema(schema, loc).get("enum", [])]
        return loc, f"unknown value {value!r}" + did_you_mean(str(value), choices)
    number = "an integer" if isinstance(value, int) and subschema(schema, loc).get("type") == "integer" else "a number"
    if kind in _EXPECTED:
        got = repr(value) if isinstance(value, bool) or value is None else f"{type(value).__name__} {value!r}"
        why = subschema(schema, loc).get("description")
        return loc, f"expected {_EXPECTED[kind]}, got {got}" + (f" ({why})" if why else "")
    if kind in _BOUNDS:
        sign, name = _BOUNDS[kind]
        return loc, f"expected {number} {sign} {_number(ctx[name])}, got {value}"
    if kind == "finite_number":
        return loc, f"expected a finite number, got {value}"
    if kind == "multiple_of":
        return loc, f"expected a multiple of {ctx['multiple_of']}, got {value}"
    if kind == "too_short":
        return loc, f"expected at least {ctx['min_length']} item(s), got none"
    if kind == "string_pattern_mismatch":
        why = subschema(schema, loc).get("description")
        return loc, f"{loc[-1]} {value!r} must match {ctx['pattern']}" + (f" ({why})" if why else "")
    return loc, str(error["msg"]).removeprefix("Value error, ")


def subschema(schema: dict[str, Any], key_path: tuple[Any, ...]) -> dict[str, Any]:
    """The part of a JSON Schema that describes the value at `key_path` ({} where none does)."""
    node = _resolve(schema, schema)
    for part in key_path:
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            extra = node.get("additionalProperties")
            node = extra if isinstance(extra, dict) else {}
        node = _resolve(node, schema)
    return node


def _resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow `$ref`s and the non-null member of an `X | None`."""
    while True:
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        elif "anyOf" in node:
            members = [n for n in node["anyOf"] if n.get("type") != "null"]
            if len(members) != 1:
                return node
            outer = {k: node[k] for k in ("description",) if k in node}  # an `X | None` field's description
            node = {**outer, **members[0]}
        else:
            return node
