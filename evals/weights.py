"""Where metric network weights come from. Never downloads (that is `evals fetch-weights`).

Order: an explicit path (CLI `--weights NAME=PATH`, then the suite's `weights:`, then the environment
variable `EVALS_WEIGHTS_<NAME>`), then the standard caches: `$TORCH_HOME/hub/checkpoints` for the
LPIPS trunks (where torchvision puts them), the Hugging Face cache for open_clip.
"""

from __future__ import annotations

import os
from pathlib import Path

# torchvision's ImageNet trunks, as `lpips` would download them.
LPIPS_TRUNKS = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
TORCHVISION_MODELS = "https://download.pytorch.org/models/"
CLIP_MODEL = "ViT-L-14-quickgelu"  # OpenAI's ViT-L/14 (QuickGELU, as trained)
CLIP_HF_REPO = "timm/vit_large_patch14_clip_224.openai"
CLIP_HF_FILE = "open_clip_model.safetensors"


class MissingWeights(Exception):
    """A metric's weights are not on this machine; the message names the file and how to get it."""


def explicit_path(metric: str, overrides: dict[str, str]) -> Path | None:
    value = overrides.get(metric) or os.environ.get(f"EVALS_WEIGHTS_{metric.upper()}")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise MissingWeights(f"{metric}: weights file {path} (given explicitly) does not exist")
    return path


def lpips_trunk(net: str, overrides: dict[str, str]) -> Path:
    import torch

    explicit = explicit_path("lpips", overrides)
    if explicit:
        return explicit
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_TRUNKS[net]
    if not path.is_file():
        raise MissingWeights(
            f"lpips ({net}): missing {path}; run `evals fetch-weights` where there is network access "
            f"(or copy torchvision's {LPIPS_TRUNKS[net]} there, set TORCH_HOME, or pass --weights lpips=FILE)"
        )
    return path


def clip_weights(overrides: dict[str, str]) -> Path:
    explicit = explicit_path("clip_score", overrides)
    if explicit:
        return explicit
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    found = try_to_load_from_cache(CLIP_HF_REPO, CLIP_HF_FILE)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    raise MissingWeights(
        f"clip_score: missing {CLIP_HF_FILE} of {CLIP_HF_REPO} in the Hugging Face cache ({HF_HUB_CACHE}); run "
        f"`evals fetch-weights` where there is network access, or "
        f"`huggingface-cli download {CLIP_HF_REPO} {CLIP_HF_FILE}`, or pass --weights clip_score=FILE.safetensors"
    )


def fetch_all() -> list[str]:
    """Download every metric's weights into the standard caches (needs network access)."""
    os.environ.pop("HF_HUB_OFFLINE", None)
    import torch
    from huggingface_hub import hf_hub_download

    done = []
    for name in LPIPS_TRUNKS.values():
        torch.hub.load_state_dict_from_url(TORCHVISION_MODELS + name, progress=True)
        done.append(str(Path(torch.hub.get_dir()) / "checkpoints" / name))
    done.append(hf_hub_download(CLIP_HF_REPO, CLIP_HF_FILE))
    return done
