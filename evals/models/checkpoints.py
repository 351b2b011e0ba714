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
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from evals.models.fp8 import FORMATS, Fp8Linear, Fp8Spec, resolve_backend
from evals.models.fp8_spec import ACTIVATIONS, BACKENDS, FORMAT_NAMES, WEIGHT_SCALES
from evals.models.names import USUAL_FILE_MODE
from evals.models.policy_schema import MAX_BLOCK_SIZE
from evals.models.safetensors_files import opened_safetensors
from evals.models.yamlspec import InputError

FORMAT_MARKER = "sd35-fp8-gate/quantized-transformer"
FORMAT_VERSION = "1"
COMFY_MARKER = "scaled_fp8"
COMFY_PREFIX = "model.diffusion_model."
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What a layer's `compute_dtype` may name (never any other torch attribute)."""
SPEC_CHOICES: dict[str, tuple[str, ...]] = {
    "format": FORMAT_NAMES,
    "weights": WEIGHT_SCALES,
    "activations": ACTIVATIONS,
    "backend": BACKENDS,
}


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
    # A unique temporary name, created exclusively: concurrent writers never share it, and a link
    # planted at a predictable name is never written through; the rename replaces `path` itself.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, name, metadata=metadata)
        # safetensors writes a private (0600) file; the checkpoint gets the usual permissions
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, USUAL_FILE_MODE)
        finally:
            os.close(fd)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    with opened_safetensors(path) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kind(dtype: torch.dtype) -> str:
    """What a tensor holds, as far as loading goes: FP8, another float type, or that dtype."""
    if dtype in FORMATS.values():
        return "fp8"
    return "float" if dtype.is_floating_point else _dtype_name(dtype)


def _layer_spec(path: Path, name: Any, info: Any) -> tuple[Fp8Spec, torch.dtype]:
    """A layer's entry of the `layers` metadata, checked key by key and value by value."""
    where = f"{path}: metadata 'layers' entry {_short(name)}"
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: expected a layer name")
    if not isinstance(info, dict) or set(info) != {"spec", "compute_dtype"}:
        raise InputError(f"{where}: expected {{'spec': {{...}}, 'compute_dtype': ...}}, got {_short(info)}")
    dtype = info["compute_dtype"]
    if not isinstance(dtype, str) or dtype not in COMPUTE_DTYPES:
        raise InputError(f"{where}: compute_dtype {_short(dtype)}, expected one of {', '.join(COMPUTE_DTYPES)}")
    spec = info["spec"]
    keys = [f.name for f in fields(Fp8Spec)]
    if not isinstance(spec, dict) or set(spec) != set(keys):
        got = sorted(spec) if isinstance(spec, dict) else _short(spec)
        raise InputError(f"{where}: spec must have exactly the keys {', '.join(keys)}; got {got}")
    for key, choices in SPEC_CHOICES.items():
        if not isinstance(spec[key], str) or spec[key] not in choices:
            raise InputError(f"{where}: spec {key} {_short(spec[key])}, expected one of {', '.join(choices)}")
    block = spec["block_size"]
    if type(block) is not int or not 1 <= block <= MAX_BLOCK_SIZE or block & (block - 1):
        raise InputError(f"{where}: spec block_size {_short(block)}, expected a power of two <= {MAX_BLOCK_SIZE}")
    if type(spec["fast_accum"]) is not bool:
        raise InputError(f"{where}: spec fast_accum {_short(spec['fast_accum'])}, expected true or false")
    return Fp8Spec(**spec), COMPUTE_DTYPES[dtype]


def _scale_shape(spec: Fp8Spec, shape: tuple[int, int]) -> tuple[int, int]:
    out_features, in_features = shape
    if spec.weights == "per_tensor":
        return (1, 1)
    if spec.weights == "per_channel":
        return (out_features, 1)
    return (-(-out_features // spec.block_size), -(-in_features // spec.block_size))


def _check_fp8_weight(path: Path, key: str, weight: torch.Tensor, fmt: str) -> None:
    if weight.dtype != FORMATS[fmt]:
        raise InputError(
            f"{path}: {key} is stored as {_dtype_name(weight.dtype)}, expected {_dtype_name(FORMATS[fmt])} "
            f"(FP8 format {fmt})"
        )
    if weight.ndim != 2 or 0 in weight.shape:
        raise InputError(f"{path}: {key} has shape {tuple(weight.shape)}, expected a 2-D (out, in) matrix")


def _check_scale(path: Path, key: str, scale: torch.Tensor, shape: tuple[int, ...], exact: bool = True) -> None:
    """Scales are float32 of `shape`; `exact` False (ComfyUI's): any float type, one element. Their
    values are not judged here: a NaN or negative scale is a broken build, for the gate to fail."""
    if (scale.dtype != torch.float32) if exact else _kind(scale.dtype) != "float":
        want = "float32" if exact else "a float type (not FP8)"
        raise InputError(f"{path}: {key} is stored as {_dtype_name(scale.dtype)}, expected {want}")
    if (tuple(scale.shape) != shape) if exact else scale.numel() != 1:
        want = str(shape) if exact else "one per-tensor scale"
        raise InputError(f"{path}: {key} has shape {tuple(scale.shape)}, expected {want}")


def _check_bias(path: Path, key: str, bias: torch.Tensor | None, out_features: int) -> None:
    if bias is None:
        return
    if _kind(bias.dtype) != "float" or tuple(bias.shape) != (out_features,):
        raise InputError(
            f"{path}: {key} is {_dtype_name(bias.dtype)} of shape {tuple(bias.shape)}, expected a float "
            f"vector of {out_features}"
        )


def _fp8_layer(
    path: Path,
    name: str,
    tensors: dict[str, torch.Tensor],
    spec: Fp8Spec,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> Fp8Linear:
    """The layer `name` of one of our checkpoints, its tensors popped from `tensors` and checked."""
    missing = [f"{name}.{b}" for b in ("weight_fp8", "weight_scale") if f"{name}.{b}" not in tensors]
    if spec.activations == "static" and f"{name}.input_scale" not in tensors:
        missing.append(f"{name}.input_scale")
    if missing:
        raise InputError(f"{path}: the metadata lists layer {name!r}, but tensor {missing[0]} is missing")
    weight = tensors.pop(f"{name}.weight_fp8")
    _check_fp8_weight(path, f"{name}.weight_fp8", weight, spec.format)
    shape = (weight.shape[0], weight.shape[1])
    scale = tensors.pop(f"{name}.weight_scale")
    _check_scale(path, f"{name}.weight_scale", scale, _scale_shape(spec, shape))
    bias = tensors.pop(f"{name}.bias", None)
    _check_bias(path, f"{name}.bias", bias, shape[0])
    input_scale = tensors.pop(f"{name}.input_scale", None)
    if input_scale is not None:
        if spec.activations != "static":
            raise InputError(f"{path}: {name}.input_scale given, but the layer's activations are {spec.activations}")
        _check_scale(path, f"{name}.input_scale", input_scale, (1, 1))
    try:
        backend = resolve_backend(spec, shape, device, compute_dtype)
    except InputError as exc:  # backend: scaled_mm named where it cannot run
        raise InputError(f"{path}: layer {name!r}: {exc}") from exc
    return Fp8Linear(weight, scale, bias, spec, backend, compute_dtype, input_scale)


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
            raise InputError(f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(want.shape)}")
        if _kind(value.dtype) != _kind(want.dtype):
            raise InputError(
                f"{source}: {key} is stored as {_dtype_name(value.dtype)}, expected {_dtype_name(want.dtype)}"
            )
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
    try:
        layers = json.loads(metadata["layers"])
    except KeyError:
        raise InputError(f"{path}: no 'layers' metadata (the FP8 settings of each layer)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: metadata 'layers' is not JSON ({exc})") from exc
    if not isinstance(layers, dict) or not layers:
        raise InputError(f"{path}: metadata 'layers' must map layer names to their FP8 settings, got {_short(layers)}")
    specs = {name: _layer_spec(path, name, info) for name, info in layers.items()}
    fp8_layers = {name: _fp8_layer(path, name, tensors, *specs[name], device) for name in specs}
    return _assemble(reference, fp8_layers, tensors, path).to(device), metadata


def is_comfy_scaled_fp8(path: Path) -> bool:
    with opened_safetensors(path) as f:
        return any(k in (COMFY_MARKER, COMFY_PREFIX + COMFY_MARKER) for k in f.keys())


def import_comfy_scaled_fp8(path: Path, reference: Any, device: torch.device) -> tuple[Any, dict[str, str]]:
    """Import a ComfyUI-style scaled-FP8 SD3 file as a candidate transformer, bytes unchanged.

    Key renaming and the split of fused qkv weights reuse diffusers' own SD3 converter, run on row
    ids rather than on the weights: it tells which rows of which original tensor each diffusers layer
    takes, and the FP8 bytes are then gathered as they are. Layers with `scale_input` run with that
    static input scale; the others run weight-only, as ComfyUI runs them by default.
    """
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    tensors, _ = _read_safetensors(path)
    prefixed = any(k.startswith(COMFY_PREFIX) for k in tensors)  # for messages: the names as in the file
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
        if source.dtype in FORMATS.values():
            if base not in weight_scales:
                raise InputError(f"{path}: {named}.weight is FP8 but {named}.scale_weight is missing")
            _check_scale(path, f"{named}.scale_weight", weight_scales[base], (1, 1), exact=False)
            weight = source.view(torch.uint8)[rows].view(source.dtype)  # gather the bytes, exactly
            fmt = next(name for name, dtype in FORMATS.items() if dtype == source.dtype)
            has_input = base in input_scales
            if has_input:
                _check_scale(path, f"{named}.scale_input", input_scales[base], (1, 1), exact=False)
            spec = Fp8Spec(format=fmt, weights="per_tensor", activations="static" if has_input else "none")
            backend = resolve_backend(spec, (weight.shape[0], weight.shape[1]), device, compute_dtype)
            layer = key.removesuffix(".weight")
            bias = converted.get(layer + ".bias")
            _check_bias(path, f"{layer}.bias", bias, weight.shape[0])
            fp8_layers[layer] = Fp8Linear(
                weight,
                weight_scales[base].reshape(1, 1),
                bias,
                spec,
                backend,
                compute_dtype,
                input_scales[base].reshape(1, 1) if has_input else None,
            )
        elif base in weight_scales or base in input_scales:
            raise InputError(
                f"{path}: {named} has FP8 scales but its weight is stored as {_dtype_name(source.dtype)}, "
                f"expected {' or '.join(_dtype_name(d) for d in FORMATS.values())}"
            )
        else:
            rest[key] = source[rows]
    for layer in fp8_layers:
        rest.pop(layer + ".bias", None)
    metadata = {"format": "comfyui-scaled-fp8", "policy": path.stem, "layers_fp8": str(len(fp8_layers))}
    return _assemble(reference, fp8_layers, rest, path).to(device), metadata
