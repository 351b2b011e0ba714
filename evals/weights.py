"""Where metric network weights come from. Never downloads (that is `evals fetch-weights`).

Order: an explicit path (CLI `--weights NAME=PATH`, then the suite's `weights:`, then the environment
variable `EVALS_WEIGHTS_<NAME>`), then the standard caches: `$TORCH_HOME/hub/checkpoints` for the
LPIPS trunks (where torchvision puts them), the Hugging Face cache for open_clip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError

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


def read_state_dict(path: Path, expected: str) -> dict[str, Any]:
    """The tensors of a weights file: `.safetensors`, else a torch state dict (`.pth`, ...) read with
    `weights_only=True`, which restores tensors and plain containers and never runs code. A damaged
    or hostile file, or one that is not a {name: tensor} dict (a {'state_dict': ...} wrapper is
    unwrapped), is an InputError naming the file and `expected`, what it should hold."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # each reader raises its own errors on a damaged or hostile file
        raise InputError(f"{path}: {_unreadable(path, exc)}; expected {expected}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise InputError(f"{path}: holds {type(state).__name__}, expected {expected} (a state dict of tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            what = f"entry {str(key)[:80]!r} is {type(value).__name__}"
            raise InputError(f"{path}: {what}, expected {expected} (a state dict of tensors)")
    return state


def _unreadable(path: Path, exc: Exception) -> str:
    """Why a weights file could not be read, without torch's advice to load it unsafely instead."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        skip = ("Weights only load failed", "Check the documentation of torch.load")
        parts = [p for p in str(exc).split("\n\n") if p.strip() and not p.strip().startswith(skip)]
        detail = " ".join(" ".join(parts).split())[:300] or "not a pickle of tensors"
        return f"not a torch state dict that loads without running code ({detail})"
    kind = "safetensors" if path.suffix == ".safetensors" else "torch state dict"
    return f"not a readable {kind} file ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"


def check_weights_file(path: Path, expected: str) -> None:
    """InputError naming `path` unless it is a readable weights file of float tensors (position ids
    aside); a `.safetensors` file is checked from its header alone, without reading its tensors."""
    if path.suffix == ".safetensors":
        from evals.models.safetensors_files import opened_safetensors

        with opened_safetensors(path, f"expected {expected}") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        if not dtypes:
            raise InputError(f"{path}: holds no tensors, expected {expected}")
        floats = ("F16", "BF16", "F32", "F64")
        named = {k: d for k, d in dtypes.items() if d not in floats}
    else:
        state = read_state_dict(path, expected)
        named = {k: str(v.dtype) for k, v in state.items() if not v.dtype.is_floating_point or v.element_size() < 2}
    odd = sorted(k for k in named if not k.endswith("position_ids"))
    if odd:
        raise InputError(f"{path}: {odd[0]} is {named[odd[0]]}, expected {expected} (float tensors)")


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
