"""Quantized transformer checkpoints (safetensors only, never pickle).

- Our own format: the candidate transformer's state dict as it is (FP8 weights, float32 scales,
  calibrated input scales), with metadata naming the policy, its hash and each layer's FP8 settings.
  Loading rebuilds the same modules from the stored tensors: bit-exact, nothing is re-quantized.
- ComfyUI-style "scaled FP8" single files: original SD3 key names, FP8 weights with a per-tensor
  `*.scale_weight`, optionally `*.scale_input`, and a `scaled_fp8` marker tensor. They are imported
  as they are, so a shipped FP8 artifact is evaluated without being re-quantized.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from evals.models.fp8 import FORMATS, Fp8Linear, Fp8Spec, resolve_backend
from evals.models.yamlspec import InputError

FORMAT_MARKER = "sd35-fp8-gate/quantized-transformer"
FORMAT_VERSION = "1"
COMFY_MARKER = "scaled_fp8"
COMFY_PREFIX = "model.diffusion_model."


def save_quantized_transformer(transformer: Any, path: Path, *, policy_name: str, policy_sha256: str) -> None:
    """Write the candidate transformer (with its Fp8Linear layers) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    layers = {
        name: {"spec": asdict(m.spec), "compute_dtype": str(m.compute_dtype).removeprefix("torch.")}
        for name, m in transformer.named_modules()
        if isinstance(m, Fp8Linear)
    }
    if not layers:
        raise ValueError("the transformer has no FP8 layers: nothing to save")
    state = {k: v.detach().contiguous().cpu() for k, v in transformer.state_dict().items()}
    metadata = {
        "format": FORMAT_MARKER,
        "version": FORMAT_VERSION,
        "policy": policy_name,
        "policy_sha256": policy_sha256,
        "layers": json.dumps(layers, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise InputError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def _assemble(reference: Any, fp8_layers: dict[str, Fp8Linear], rest: dict[str, torch.Tensor], source: Path) -> Any:
    """A copy of the reference transformer with `fp8_layers` swapped in and `rest` loaded strictly."""
    module = copy.deepcopy(reference)
    for name, layer in fp8_layers.items():
        try:
            old = module.get_submodule(name)
        except AttributeError:
            raise InputError(f"{source}: layer {name!r} does not exist in this model's transformer") from None
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != layer.weight_fp8.shape:
            raise InputError(f"{source}: layer {name!r} has shape {tuple(layer.weight_fp8.shape)}, the model's differs")
        module.set_submodule(name, layer)
    result = module.load_state_dict(rest, strict=False)
    fp8_keys = {f"{n}.{b}" for n, m in fp8_layers.items() for b, t in m.named_buffers() if t is not None}
    fp8_keys |= {f"{n}.bias" for n, m in fp8_layers.items() if m.bias is not None}
    missing = [k for k in result.missing_keys if k not in fp8_keys]
    if missing or result.unexpected_keys:
        raise InputError(
            f"{source}: does not fit this model's transformer (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); is it for another SD3 variant?"
        )
    from evals.models.fp8_block import fuse_fp8_modules  # diffusers' block classes: imported when needed

    fuse_fp8_modules(module)
    return module


def load_quantized_transformer(path: Path, reference: Any, device: torch.device) -> tuple[Any, dict[str, str]]:
    """Load a file written by `save_quantized_transformer` onto `reference`'s architecture."""
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") != FORMAT_MARKER:
        raise InputError(f"{path}: not a quantized transformer written by this tool (no {FORMAT_MARKER!r} metadata)")
    if metadata.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint version {metadata.get('version')!r}, this tool reads {FORMAT_VERSION}")
    fp8_layers = {}
    for name, info in json.loads(metadata["layers"]).items():
        spec = Fp8Spec(**info["spec"])
        weight = tensors.pop(f"{name}.weight_fp8")
        compute_dtype = getattr(torch, info["compute_dtype"])
        backend = resolve_backend(spec, tuple(weight.shape), device, compute_dtype)  # type: ignore[arg-type]
        fp8_layers[name] = Fp8Linear(
            weight,
            tensors.pop(f"{name}.weight_scale"),
            tensors.pop(f"{name}.bias", None),
            spec,
            backend,
            compute_dtype,
            tensors.pop(f"{name}.input_scale", None),
        )
    return _assemble(reference, fp8_layers, tensors, path).to(device), metadata


def is_comfy_scaled_fp8(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k in (COMFY_MARKER, COMFY_PREFIX + COMFY_MARKER) for k in f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc


def import_comfy_scaled_fp8(path: Path, reference: Any, device: torch.device) -> tuple[Any, dict[str, str]]:
    """Import a ComfyUI-style scaled-FP8 SD3 file as a candidate transformer, bytes unchanged.

    Key renaming and the split of fused qkv weights reuse diffusers' own SD3 converter, run on row
    ids rather than on the weights: it tells which rows of which original tensor each diffusers layer
    takes, and the FP8 bytes are then gathered as they are. Layers with `scale_input` run with that
    static input scale; the others run weight-only, as ComfyUI runs them by default.
    """
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    tensors, _ = _read_safetensors(path)
    tensors = {k.removeprefix(COMFY_PREFIX): v for k, v in tensors.items()}
    if tensors.pop(COMFY_MARKER, None) is None:
        raise InputError(f"{path}: no {COMFY_MARKER!r} marker tensor: not a ComfyUI scaled-FP8 file")
    weight_scales = {
        k.removesuffix(".scale_weight"): tensors.pop(k) for k in list(tensors) if k.endswith(".scale_weight")
    }
    input_scales = {k.removesuffix(".scale_input"): tensors.pop(k) for k in list(tensors) if k.endswith(".scale_input")}
    if any(t.dtype == torch.float64 for t in tensors.values()):
        raise InputError(f"{path}: float64 tensors are not expected in an SD3 checkpoint")

    # Replace every 2-D weight by a column of global row ids; real weights are never float64.
    proxy: dict[str, torch.Tensor] = {}
    row_owner: list[tuple[int, str]] = []
    offset = 0
    for key, tensor in tensors.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            proxy[key] = torch.arange(offset, offset + tensor.shape[0], dtype=torch.float64)[:, None]
            row_owner.append((offset, key))
            offset += tensor.shape[0]
        else:
            proxy[key] = tensor
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(proxy)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise InputError(f"{path}: not an SD3 transformer checkpoint ({type(exc).__name__}: {exc})") from exc

    compute_dtype = next(reference.parameters()).dtype  # the model runs in the reference's dtype
    starts = torch.tensor([start for start, _ in row_owner])
    fp8_layers: dict[str, Fp8Linear] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if value.dtype != torch.float64:
            rest[key] = value
            continue
        ids = value[:, 0].long()
        start, original_key = row_owner[int(torch.searchsorted(starts, ids[0], right=True)) - 1]
        source = tensors[original_key]
        rows = ids - start
        base = original_key.removesuffix(".weight")
        if source.dtype in FORMATS.values():
            weight = source.view(torch.uint8)[rows].view(source.dtype)  # gather the bytes, exactly
            fmt = next(name for name, dtype in FORMATS.items() if dtype == source.dtype)
            has_input = base in input_scales
            spec = Fp8Spec(format=fmt, weights="per_tensor", activations="static" if has_input else "none")
            backend = resolve_backend(spec, tuple(weight.shape), device, compute_dtype)  # type: ignore[arg-type]
            layer = key.removesuffix(".weight")
            fp8_layers[layer] = Fp8Linear(
                weight,
                weight_scales[base].reshape(1, 1),
                converted.get(layer + ".bias"),
                spec,
                backend,
                compute_dtype,
                input_scales[base].reshape(1, 1) if has_input else None,
            )
        else:
            rest[key] = source[rows]
    for layer in fp8_layers:
        rest.pop(layer + ".bias", None)
    metadata = {"format": "comfyui-scaled-fp8", "policy": path.stem, "layers_fp8": str(len(fp8_layers))}
    return _assemble(reference, fp8_layers, rest, path).to(device), metadata
