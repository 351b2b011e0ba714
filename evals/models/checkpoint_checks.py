"""Checks shared by the readers of quantized files (this project's checkpoints, ComfyUI's files):
every tensor and metadata entry an untrusted file gives is checked before it is used, and each
problem is an InputError naming the file and the key. Also the step that builds a component from
the checked pieces: a copy of the reference's with FP8 layers swapped in and the rest loaded strictly."""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from evals.models.fp8 import FORMATS, Fp8Linear, Fp8Spec, resolve_backend
from evals.models.fp8_spec import ACTIVATIONS, BACKENDS, FORMAT_NAMES, WEIGHT_SCALES
from evals.models.policy_schema import MAX_BLOCK_SIZE
from evals.models.safetensors_files import opened_safetensors
from evals.models.yamlspec import InputError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What a layer's `compute_dtype` or a component's dtype may name (never any other torch attribute)."""
SPEC_CHOICES: dict[str, tuple[str, ...]] = {
    "format": FORMAT_NAMES,
    "weights": WEIGHT_SCALES,
    "activations": ACTIVATIONS,
    "backend": BACKENDS,
}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    with opened_safetensors(path) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kind(dtype: torch.dtype) -> str:
    """What a tensor holds, as far as loading goes: FP8, another float type, or that dtype."""
    if dtype in FORMATS.values():
        return "fp8"
    return "float" if dtype.is_floating_point else dtype_name(dtype)


def layer_spec(path: Path, name: Any, info: Any, section: str = "layers") -> tuple[Fp8Spec, torch.dtype]:
    """A layer's entry of the `section` metadata, checked key by key and value by value."""
    where = f"{path}: metadata '{section}' entry {short(name)}"
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: expected a layer name")
    if not isinstance(info, dict) or set(info) != {"spec", "compute_dtype"}:
        raise InputError(f"{where}: expected {{'spec': {{...}}, 'compute_dtype': ...}}, got {short(info)}")
    dtype = info["compute_dtype"]
    if not isinstance(dtype, str) or dtype not in COMPUTE_DTYPES:
        raise InputError(f"{where}: compute_dtype {short(dtype)}, expected one of {', '.join(COMPUTE_DTYPES)}")
    spec = info["spec"]
    keys = [f.name for f in fields(Fp8Spec)]
    if not isinstance(spec, dict) or set(spec) != set(keys):
        got = sorted(spec) if isinstance(spec, dict) else short(spec)
        raise InputError(f"{where}: spec must have exactly the keys {', '.join(keys)}; got {got}")
    for key, choices in SPEC_CHOICES.items():
        if not isinstance(spec[key], str) or spec[key] not in choices:
            raise InputError(f"{where}: spec {key} {short(spec[key])}, expected one of {', '.join(choices)}")
    block = spec["block_size"]
    if type(block) is not int or not 1 <= block <= MAX_BLOCK_SIZE or block & (block - 1):
        raise InputError(f"{where}: spec block_size {short(block)}, expected a power of two <= {MAX_BLOCK_SIZE}")
    if type(spec["fast_accum"]) is not bool:
        raise InputError(f"{where}: spec fast_accum {short(spec['fast_accum'])}, expected true or false")
    return Fp8Spec(**spec), COMPUTE_DTYPES[dtype]


def scale_shape(spec: Fp8Spec, shape: tuple[int, int]) -> tuple[int, int]:
    out_features, in_features = shape
    if spec.weights == "per_tensor":
        return (1, 1)
    if spec.weights == "per_channel":
        return (out_features, 1)
    return (-(-out_features // spec.block_size), -(-in_features // spec.block_size))


def check_fp8_weight(path: Path, key: str, weight: torch.Tensor, fmt: str) -> None:
    if weight.dtype != FORMATS[fmt]:
        raise InputError(
            f"{path}: {key} is stored as {dtype_name(weight.dtype)}, expected {dtype_name(FORMATS[fmt])} "
            f"(FP8 format {fmt})"
        )
    if weight.ndim != 2 or 0 in weight.shape:
        raise InputError(f"{path}: {key} has shape {tuple(weight.shape)}, expected a 2-D (out, in) matrix")


def check_scale(path: Path, key: str, scale: torch.Tensor, shape: tuple[int, ...], exact: bool = True) -> None:
    """Scales are float32 of `shape`; `exact` False (ComfyUI's): any float type, one element. Their
    values are not judged here: a NaN or negative scale is a broken build, for the gate to fail."""
    if (scale.dtype != torch.float32) if exact else kind(scale.dtype) != "float":
        want = "float32" if exact else "a float type (not FP8)"
        raise InputError(f"{path}: {key} is stored as {dtype_name(scale.dtype)}, expected {want}")
    if (tuple(scale.shape) != shape) if exact else scale.numel() != 1:
        want = str(shape) if exact else "one per-tensor scale"
        raise InputError(f"{path}: {key} has shape {tuple(scale.shape)}, expected {want}")


def check_bias(path: Path, key: str, bias: torch.Tensor | None, out_features: int) -> None:
    if bias is None:
        return
    if kind(bias.dtype) != "float" or tuple(bias.shape) != (out_features,):
        raise InputError(
            f"{path}: {key} is {dtype_name(bias.dtype)} of shape {tuple(bias.shape)}, expected a float "
            f"vector of {out_features}"
        )


def fp8_layer(
    path: Path,
    name: str,
    tensors: dict[str, torch.Tensor],
    spec: Fp8Spec,
    compute_dtype: torch.dtype,
    device: torch.device,
    prefix: str = "",
) -> Fp8Linear:
    """The layer `name` of one of our checkpoints, its tensors (`prefix` + name + ...) popped from
    `tensors` and checked."""
    key = prefix + name
    missing = [f"{key}.{b}" for b in ("weight_fp8", "weight_scale") if f"{key}.{b}" not in tensors]
    if spec.activations == "static" and f"{key}.input_scale" not in tensors:
        missing.append(f"{key}.input_scale")
    if missing:
        raise InputError(f"{path}: the metadata lists layer {name!r}, but tensor {missing[0]} is missing")
    weight = tensors.pop(f"{key}.weight_fp8")
    check_fp8_weight(path, f"{key}.weight_fp8", weight, spec.format)
    shape = (weight.shape[0], weight.shape[1])
    scale = tensors.pop(f"{key}.weight_scale")
    check_scale(path, f"{key}.weight_scale", scale, scale_shape(spec, shape))
    bias = tensors.pop(f"{key}.bias", None)
    check_bias(path, f"{key}.bias", bias, shape[0])
    input_scale = tensors.pop(f"{key}.input_scale", None)
    if input_scale is not None:
        if spec.activations != "static":
            raise InputError(f"{path}: {key}.input_scale given, but the layer's activations are {spec.activations}")
        check_scale(path, f"{key}.input_scale", input_scale, (1, 1))
    try:
        backend = resolve_backend(spec, shape, device, compute_dtype)
    except InputError as exc:  # backend: scaled_mm named where it cannot run
        raise InputError(f"{path}: layer {name!r}: {exc}") from exc
    return Fp8Linear(weight, scale, bias, spec, backend, compute_dtype, input_scale)


def _aliases(module: torch.nn.Module) -> dict[str, set[str]]:
    """State-dict keys that name one tensor (T5's `shared.weight` is `encoder.embed_tokens.weight`):
    a file that stores it once still fits."""
    by_tensor: dict[int, set[str]] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), set()).add(key)
    return {key: names - {key} for names in by_tensor.values() for key in names}


def assemble(
    reference: Any,
    fp8_layers: dict[str, Fp8Linear],
    rest: dict[str, torch.Tensor],
    source: Path,
    component: str = "transformer",
    dtype: torch.dtype | None = None,
    prefix: str = "",
) -> Any:
    """A copy of the reference `component` (cast to `dtype` when given) with `fp8_layers` swapped in
    and `rest` loaded strictly; messages name keys as the file does (`prefix` + key)."""
    from evals.models.sources import cast

    module = copy.deepcopy(reference)
    if dtype is not None:
        cast(module, dtype)  # before the swap: a cast would turn FP8 buffers into `dtype`
    for name, layer in fp8_layers.items():
        try:
            old = module.get_submodule(name)
        except AttributeError:
            raise InputError(f"{source}: layer {name!r} does not exist in this model's {component}") from None
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != layer.weight_fp8.shape:
            raise InputError(f"{source}: layer {name!r} has shape {tuple(layer.weight_fp8.shape)}, the model's differs")
        if (old.bias is None) != (layer.bias is None):
            raise InputError(
                f"{source}: layer {name!r} {'lacks' if layer.bias is None else 'has'} a bias, the model's differs"
            )
        module.set_submodule(name, layer)
    expected = module.state_dict()
    for key, value in rest.items():
        want = expected.get(key)
        if want is None:
            continue  # reported below, with the missing ones
        if tuple(value.shape) != tuple(want.shape):
            raise InputError(f"{source}: {prefix}{key} has shape {tuple(value.shape)}, expected {tuple(want.shape)}")
        if kind(value.dtype) != kind(want.dtype):
            raise InputError(
                f"{source}: {prefix}{key} is stored as {dtype_name(value.dtype)}, expected {dtype_name(want.dtype)}"
            )
    result = module.load_state_dict(rest, strict=False)
    fp8_keys = {f"{n}.{b}" for n, m in fp8_layers.items() for b, t in m.named_buffers() if t is not None}
    fp8_keys |= {f"{n}.bias" for n, m in fp8_layers.items() if m.bias is not None}
    aliases = _aliases(module)
    missing = [k for k in result.missing_keys if k not in fp8_keys and not aliases.get(k, set()) & set(rest)]
    if missing or result.unexpected_keys:
        raise InputError(
            f"{source}: does not fit this model's {component} (missing {[prefix + k for k in missing[:3]]}, "
            f"unexpected {[prefix + k for k in result.unexpected_keys[:3]]}); is it for another SD3 variant?"
        )
    if fp8_layers and component == "transformer":
        from evals.models.fp8_block import fuse_fp8_modules  # diffusers' block classes: imported when needed

        fuse_fp8_modules(module)
    return module
