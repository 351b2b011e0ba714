"""The published JSON Schemas: generated from the typed models, committed beside the shipped files
that name them, and as strict as the loader on everything structural (what an editor can check)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from evals.cli import main
from evals.detectors import DETECTORS
from evals.metrics import OUTPUTS
from evals.models.precision import POLICY_DIR, load_policy
from evals.models.yamlspec import InputError
from evals.schemas import committed_schema, json_schema
from evals.suite import SHIPPED_SUITES, load_suite
from tests.conftest import write

SHIPPED = [*sorted(SHIPPED_SUITES.glob("*.yaml")), *sorted(POLICY_DIR.glob("*.yaml"))]


@pytest.mark.parametrize("kind", ["suite", "policy"])
def test_committed_schemas_are_the_generated_ones(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", kind]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json_schema(kind)
    committed = committed_schema(kind)
    assert json.loads(committed.read_text()) == printed, f"stale: run `evals schema {kind} --out {committed}`"
    jsonschema.Draft202012Validator.check_schema(printed)


def test_schema_out_writes_the_file(tmp_path: Path) -> None:
    assert main(["schema", "policy", "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text()) == json_schema("policy")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_name_their_schema_and_follow_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    schema_file = path.parent / first.split("=", 1)[1]
    kind = "suite" if path.parent == SHIPPED_SUITES else "policy"
    assert schema_file == committed_schema(kind)
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(schema_file.read_text()))


def test_the_schema_offers_every_registered_name() -> None:
    """What an editor completes comes from the registries the loader uses."""
    defs = json_schema("suite")["$defs"]
    assert set(defs["Gate"]["properties"]["metric"]["anyOf"][0]["enum"]) == set(OUTPUTS)
    assert set(defs["Gate"]["properties"]["detector"]["anyOf"][0]["enum"]) == set(DETECTORS)
    assert set(defs["Generation"]["properties"]) == {
        "height", "width", "steps", "guidance", "batch_size", "max_sequence_length"
    }  # fmt: skip
    assert defs["Generation"]["required"] == ["height", "width", "steps", "guidance", "batch_size"]


SUITE = """\
name: mini
generation: {height: 64, width: 64, steps: 2, guidance: 4.5, batch_size: 3}
cases:
  - {id: a, prompt: "a red cube", seeds: [0, 1]}
metrics: [psnr]
gates:
  - {metric: psnr, stat: mean, op: ">=", value: 30}
"""

POLICY = """\
name: p
components:
  transformer:
    default: {format: e4m3fn, weights: per_channel}
    rules:
      - {match: "proj_out", precision: keep}
"""

# (kind, replace this, with this, the loader's message): each is caught by the schema too
STRUCTURAL = [
    ("suite", "batch_size: 3}", "batch_size: 3, sampler: euler}", "generation.sampler: unknown key"),
    ("suite", "steps: 2", "stpes: 2", "generation.stpes: unknown key (did you mean 'steps'?)"),
    ("suite", "height: 64", "height: 60", "generation.height: expected a multiple of 16, got 60"),
    ("suite", "steps: 2", "steps: 0", "generation.steps: expected an integer >= 1, got 0"),
    ("suite", "steps: 2", 'steps: "2"', "generation.steps: expected an integer, got str '2'"),
    ("suite", "metrics: [psnr]", "metrics: [pnsr]", "metrics[0]: unknown value 'pnsr' (did you mean 'psnr'?)"),
    ("suite", 'op: ">="', 'op: "=>"', "gates[0].op: unknown value '=>'"),
    ("suite", "seeds: [0, 1]", "seeds: [0, -1]", "cases[0].seeds[1]: expected an integer >= 0, got -1"),
    ("suite", "id: a,", "id: A B,", "cases[0].id: id 'A B' must match"),
    ("suite", "gates:\n", "gate:\n", "gate: unknown key (did you mean 'gates'?)"),
    ("policy", "weights: per_channel", "weights: per_row", "default.weights: unknown value 'per_row' (did you mean"),
    ("policy", "transformer:", "transfomer:", "components.transfomer: unknown key (did you mean 'transformer'?)"),
    ("policy", 'match: "proj_out"', "match: 3", "transformer.rules[0].match: expected a string, got int 3"),
    ("policy", "name: p", "name: a/b", "name: name 'a/b' must match"),
    # bounds: past them a value would crash or hang a run (JSON has no NaN: the loader alone refuses it)
    ("suite", "height: 64", "height: 16384", "generation.height: expected an integer <= 8192, got 16384"),
    ("suite", "steps: 2", "steps: 100000", "generation.steps: expected an integer <= 1000, got 100000"),
    ("suite", "guidance: 4.5", "guidance: 250.0", "generation.guidance: expected a number <= 100, got 250.0"),
    ("suite", "batch_size: 3", "batch_size: 5000", "generation.batch_size: expected an integer <= 1024, got 5000"),
    (
        "suite",
        "batch_size: 3}",
        "batch_size: 3, max_sequence_length: 1024}",
        "max_sequence_length: expected an integer <= 512",
    ),
    (
        "suite",
        "seeds: [0, 1]",
        "seeds: [0, 18446744073709551616]",
        "seeds[1]: expected an integer <= 18446744073709551615",
    ),
    ("suite", "gates:\n", "bench: {warmup: 5000}\ngates:\n", "bench.warmup: expected an integer <= 100, got 5000"),
    ("suite", "gates:\n", "bench: {resolution: 65536}\ngates:\n", "bench.resolution: expected an integer <= 8192"),
    (
        "suite",
        "gates:\n",
        "detector_thresholds: {flat: {min_range: 1.5}}\ndetectors: [flat]\ngates:\n",
        "detector_thresholds.flat.min_range: expected a number <= 1, got 1.5",
    ),
    (
        "suite",
        "value: 30}",
        "baseline: {max_rel_drop: -0.5}}",
        "gates[0].baseline.max_rel_drop: expected a number >= 0, got -0.5",
    ),
    (
        "policy",
        "name: p",
        "calibration: {prompts: 17}\nname: p",
        "calibration.prompts: expected an integer <= 16, got 17",
    ),
    ("policy", "name: p", "calibration: {seed: -1}\nname: p", "calibration.seed: expected an integer >= 0, got -1"),
    (
        "policy",
        "weights: per_channel}",
        "weights: per_block, block_size: 8192}",
        "default.block_size: expected an integer <= 4096, got 8192",
    ),
]


@pytest.mark.parametrize(("kind", "old", "new", "message"), STRUCTURAL, ids=[s[3][:48] for s in STRUCTURAL])
def test_schema_and_loader_reject_the_same_mistakes(
    tmp_path: Path, kind: str, old: str, new: str, message: str
) -> None:
    original = SUITE if kind == "suite" else POLICY
    assert old in original
    text = original.replace(old, new, 1)
    path = write(tmp_path / "bad.yaml", text)
    load = load_suite if kind == "suite" else load_policy
    with pytest.raises(InputError) as info:
        load(str(path))
    line = next(i for i, row in enumerate(text.splitlines(), 1) if new.splitlines()[0] in row)
    assert f"{path}:{line}: " in str(info.value) and message in str(info.value)
    schema = json_schema(kind)
    assert not jsonschema.Draft202012Validator(schema).is_valid(yaml.safe_load(text))
    jsonschema.validate(yaml.safe_load(original), schema)  # and the file before the change passes


def test_every_structural_error_of_a_file_at_once(tmp_path: Path) -> None:
    text = SUITE.replace("steps: 2", "steps: 0").replace("metrics: [psnr]", "metrics: [pnsr]\ncolour: red")
    with pytest.raises(InputError) as info:
        load_suite(write(tmp_path / "bad.yaml", text))
    message = str(info.value)
    assert message.splitlines()[0].endswith("3 errors:")
    assert ":2: generation.steps" in message and ":5: metrics[0]" in message and ":6: colour: unknown key" in message


# Numbers that may be anything finite: a threshold, and a drop allowed against a baseline.
UNBOUNDED = {("Gate", "value"), ("BaselineLimit", "max_drop"), ("BaselineLimit", "max_rel_drop")}


def _numbers(schema: dict) -> list[tuple[str, str, dict]]:
    """(model, field, its number schema) of every integer or number field of a published schema,
    lists' items and `X | None` members included."""
    out = []
    for model, definition in [("", schema), *schema.get("$defs", {}).items()]:
        for field, node in definition.get("properties", {}).items():
            for member in [node, *node.get("anyOf", [])]:
                member = member.get("items", member)
                if member.get("type") in ("integer", "number"):
                    out.append((model or schema["title"], field, member))
    return out


@pytest.mark.parametrize("kind", ["suite", "policy"])
def test_every_number_has_bounds(kind: str) -> None:
    """A new integer or number field states its range (or is named in UNBOUNDED)."""
    numbers = _numbers(json_schema(kind))
    if kind == "suite":
        assert UNBOUNDED <= {(model, field) for model, field, _ in numbers}
    for model, field, node in numbers:
        if (model, field) in UNBOUNDED:
            continue
        assert "minimum" in node or "exclusiveMinimum" in node, (model, field)
        assert "maximum" in node or "exclusiveMaximum" in node, (model, field)


def test_every_detector_threshold_has_a_range() -> None:
    from evals.detectors import detector_params
    from evals.suite_schema import THRESHOLD_BOUNDS

    for name in DETECTORS:
        for param, default in detector_params(name).items():
            low, high = THRESHOLD_BOUNDS[param]
            assert low <= default <= high, (name, param)


# Where a non-finite number goes: a required float, a `float | None`, one in a nested model, one in a
# generated model (detector thresholds).
NON_FINITE = {
    "guidance": ("guidance: 4.5", "guidance: {}"),
    "value": ("value: 30", "value: {}"),
    "max_drop": ('op: ">=", value: 30', "baseline: {{max_drop: {}}}"),
    "min_z": ("gates:\n", "detectors: [checkerboard]\ndetector_thresholds: {{checkerboard: {{min_z: {}}}}}\ngates:\n"),
}


@pytest.mark.parametrize("text", [".nan", ".NaN", ".inf", "-.inf", "+.Inf"])
@pytest.mark.parametrize("key", list(NON_FINITE))
def test_the_loader_refuses_what_json_cannot_say(tmp_path: Path, key: str, text: str) -> None:
    old, new = NON_FINITE[key]
    assert old in SUITE
    with pytest.raises(InputError, match=f"{key}: expected a finite number, got -?(nan|inf)$"):
        load_suite(write(tmp_path / "bad.yaml", SUITE.replace(old, new.format(text), 1)))


@pytest.mark.parametrize(("text", "message"), [("x: 0", "x: expected a number > 0, got 0"), ("x: 1.0", "< 1, got 1.0")])
def test_strict_bounds_are_named(tmp_path: Path, text: str, message: str) -> None:
    from pydantic import Field

    from evals.models.yamlspec import StrictModel, load_yaml, validate

    class Share(StrictModel):
        x: float = Field(gt=0, lt=1)

    with pytest.raises(InputError, match=message.replace(".", r"\.")):
        validate(load_yaml(write(tmp_path / "f.yaml", text), "suite"), Share)
