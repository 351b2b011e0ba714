"""CLIP score per image through open_clip: 100 * cos(image embedding, prompt embedding).

That is torchmetrics' convention, applied per image and without clamping (torchmetrics clamps the
mean at 0; Hessel et al.'s CLIPScore is 2.5 * max(cos, 0)). Computed for the candidate and the
reference image of each sample, and their difference. Default model: OpenAI's ViT-L/14, weights
from a local file or the Hugging Face cache (`evals.weights.clip_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from evals.metrics import METRICS, MetricInfo
from evals.models.yamlspec import InputError
from evals.weights import CLIP_HF_FILE, CLIP_HF_REPO, CLIP_MODEL, check_weights_file, clip_weights


def _preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """open_clip's eval transform on tensors: bicubic resize of the shorter side, centre crop, normalize."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    resized = F.interpolate(
        images,
        size=(max(size, round(h * scale)), max(size, round(w * scale))),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    ).clamp(0, 1)
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    crop = resized[..., top : top + size, left : left + size]
    return (crop - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clip_scores(model: Any, tokenizer: Any, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 * cosine similarity of each image with its prompt."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], tuple | list) else cfg["size"]
    device = next(model.parameters()).device
    with torch.inference_mode():
        pixels = _preprocess(images.float(), size, tuple(cfg["mean"]), tuple(cfg["std"])).to(device)
        image_features = F.normalize(model.encode_image(pixels).float(), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    return (100 * (image_features * text_features).sum(dim=-1)).cpu()


def load_clip(path: Path, name: str | None = None) -> Any:
    """open_clip's model `name` with the weights of `path`, checked first: the file is read as
    safetensors or with torch's `weights_only=True` (no code runs); a file that is damaged, is not a
    state dict, or does not fit the model is an InputError naming it."""
    import open_clip

    name = name or CLIP_MODEL
    expected = f"open_clip {name} weights (as {CLIP_HF_FILE} of {CLIP_HF_REPO})"
    check_weights_file(path, expected)
    try:
        return open_clip.create_model(name, pretrained=str(path), load_weights=True)
    except MemoryError:
        raise
    except Exception as exc:  # open_clip's loading, on tensors that do not fit the model
        detail = " ".join(str(exc).split())[:300]
        raise InputError(f"clip_score weights {path}: do not fit {name} ({detail}); expected {expected}") from exc


class CLIPScore:
    info: ClassVar[MetricInfo] = METRICS["clip_score"]

    def __init__(
        self, device: str = "cpu", weights: dict[str, str] | None = None, model: Any = None, tokenizer: Any = None
    ):
        import open_clip

        if model is None:
            model = load_clip(clip_weights(weights or {}))
            tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer

    def __call__(self, candidate: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        cand = clip_scores(self.model, self.tokenizer, candidate, prompts)
        ref = clip_scores(self.model, self.tokenizer, reference, prompts)
        return {"clip_score": cand, "clip_score_ref": ref, "clip_score_delta": cand - ref}
