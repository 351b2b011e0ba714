"""Detectors against the labelled set of benchmarks/labelled_images.py (photographs shipped with
scikit-image, clean and with injected defects). The rate tables in docs/metrics-and-detectors.md come from
`python benchmarks/detector_rates.py --size 512`; these tests pin the guarantees at 256x256."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.labelled_images import clean_set, defect_set, photo, with_stripes
from evals.cli import main
from evals.detectors import DETECTORS, detector_params, run_detectors
from evals.models.yamlspec import InputError
from evals.suite import load_suite
from tests.conftest import TEST_SUITES, write


@pytest.fixture(scope="module")
def recall() -> dict[tuple[str, str], list[bool]]:
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for item in defect_set(256):
        assert item.defect is not None
        hits[(item.defect, item.strength)].append(bool(run_detectors(item.image, [item.defect])[item.defect].flagged))
    return hits


def test_no_detector_flags_a_clean_photograph() -> None:
    flagged = {
        item.name: [n for n, f in run_detectors(item.image, list(DETECTORS)).items() if f.flagged]
        for item in clean_set(256)
    }
    assert len(flagged) == 16  # 15 photographs and a night scene
    assert not any(flagged.values()), {k: v for k, v in flagged.items() if v}


@pytest.mark.parametrize("period", [2, 3, 4, 8, 16])
def test_stripes_of_4_of_255_are_caught(recall, period: int) -> None:
    for amplitude in (4, 8):
        flags = recall[("stripe_noise", f"p={period} a={amplitude}/255")]
        assert len(flags) == 14 and all(flags), f"period {period}, {amplitude}/255: {sum(flags)}/14"


def test_period_32_is_mostly_caught_at_256_px(recall) -> None:
    # 8 periods in the image: z is discounted there (natural structure of that scale looks periodic).
    assert sum(recall[("stripe_noise", "p=32 a=8/255")]) >= 13
    assert sum(recall[("stripe_noise", "p=32 a=4/255")]) >= 8


def test_at_512_px_every_period_of_4_of_255_is_caught_and_no_clean_photo_is_flagged() -> None:
    """The guarantee in docs/metrics-and-detectors.md, on the textures that hide long periods best
    (grass, gravel) and the rest."""
    flagged = [
        item.name for item in clean_set(512) if run_detectors(item.image, ["stripe_noise"])["stripe_noise"].flagged
    ]
    assert flagged == []
    missed = [
        item.name
        for item in defect_set(512)
        if item.defect == "stripe_noise"
        and item.strength.endswith(" a=4/255")
        and not run_detectors(item.image, ["stripe_noise"])["stripe_noise"].flagged
    ]
    assert missed == []


def test_other_defects_are_caught(recall) -> None:
    for key in [("checkerboard", f"a={a}/255") for a in (2, 4, 8)] + [
        ("nonfinite", "NaN 1 pixel"),
        ("nonfinite", "NaN 1% of pixels"),
        ("nonfinite", "Inf 1 pixel"),
        ("flat", "contrast 0.03"),
        ("flat", "constant"),
        *[("black_frame", level) for level in ("0/255", "1/255", "3/255", "6/255", "all NaN")],
    ]:
        assert all(recall[key]), key
    # Over-exposure saturates bright and mid-tone photos; the dark ones (hubble, x3) stay unsaturated.
    assert sum(recall[("saturation", "x5")]) >= 5


def test_faint_defects_below_the_thresholds_pass(recall) -> None:
    assert not any(recall[("checkerboard", "a=1/255")])
    assert sum(recall[("stripe_noise", "p=2 a=1/255")]) <= 3


def test_thresholds_are_tunable() -> None:
    image = np.clip(with_stripes(photo("coffee"), 3 / 255, 4, 0), 0, 1)
    assert run_detectors(image, ["stripe_noise"])["stripe_noise"].flagged
    strict = run_detectors(image, ["stripe_noise"], {"stripe_noise": {"min_amplitude": 5 / 255}})
    assert not strict["stripe_noise"].flagged
    assert set(detector_params("stripe_noise")) == {"min_amplitude", "min_z", "max_period"}


def test_suite_detector_thresholds(tmp_path: Path) -> None:
    line = "detectors: [black_frame, nonfinite, saturation, flat, stripe_noise, checkerboard]"
    original = (TEST_SUITES / "smoke.yaml").read_text()
    assert line in original
    text = original.replace(
        line,
        "detectors: [black_frame, nonfinite, stripe_noise]\ndetector_thresholds: {stripe_noise: {min_amplitude: 0.01}}",
    )
    suite = load_suite(write(tmp_path / "s.yaml", text))
    assert suite.detector_thresholds == {"stripe_noise": {"min_amplitude": 0.01}}
    for bad, message in [
        ("{stripe_noise: {min_amplitud: 0.01}}", "did you mean 'min_amplitude'"),
        ("{stripe_noise: {min_amplitude: high}}", "expected a number"),
        ("{checkerboard: {min_z: 3}}", "detector_thresholds.checkerboard: 'checkerboard' is not listed in 'detectors'"),
        ("{nonfinite: {}}", "detector_thresholds.nonfinite: unknown key"),  # a detector without thresholds
    ]:
        path = write(tmp_path / "bad.yaml", text.replace("{stripe_noise: {min_amplitude: 0.01}}", bad))
        with pytest.raises(InputError, match=message):
            load_suite(path)


def test_detect_and_compare_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = (photo("coffee") * 255).round().astype(np.uint8)
    striped = np.clip(with_stripes(photo("coffee"), 6 / 255, 2, 1) * 255, 0, 255).round().astype(np.uint8)
    Image.fromarray(clean).save(tmp_path / "clean.png")
    Image.fromarray(striped).save(tmp_path / "striped.png")
    assert main(["detect", str(tmp_path / "clean.png"), str(tmp_path / "striped.png")]) == 0
    out = capsys.readouterr().out
    assert "clean.png: clean" in out and "striped.png: FLAGGED stripe_noise" in out
    assert main(["detect", "--json", str(tmp_path / "striped.png")]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result[str(tmp_path / "striped.png")]["stripe_noise"]["flagged"] is True
    assert main(["compare-images", "--json", str(tmp_path / "clean.png"), str(tmp_path / "striped.png")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 30 < scores["psnr"] < 40 and 0 < scores["ssim"] < 1
    (tmp_path / "not-an-image.png").write_text("hello")
    assert main(["detect", str(tmp_path / "not-an-image.png")]) == 2
    Image.fromarray(clean[:64]).save(tmp_path / "small.png")
    assert main(["compare-images", str(tmp_path / "clean.png"), str(tmp_path / "small.png")]) == 2
