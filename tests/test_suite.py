from __future__ import annotations

from pathlib import Path

import pytest

from evals.models.yamlspec import InputError
from evals.suite import load_suite
from tests.conftest import SUITES, write

VALID = """\
name: mini
generation: {height: 64, width: 64, steps: 2, guidance: 4.5, batch_size: 3}
cases:
  - {id: a, prompt: "a red cube", seeds: [0, 1]}
  - {id: b, prompt: "a blue ball", seeds: [5], tags: [objects]}
metrics: [psnr, ssim]
detectors: [black_frame]
gates:
  - {metric: psnr, stat: mean, op: ">=", value: 30}
  - {detector: black_frame, stat: count, op: "==", value: 0}
"""


def test_valid_suite_parses_and_expands(tmp_path: Path) -> None:
    suite = load_suite(write(tmp_path / "s.yaml", VALID))
    assert suite.name == "mini" and suite.model == "tiny" and suite.reference_dtype == "auto"
    assert [s.id for s in suite.samples()] == ["a-s0", "a-s1", "b-s5"]
    assert [[s.id for s in b] for b in suite.batches()] == [["a-s0", "a-s1", "b-s5"]]
    assert suite.gates[0].describe() == "psnr mean >= 30"
    assert suite.tags == ("objects",)


def test_hash_changes_with_content(tmp_path: Path) -> None:
    a = load_suite(write(tmp_path / "a.yaml", VALID))
    b = load_suite(write(tmp_path / "b.yaml", VALID.replace("value: 30", "value: 31")))
    assert a.sha256 != b.sha256


def test_smoke_suite_is_tiny_and_big_enough() -> None:
    suite = load_suite(SUITES / "smoke.yaml")
    assert suite.model == "tiny"
    assert len(suite.cases) >= 8 and all(len(c.seeds) >= 2 for c in suite.cases)
    assert {"psnr", "ssim"} <= set(suite.metrics)


def test_sd35_quick_shape() -> None:
    suite = load_suite(SUITES / "sd35-quick.yaml")
    assert len(suite.cases) == 16
    assert (suite.generation.height, suite.generation.width, suite.generation.steps) == (512, 512, 20)


def test_sd35_core_shape() -> None:
    suite = load_suite(SUITES / "sd35-core.yaml")
    assert len(suite.cases) >= 100
    assert all(len(c.seeds) == 2 for c in suite.cases)
    assert (suite.generation.height, suite.generation.width, suite.generation.steps) == (1024, 1024, 28)
    categories = {"people", "text", "landscapes", "dark", "textures", "architecture"}
    assert categories <= set(suite.tags)
    per_category = {t: sum(t in c.tags for c in suite.cases) for t in categories}
    assert min(per_category.values()) >= 15, per_category
    assert len({c.prompt for c in suite.cases}) == len(suite.cases), "duplicate prompts"


# (replace this, with this, message fragment, line number expected in the message)
BAD = [
    ("name: mini", "name: mini\nmodle: tiny", "unknown key (did you mean 'model'?)", 2),
    ("steps: 2", 'steps: "two"', "generation.steps: expected an integer", 2),
    ("steps: 2", "steps: true", "generation.steps: expected an integer, got True", 2),
    ("steps: 2", "steps: 0", "expected an integer >= 1", 2),
    ("height: 64", "height: 60", "expected a multiple of 16", 2),
    ("metric: psnr, stat", "metric: psnrr, stat", "unknown value 'psnrr' (did you mean 'psnr'?)", 9),
    ("metrics: [psnr, ssim]", "metrics: [ssim]", "metric 'psnr' is gated but not listed in 'metrics'", 9),
    ('op: ">="', 'op: "=>"', "unknown value '=>'", 9),
    ("stat: mean", "stat: count", "unknown value 'count'", 9),
    ("value: 30", "value: high", "expected a number", 9),
    ("{metric: psnr, stat", "{metric: psnr, detector: black_frame, stat", "exactly one of", 9),
    ("seeds: [5]", "seeds: [5, 5]", "duplicate seeds", 5),
    ("id: b,", "id: a,", "duplicate case id 'a'", 5),
    ("id: b,", "id: ../etc,", "must match", 5),
    ('prompt: "a blue ball"', 'prompt: "  "', "prompt is empty", 5),
    ("metrics: [psnr, ssim]", "metrics: [psnr, sim]", "unknown value 'sim' (did you mean 'ssim'?)", 6),
    ("detectors: [black_frame]", "detectors: [black_frames]", "did you mean 'black_frame'", 7),
    ("batch_size: 3", "batch_size: 3, sampler: euler", "generation.sampler: unknown key", 2),
    ("- {id: b", "- {id: b, seed: [1]", "unknown key (did you mean 'seeds'?)", 5),
    ("cases:", "cases: 3\nold_cases:", "unknown key", None),
    ("name: mini", "name: mini\ncompile: block", "unknown value 'block' (did you mean 'blocks'?)", 2),
]


@pytest.mark.parametrize(("old", "new", "message", "line"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_suites_name_file_line_and_key(tmp_path: Path, old: str, new: str, message: str, line: int | None) -> None:
    assert old in VALID
    path = write(tmp_path / "bad.yaml", VALID.replace(old, new, 1))
    with pytest.raises(InputError) as info:
        load_suite(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text
    if line is not None:
        assert f"{path}:{line}:" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "must be a YAML mapping, got empty"),
        ("- a\n- b\n", "must be a YAML mapping, got list"),
        ("name: [unclosed\n", "invalid YAML"),
        ("name: !!python/object:os.system ls\n", "invalid YAML"),
    ],
)
def test_unreadable_suites(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        load_suite(write(tmp_path / "x.yaml", content))


def test_missing_suite_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="suite file not found"):
        load_suite(tmp_path / "nope.yaml")


def test_top_level_seeds_are_the_default(tmp_path: Path) -> None:
    text = VALID.replace("seeds: [0, 1]}", "}").replace("name: mini", "name: mini\nseeds: [7, 8]")
    suite = load_suite(write(tmp_path / "s.yaml", text))
    assert suite.cases[0].seeds == (7, 8) and suite.cases[1].seeds == (5,)
