"""What a new user meets first: `validate` over many files, shipped suites and configs found outside
the repository, `compare` of runs with different candidates, warnings that are not noise."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from evals.cli import main
from evals.cli_review import differences
from tests.conftest import REPO, TEST_SUITES, write

NO_MATCH = """\
name: no-match
components:
  transformer:
    default: {format: e4m3fn}
    rules:
      - {match: "transformer_blocks.40.*", precision: keep}
      - {match: "proj_outt", precision: keep}
"""


def test_validate_reports_every_error_of_every_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    smoke = (TEST_SUITES / "smoke.yaml").read_text()
    bad = write(workdir / "bad.yaml", smoke.replace("name: smoke", "name: Bad Name").replace("psnr, ssim", "psnr, sim"))
    policy = write(workdir / "no-match.yaml", NO_MATCH)
    args = ["validate", str(bad), str(policy), "smoke", "fp8-e4m3-rowise", "fp8-e4m3-rowwise"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    # Every file is checked: the good ones after the bad are still reported OK.
    assert "smoke: suite 'smoke' ok" in out and "fp8-e4m3-rowwise: policy 'fp8-e4m3-rowwise' ok: 85 FP8 layers" in out
    assert "bad.yaml:4: name: name 'Bad Name'" in err and "unknown value 'sim' (did you mean 'ssim'?)" in err
    assert "2 errors" in err  # both of the suite's errors, not the first one only
    # The policy parses, but its rules match nothing in the model (tiny by default): both are named.
    assert "rules[0]: pattern 'transformer_blocks.40.*' matches no module" in err
    assert "rules[1]: pattern 'proj_outt' matches no module" in err
    assert "did you mean 'fp8-e4m3-rowwise'" in err
    assert "3 of 5 files have errors" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml", "no-match.yaml"]


def test_validate_resolves_against_the_model_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Block 20 exists in SD3.5-Large (38 blocks), not in tiny (6): the model decides."""
    text = NO_MATCH.replace("transformer_blocks.40.*", "transformer_blocks.20.*").replace("proj_outt", "proj_out")
    policy = write(tmp_path / "block20.yaml", text)
    assert main(["validate", str(policy)]) == 2
    assert main(["validate", str(policy), "--model", "sd35-large"]) == 0
    # 536 linear layers, less block 20's 14 (attention 8, adaLN 2, feed-forwards 4) and proj_out.
    assert "ok: 521 FP8 layers on sd35-large" in capsys.readouterr().out


def test_shipped_suites_configs_and_policies_are_found_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evals.models.sources import _locate
    from evals.suite import SHIPPED_SUITES, load_suite

    monkeypatch.chdir(tmp_path)  # not the repository
    assert load_suite("smoke").path == str(SHIPPED_SUITES / "smoke.yaml")
    assert load_suite("suites/smoke.yaml").name == "smoke"  # the README's path, outside the repo
    folder, _ = _locate("models/configs/sd35-large", None)
    assert (folder / "transformer" / "config.json").is_file()


@pytest.mark.slow
def test_the_wheel_carries_suites_baselines_configs_policies_and_tiny_weights(tmp_path: Path) -> None:
    """What an installation outside the repository needs is in the wheel."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "evals/suites/smoke.yaml",
        "evals/suites/sd35-core.yaml",
        "evals/suites/baselines/smoke/fp8-e4m3-rowwise.json",
        "evals/models/configs/sd35-large/transformer/config.json",
        "evals/models/policies/fp8-e4m3-rowwise.yaml",
        "evals/reports/templates/report.css",
        "evals/models/weights/tiny-sd3.safetensors",
    ):
        assert expected in names, expected


def test_the_pytest_plugin_finds_a_shipped_suite_in_another_project(tmp_path: Path) -> None:
    from evals.pytest_plugin import _suite_path

    class Config:
        rootpath = tmp_path  # a project with no suites/ folder

        def getoption(self, name: str) -> None:
            return None

        def getini(self, name: str) -> str:
            return "suites/smoke.yaml"  # the plugin's default

    assert _suite_path(Config()).is_file()  # type: ignore[arg-type]
    write(tmp_path / "suites" / "smoke.yaml", "name: mine\n")
    assert _suite_path(Config()) == tmp_path / "suites" / "smoke.yaml"  # the project's own comes first


def test_compare_names_a_policy_in_one_run_once() -> None:
    a = {"rowwise": {"psnr_mean": 30.0, "ssim_mean": 0.9}, "gone": {"psnr_mean": 28.0, "ssim_mean": 0.8}}
    b = {"rowwise": {"psnr_mean": 31.0, "ssim_mean": 0.9}, "new": {"psnr_mean": 29.0}}
    assert differences(a, b) == [
        {"policy": "gone", "only_in": "A"},
        {"policy": "new", "only_in": "B"},
        {"policy": "rowwise", "metric": "psnr_mean", "a": 30.0, "b": 31.0, "b_minus_a": 1.0},
    ]


def test_a_full_size_transformer_on_the_cpu_gets_a_warning() -> None:
    import torch

    from evals.models.sources import cpu_warning

    class Pipeline:
        def __init__(self, features: int):
            self.transformer = torch.nn.Linear(features, features, device="meta")

    assert cpu_warning(Pipeline(128), "tiny") is None
    warning = cpu_warning(Pipeline(20_000), "random:sd35-medium")
    assert warning is not None and "0.4 B-parameter" in warning and "--device cuda" in warning


def test_explain_prints_no_diffusers_cast_warning(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "explain", "fp8-e4m3-rowwise", "--model", "tiny", "--dtype", "bfloat16"]) == 0
    out, err = capfd.readouterr()
    assert "transformer_blocks.0.attn.to_q" in out
    assert "kept in float32" not in out + err


def test_messages_go_through_logging_with_the_cli_s_prefixes(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from evals.logs import setup_cli_logging

    log = logging.getLogger("evals.somewhere")
    setup_cli_logging(0)
    log.warning("a warning")
    log.info("a progress line")
    log.debug("a detail")
    assert capsys.readouterr().err == "warning: a warning\na progress line\n"
    setup_cli_logging(-1)  # -q: warnings only; the first handler is replaced, not doubled
    log.info("a progress line")
    log.error("an error")
    assert capsys.readouterr().err == "error: an error\n"
    setup_cli_logging(1)  # -v
    log.debug("a detail")
    assert capsys.readouterr().err == "a detail\n"
    setup_cli_logging(0)


def test_every_command_names_its_handler() -> None:
    """Each (sub)command sets `func` itself: no table of names to keep in step with the parser."""
    import argparse

    from evals.cli import _parser

    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], object]]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [(path, parser.get_default("func"))]
        return [leaf for name, child in subs[0].choices.items() for leaf in leaves(child, (*path, name))]

    found = leaves(_parser(), ())
    assert len(found) >= 18 and ("policy", "explain") in [p for p, _ in found]
    assert [p for p, func in found if not callable(func)] == []
