"""Model sources: `tiny`, or a local diffusers folder of SD3/SD3.5. Never downloads anything.

A source is a string: `tiny` (the built-in model, see `models.tiny`), `tiny:SEED`, or a path to a
folder laid out like the Hub's `stabilityai/stable-diffusion-3.5-*` repositories (model_index.json and
one sub-folder per component).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.yamlspec import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
GET_WEIGHTS_HINT = (
    "download it on a machine with network access, e.g. "
    "`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir PATH` "
    "(the model's license must be accepted on the Hub first), then pass --model PATH"
)


@dataclass
class LoadedModel:
    pipeline: Any
    """A diffusers StableDiffusion3Pipeline, on its device, in the reference dtype."""
    source: str
    """The source string it was loaded from."""
    fingerprint: str
    """Identifies the weights: part of the reference cache key and logged with every run."""


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, name)


def resolved_dtype_name(name: str, device: str) -> str:
    return str(resolve_dtype(name, device)).removeprefix("torch.")


def _folder_fingerprint(folder: Path) -> str:
    """Hash of every config file's content and every weight file's name and size.

    Hashing gigabytes of weights on every run would cost minutes; names, sizes and configs change
    whenever a different checkpoint is put in place.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".json" or path.name.endswith(".txt"):
            digest.update(f"{rel}\n".encode() + path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{rel}:{path.stat().st_size}\n".encode())
    return f"folder:{digest.hexdigest()[:16]}"


OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")


def _check_folder(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise InputError(f"model folder not found: {folder}; {GET_WEIGHTS_HINT}")
    if not index.is_file():
        raise InputError(f"missing {index}: not a diffusers model folder; {GET_WEIGHTS_HINT}")
    try:
        components = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {index}: {exc}") from exc
    if not isinstance(components, dict) or "transformer" not in components:
        raise InputError(f"{index} does not describe an SD3 pipeline (no 'transformer' entry)")
    weights = list((folder / "transformer").glob("*.safetensors"))
    if not weights:
        raise InputError(
            f"missing {folder / 'transformer'}/*.safetensors (the transformer weights); only safetensors "
            f"are loaded, never pickle files; {GET_WEIGHTS_HINT}"
        )
    return components


def load_source(source: str, dtype_name: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load the reference pipeline; every missing file is an InputError naming it."""
    import torch

    dtype = resolve_dtype(dtype_name, device)
    if source == "tiny" or source.startswith("tiny:"):
        from models.tiny import build_tiny_pipeline, tiny_fingerprint

        seed_text = source.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise InputError(f"model source {source!r}: expected `tiny` or `tiny:SEED` with an integer seed")
        pipe = build_tiny_pipeline(int(seed_text))
        fingerprint = tiny_fingerprint(int(seed_text))
        if dtype != torch.float32:  # built in float32; diffusers warns on a no-op cast
            pipe.to(dtype=dtype)
    else:
        folder = Path(source).expanduser()
        index = _check_folder(folder)
        from diffusers import StableDiffusion3Pipeline

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never fall back to the Hub
        # Components a folder leaves out (T5 in a T5-less save) must be passed as None explicitly.
        absent = {name: None for name in OPTIONAL_COMPONENTS if index.get(name, [None])[0] is None}
        pipe = StableDiffusion3Pipeline.from_pretrained(
            str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True, **absent
        )
        pipe.set_progress_bar_config(disable=True)
        fingerprint = _folder_fingerprint(folder)
    pipe.to(device)
    return LoadedModel(pipeline=pipe, source=source, fingerprint=fingerprint)
