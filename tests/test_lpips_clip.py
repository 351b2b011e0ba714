"""LPIPS and CLIP score plumbing, with small networks injected explicitly (random weights: these
numbers are never reported as scores), weight resolution, and the unavailable/optional paths.
Tests with the real weights run only where those are present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.cli import main
from evals.metrics.clip_score import CLIPScore, clip_scores
from evals.metrics.lpips import LPIPS
from evals.weights import CLIP_HF_FILE, CLIP_HF_REPO, LPIPS_TRUNKS, MissingWeights, clip_weights, lpips_trunk
from tests.conftest import TEST_SUITES, write


def images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def random_alexnet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A TORCH_HOME holding a (random) torchvision AlexNet where torchvision would cache it."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / LPIPS_TRUNKS["alex"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return state


def test_lpips_trunk_is_loaded_as_lpips_itself_would(random_alexnet_home, monkeypatch: pytest.MonkeyPatch) -> None:
    import lpips
    import torchvision

    ours = LPIPS(net="alex")
    # Independent path: lpips builds its own trunk from torchvision's alexnet(pretrained=True), here
    # patched to return the same weights instead of downloading.
    original = torchvision.models.alexnet

    def alexnet_with_state(*args, **kwargs):
        model = original()
        model.load_state_dict(random_alexnet_home)
        return model

    monkeypatch.setattr(lpips.pretrained_networks.tv, "alexnet", alexnet_with_state)
    theirs = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False).eval()
    a, b = images(seed=1), images(seed=2)
    expected = theirs(a * 2 - 1, b * 2 - 1).flatten()
    got = ours(a, b, ["", ""])["lpips"]
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(ours(a, a, ["", ""])["lpips"] < 1e-6)  # identical images: distance 0


def test_lpips_missing_trunk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeights, match=r"hub/checkpoints/vgg16-397923af.pth.*evals fetch-weights"):
        lpips_trunk("vgg", {})
    with pytest.raises(MissingWeights, match="does not exist"):
        lpips_trunk("alex", {"lpips": str(tmp_path / "nope.pth")})


def tiny_clip():
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    open_clip.factory._MODEL_CONFIGS["tiny-test-clip"] = config  # test-only model, random weights
    torch.manual_seed(0)
    return open_clip.create_model("tiny-test-clip"), open_clip.get_tokenizer("ViT-B-32")


def test_clip_score_matches_open_clips_own_preprocessing() -> None:
    import open_clip
    from PIL import Image

    model, tokenizer = tiny_clip()
    metric = CLIPScore(model=model, tokenizer=tokenizer)
    cand, ref = images(seed=3), images(seed=4)
    prompts = ["a red cube", "a dark forest"]
    scores = metric(cand, ref, prompts)
    assert set(scores) == {"clip_score", "clip_score_ref", "clip_score_delta"}
    torch.testing.assert_close(scores["clip_score_delta"], scores["clip_score"] - scores["clip_score_ref"])
    # Independent: open_clip's PIL transform and 100 * cos, per image.
    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in cand]
    with torch.no_grad():
        image_features = torch.nn.functional.normalize(
            model.encode_image(torch.stack([transform(p) for p in pil])), dim=-1
        )
        text_features = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    expected = 100 * (image_features * text_features).sum(-1)
    torch.testing.assert_close(scores["clip_score"], expected, atol=1.0, rtol=0)  # resampling differs slightly
    assert clip_scores(model, tokenizer, cand[:1], prompts[:1]).shape == (1,)


def test_clip_weights_come_from_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingWeights, match=rf"{CLIP_HF_FILE} of {CLIP_HF_REPO}.*huggingface-cli download"):
        clip_weights({})
    repo = tmp_path / ("models--" + CLIP_HF_REPO.replace("/", "--"))
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / CLIP_HF_FILE).write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert clip_weights({}) == repo / "snapshots" / "abc" / CLIP_HF_FILE
    explicit = write(tmp_path / "mine.safetensors", "x")
    assert clip_weights({"clip_score": str(explicit)}) == explicit


def suite_with(workdir: Path, gates: str) -> Path:
    smoke = (TEST_SUITES / "smoke.yaml").read_text()
    text = smoke.replace("metrics: [psnr, ssim]", "metrics: [psnr, ssim, lpips, clip_score]")
    return write(workdir / "suite.yaml", text.replace("gates:\n", "gates:\n" + gates))


def test_missing_weights_fail_a_gate_unless_it_is_optional(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(workdir / "empty-torch"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(workdir / "empty-hf"))
    optional = '  - {metric: lpips, stat: p95, op: "<=", value: 0.15, optional: true}\n'
    optional += '  - {metric: clip_score_delta, stat: mean, op: ">=", value: -0.5, optional: true}\n'
    assert main(["run", str(suite_with(workdir, optional)), "--no-mlflow", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "SKIP" in out.out and "warning: metric lpips unavailable" in out.err
    run_dir = max((workdir / "runs").iterdir())
    verdict = json.loads((run_dir / "verdict.json").read_text())
    skipped = [r for r in verdict["results"] if r["status"] == "not evaluated"]
    assert {r["subject"] for r in skipped} == {"lpips", "clip_score_delta"}
    assert "alexnet-owt-7be5be79.pth" in json.loads((run_dir / "run.json").read_text())["unavailable_metrics"]["lpips"]
    required = '  - {metric: lpips, stat: p95, op: "<=", value: 0.15}\n'
    assert main(["run", str(suite_with(workdir, required)), "--no-mlflow", "--no-progress"]) == 1
    failed = [
        r
        for r in json.loads((max((workdir / "runs").iterdir()) / "verdict.json").read_text())["results"]
        if r["status"] == "fail"
    ]
    assert [r["subject"] for r in failed] == ["lpips"] and "unavailable" in failed[0]["reason"]


def test_lpips_with_a_trunk_runs_in_a_suite(workdir: Path, random_alexnet_home) -> None:
    gate = '  - {metric: lpips, stat: p95, op: "<=", value: 1.0}\n'
    assert main(["run", str(suite_with(workdir, gate)), "--no-mlflow", "--no-progress"]) in (0, 1)
    run_dir = max((workdir / "runs").iterdir())
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert all(0 <= r["metrics"]["lpips"] < 1 for r in records) and "clip_score" not in records[0]["metrics"]


def real_weights_present(metric: str) -> bool:
    try:
        lpips_trunk("alex", {}) if metric == "lpips" else clip_weights({})
    except MissingWeights:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not real_weights_present("lpips"), reason="LPIPS AlexNet trunk not in TORCH_HOME")
def test_real_lpips_orders_distortions() -> None:
    from benchmarks.labelled_images import photo

    clean = torch.from_numpy(photo("astronaut")).permute(2, 0, 1)[None].float()
    mild, strong = ((clean + s * torch.randn_like(clean)).clamp(0, 1) for s in (0.02, 0.1))
    metric = LPIPS()
    assert metric(clean, clean, [""])["lpips"].item() < 1e-6
    assert 0 < metric(mild, clean, [""])["lpips"].item() < metric(strong, clean, [""])["lpips"].item()


@pytest.mark.slow
@pytest.mark.skipif(not real_weights_present("clip_score"), reason="CLIP ViT-L/14 weights not in the HF cache")
def test_real_clip_score_prefers_the_right_prompt() -> None:
    from benchmarks.labelled_images import photo

    cat = torch.from_numpy(photo("chelsea")).permute(2, 0, 1)[None].float()
    metric = CLIPScore()
    right = metric(cat, cat, ["a photo of a cat"])["clip_score"].item()
    wrong = metric(cat, cat, ["a photo of a rocket launch"])["clip_score"].item()
    assert right > wrong + 5


def test_doctor_reports_device_fp8_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fp8_gemm"]["cpu:e4m3fn"] is True  # the CPU kernel runs here
    assert (
        report["weights"]["lpips (alex)"].startswith("missing: ") and str(tmp_path) in report["weights"]["lpips (alex)"]
    )
    assert report["mlflow_tracking_uri"]


def test_a_metric_whose_package_is_missing_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from evals.metrics import load_metric
    from evals.weights import MissingWeights

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ModuleNotFoundError
    with pytest.raises(MissingWeights, match="'open_clip' package is not installed"):
        load_metric("clip_score", "cpu", {"clip_score": "any.safetensors"})
