"""The trained tiny CI model: its committed weights, and that it follows its captions on a CPU."""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

import pytest
import torch

from benchmarks.tiny_captions import caption_checks, dominant_colour
from evals.models.tiny import T5_TOKENS, WEIGHTS_FILE, WEIGHTS_SHA256, load_trained_components
from evals.models.tiny_data import COLOURS, render
from evals.suite_types import Generation

SMOKE_GENERATION = Generation(64, 64, 8, 4.5, 16, T5_TOKENS)  # suites/smoke.yaml's settings, larger batches


def test_weights_are_committed_small_and_match_their_recorded_hash() -> None:
    data = WEIGHTS_FILE.read_bytes()
    assert len(data) <= 25 * 1024 * 1024
    assert hashlib.sha256(data).hexdigest() == WEIGHTS_SHA256


def test_every_parameter_comes_from_the_file(tiny_model) -> None:
    """Strict loading: no component keeps a random-init value (the trained and random builds differ
    in every weight tensor of every component)."""
    from evals.models.tiny import TRAINED, build_tiny_components

    random = build_tiny_components(0)
    for name in TRAINED:
        trained = dict(tiny_model.pipeline.components[name].named_parameters())
        for key, value in random[name].named_parameters():
            if value.numel() > 1 and value.std() > 0:  # a constant init (norm weights) may equal a trained one
                assert not torch.equal(trained[key], value), f"{name}.{key} was not loaded"


@pytest.fixture(scope="module")
def checks(tiny_model) -> dict:
    return caption_checks(tiny_model.pipeline, [0, 1], SMOKE_GENERATION)


def test_a_colour_word_decides_the_dominant_hue(checks) -> None:
    assert checks["hue_accuracy"] >= 0.9


def test_night_is_dark_and_day_is_bright(checks) -> None:
    assert max(checks["night_luma"]) < 0.2
    assert min(checks["day_luma"]) > 0.35


def test_different_prompts_give_different_images(checks) -> None:
    assert checks["distinct_psnr_median"] <= 20


def test_the_hue_check_itself_tells_colours_apart() -> None:
    """The measuring stick, on flat patches of each colour (and none on grey)."""
    for name in ("red", "orange", "yellow", "green", "blue", "purple"):
        patch = torch.tensor(COLOURS[name]).view(1, 1, 3).expand(16, 16, 3).numpy()
        assert dominant_colour(patch) == name
    assert dominant_colour(torch.full((16, 16, 3), 0.5).numpy()) is None


def test_training_data_captions_say_what_is_drawn() -> None:
    images, captions = render(64, torch.Generator().manual_seed(3))
    assert images.shape == (64, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    luma = ((images + 1) / 2 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).mean((1, 2))
    night = [lum for lum, c in zip(luma.tolist(), captions, strict=True) if "night" in c or "dark" in c]
    day = [lum for lum, c in zip(luma.tolist(), captions, strict=True) if c.endswith("by day") or "daylight" in c]
    assert night and day and max(night) < 0.2 and statistics.median(day) > 0.35
    again, same = render(64, torch.Generator().manual_seed(3))
    assert torch.equal(images, again) and captions == same


def test_training_encodes_prompts_as_the_pipeline_does(tiny_model) -> None:
    from evals.models.tiny_train import encode_text, tokenize

    pipe = tiny_model.pipeline
    prompts = ["a large red circle on a white background", "", "a yellow shop sign that reads STOP, at night"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, prompts, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
        )
        ids = tokenize(pipe.tokenizer, prompts)
        ours, ours_pooled = encode_text([pipe.text_encoder, pipe.text_encoder_2], ids, T5_TOKENS, 128)
    assert torch.equal(embeds, ours) and torch.equal(pooled, ours_pooled)


def test_the_training_script_runs_and_writes_a_loadable_file(tmp_path: Path) -> None:
    """A few steps on the CPU (the real run needs a GPU): the file it writes loads strictly."""
    from evals.models.tiny_train import main

    out = tmp_path / "w.safetensors"
    args = ["--device", "cpu", "--data", "64", "--vae-steps", "1", "--vae-batch", "4", "--steps", "1"]
    assert main([*args, "--batch", "4", "--workers", "1", "--out", str(out)]) == 0
    components = load_trained_components(out)
    assert components["vae"].config.latent_channels == 16
