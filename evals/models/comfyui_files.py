"""ComfyUI-style FP8 files, imported as they are (the FP8 bytes are never re-quantized).

ComfyUI's SD3 layout (comfy/supported_models.py `SD3`, comfy/text_encoders/sd3_clip.py):
- the transformer under `model.diffusion_model.` with original SD3 key names (or unprefixed, in a
  transformer-only file), its marker `model.diffusion_model.scaled_fp8` (or `scaled_fp8`);
- CLIP-L, CLIP-G and T5-XXL under `text_encoders.clip_l.transformer.`,
  `text_encoders.clip_g.transformer.` and `text_encoders.t5xxl.transformer.`, with the same key
  names as transformers' `CLIPTextModelWithProjection` and `T5EncoderModel`; a scaled encoder's
  marker is `<prefix>scaled_fp8`;
- a T5 file of its own (`t5xxl_fp8_e4m3fn.safetensors`, `t5xxl_fp8_e4m3fn_scaled.safetensors`):
  the T5 keys unprefixed, `scaled_fp8` at the top when scaled.
An FP8 linear weight comes with a per-tensor `*.scale_weight` (required where the part is marked
scaled; 1 where it is not, as ComfyUI runs plain FP8 casts) and optionally `*.scale_input`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from evals.models.checkpoint_checks import (
    assemble,
    check_bias,
    check_fp8_weight,
    check_scale,
    dtype_name,
    read_safetensors,
)
from evals.models.fp8 import FORMATS, Fp8Linear, Fp8Spec, resolve_backend
from evals.models.yamlspec import InputError

COMFY_MARKER = "scaled_fp8"
COMFY_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
ENCODER_NAMES = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
T5_PROBE = "encoder.final_layer_norm.weight"
"""The key ComfyUI itself tests for a T5 state dict (`t5_xxl_detect`)."""
VAE_PREFIX = "first_stage_model."
"""An all-in-one file's VAE: not read (FP8 files keep it unquantized; the reference's is used)."""
FP8_DTYPES = tuple(FORMATS.values())


def comfy_parts(keys: Iterable[str]) -> list[str]:
    """The components a file carries in ComfyUI's layout (empty: not such a file)."""
    keys = set(keys)
    parts = []
    standalone_t5 = T5_PROBE in keys
    if any(k.startswith(COMFY_PREFIX) for k in keys) or (COMFY_MARKER in keys and not standalone_t5):
        parts.append("transformer")
    parts += [c for c, prefix in TEXT_ENCODER_PREFIXES.items() if any(k.startswith(prefix) for k in keys)]
    if standalone_t5 and "text_encoder_3" not in parts:
        parts.append("text_encoder_3")
    return parts


def import_comfy_scaled_fp8(path: Path, reference: Any, device: torch.device) -> tuple[Any, dict[str, str]]:
    """Import a ComfyUI-style scaled-FP8 SD3 transformer file as a candidate transformer."""
    tensors, _ = read_safetensors(path)
    transformer = comfy_transformer(path, tensors, reference, device)
    fp8 = sum(isinstance(m, Fp8Linear) for m in transformer.modules())
    return transformer.to(device), {"format": "comfyui-scaled-fp8", "policy": path.stem, "layers_fp8": str(fp8)}


def import_comfy_file(
    path: Path, tensors: dict[str, torch.Tensor], reference: dict[str, Any], device: torch.device
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every component a ComfyUI-style file carries (transformer, CLIP-L, CLIP-G, T5), each built on
    the reference's architecture: {component: module} and the candidate's metadata."""
    parts = comfy_parts(tensors)
    unknown = [
        k
        for k in tensors
        if k.startswith("text_encoders.")
        and not k.startswith(tuple(TEXT_ENCODER_PREFIXES.values()))
        and not k.endswith(".logit_scale")  # CLIP's training temperature: unused by SD3
    ]
    if unknown:
        raise InputError(f"{path}: {unknown[0]} is not a key of ComfyUI's SD3 text encoders (clip_l, clip_g, t5xxl)")
    out: dict[str, Any] = {}
    for component in parts:
        if reference.get(component) is None:
            hint = " (it was loaded with --no-t5?)" if component == "text_encoder_3" else ""
            raise InputError(
                f"{path}: carries {ENCODER_NAMES.get(component, component)} ({component}), which this model "
                f"does not have{hint}"
            )
        if component == "transformer":
            own = {k: v for k, v in tensors.items() if not k.startswith(("text_encoders.", VAE_PREFIX))}
            out[component] = comfy_transformer(path, own, reference[component], device)
            continue
        prefix = TEXT_ENCODER_PREFIXES[component]
        if not any(k.startswith(prefix) for k in tensors):
            prefix = ""  # a T5 file of its own
        section = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        out[component] = comfy_text_encoder(path, prefix, section, reference[component], device, component)
    fp8 = sum(isinstance(m, Fp8Linear) for module in out.values() for m in module.modules())
    metadata = {
        "format": "comfyui-scaled-fp8",
        "policy": path.stem,
        "layers_fp8": str(fp8),
        "components": ",".join(parts),
    }
    return {c: m.to(device) for c, m in out.items()}, metadata


def _scales(tensors: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    return {k.removesuffix(suffix): tensors.pop(k) for k in list(tensors) if k.endswith(suffix)}


def _comfy_fp8_linear(
    path: Path,
    named: str,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    scaled: bool,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> Fp8Linear:
    """One FP8 linear layer of a ComfyUI file, per-tensor scaled; `named` is its name in the file
    (its bias is checked by the caller, which knows that key's name)."""
    fmt = next(name for name, dtype in FORMATS.items() if dtype == weight.dtype)
    check_fp8_weight(path, f"{named}.weight", weight, fmt)
    if scale is None:
        if scaled:
            raise InputError(f"{path}: {named}.weight is FP8 but {named}.scale_weight is missing")
        scale = torch.ones(())  # a plain FP8 cast: ComfyUI runs it with scale 1
    check_scale(path, f"{named}.scale_weight", scale, (1, 1), exact=False)
    if input_scale is not None:
        check_scale(path, f"{named}.scale_input", input_scale, (1, 1), exact=False)
    spec = Fp8Spec(format=fmt, weights="per_tensor", activations="none" if input_scale is None else "static")
    backend = resolve_backend(spec, (weight.shape[0], weight.shape[1]), device, compute_dtype)
    return Fp8Linear(
        weight,
        scale.reshape(1, 1),
        bias,
        spec,
        backend,
        compute_dtype,
        None if input_scale is None else input_scale.reshape(1, 1),
    )


def comfy_text_encoder(
    path: Path, prefix: str, section: dict[str, torch.Tensor], reference: Any, device: torch.device, component: str
) -> Any:
    """A text encoder from its section of a ComfyUI file (keys without `prefix`, which messages add
    back). FP8 linear weights become FP8 layers that run weight-only (static with `scale_input`);
    other FP8 tensors (plain FP8 files cast norms and embeddings too) are widened to the encoder's
    dtype, which holds every FP8 value exactly, as ComfyUI computes with them."""
    section = dict(section)
    scaled = section.pop(COMFY_MARKER, None) is not None
    weight_scales, input_scales = _scales(section, ".scale_weight"), _scales(section, ".scale_input")
    expected = reference.state_dict()
    for key in [k for k in section if k.endswith("position_ids") and k not in expected]:
        del section[key]  # older exports save CLIP's position ids; they are arange(n) in any case
    compute_dtype = next(reference.parameters()).dtype
    linears = {n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    fp8_names = [
        k.removesuffix(".weight") for k, v in section.items() if v.dtype in FP8_DTYPES and k.endswith(".weight")
    ]
    fp8_names = [n for n in fp8_names if n in linears]
    for name in list(weight_scales) + list(input_scales):
        if name not in fp8_names:
            stored = section.get(f"{name}.weight")
            what = "absent" if stored is None else f"stored as {dtype_name(stored.dtype)}"
            raise InputError(
                f"{path}: {prefix}{name} has FP8 scales but its weight is {what}, expected an FP8 weight of a "
                f"linear layer of {component}"
            )
    rest = {k: (v.to(compute_dtype) if v.dtype in FP8_DTYPES else v) for k, v in section.items()}
    fp8_layers = {}
    for name in fp8_names:
        rest.pop(f"{name}.weight")
        weight = section[f"{name}.weight"]
        bias = rest.pop(f"{name}.bias", None)
        check_bias(path, f"{prefix}{name}.bias", bias, weight.shape[0])
        fp8_layers[name] = _comfy_fp8_linear(
            path,
            prefix + name,
            weight,
            weight_scales.get(name),
            input_scales.get(name),
            bias,
            scaled,
            device,
            compute_dtype,
        )
    return assemble(reference, fp8_layers, rest, path, component, prefix=prefix)


def comfy_transformer(path: Path, tensors: dict[str, torch.Tensor], reference: Any, device: torch.device) -> Any:
    """The transformer of a ComfyUI-style file, bytes unchanged.

    Key renaming and the split of fused qkv weights reuse diffusers' own SD3 converter, run on row
    ids rather than on the weights: it tells which rows of which original tensor each diffusers layer
    takes, and the FP8 bytes are then gathered as they are. Layers with `scale_input` run with that
    static input scale; the others run weight-only, as ComfyUI runs them by default.
    """
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    prefixed = any(k.startswith(COMFY_PREFIX) for k in tensors)  # for messages: the names as in the file
    tensors = {k.removeprefix(COMFY_PREFIX): v for k, v in tensors.items()}
    scaled = tensors.pop(COMFY_MARKER, None) is not None
    weight_scales, input_scales = _scales(tensors, ".scale_weight"), _scales(tensors, ".scale_input")
    if any(t.dtype == torch.float64 for t in tensors.values()):
        raise InputError(f"{path}: float64 tensors are not expected in an SD3 checkpoint")

    # Replace every 2-D weight by a column of global row ids; real weights are never float64.
    proxy: dict[str, torch.Tensor] = {}
    row_owner: list[tuple[int, str]] = []
    offset = 0
    for key, tensor in tensors.items():
        if key.endswith(".weight") and tensor.ndim == 2 and tensor.shape[0] > 0:
            proxy[key] = torch.arange(offset, offset + tensor.shape[0], dtype=torch.float64)[:, None]
            row_owner.append((offset, key))
            offset += tensor.shape[0]
        else:
            proxy[key] = tensor
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(proxy)
    except MemoryError:
        raise
    except Exception as exc:  # diffusers' converter, on whatever keys and shapes the file has
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
        named = f"{COMFY_PREFIX if prefixed else ''}{base}"
        if bool((rows < 0).any()) or bool((rows >= source.shape[0]).any()):
            raise InputError(f"{path}: {named}.weight has shape {tuple(source.shape)}, not an SD3 one")
        if source.dtype in FP8_DTYPES:
            weight = source.view(torch.uint8)[rows].view(source.dtype)  # gather the bytes, exactly
            layer = key.removesuffix(".weight")
            bias = converted.get(layer + ".bias")
            check_bias(path, f"{layer}.bias", bias, weight.shape[0])
            fp8_layers[layer] = _comfy_fp8_linear(
                path,
                named,
                weight,
                weight_scales.get(base),
                input_scales.get(base),
                bias,
                scaled,
                device,
                compute_dtype,
            )
        elif base in weight_scales or base in input_scales:
            raise InputError(
                f"{path}: {named} has FP8 scales but its weight is stored as {dtype_name(source.dtype)}, "
                f"expected {' or '.join(dtype_name(d) for d in FP8_DTYPES)}"
            )
        else:
            rest[key] = source[rows]
    for layer in fp8_layers:
        rest.pop(layer + ".bias", None)
    return assemble(reference, fp8_layers, rest, path)
