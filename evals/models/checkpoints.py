"""Quantized checkpoints (safetensors only, never pickle): this project's own format, and the
dispatch that also reads ComfyUI-style FP8 files (`evals.models.comfyui_files`).

Our format holds each component a policy changed as its state dict is (FP8 weights, float32
scales, calibrated input scales), with metadata naming the policy, its hash and each FP8 layer's
settings; loading rebuilds the same modules from the stored tensors: bit-exact, nothing is
re-quantized.
- Version 1: the transformer alone, its tensors under their own names, metadata `layers`.
- Version 2: any components (transformer, text encoders, VAE), tensors under `<component>.<key>`,
  metadata `components` = {component: {"dtype": ..., "layers": {layer: settings}}} and `dropped`
  (T5, when the policy leaves it out). Written only when a policy changes more than the
  transformer, so that transformer-only files stay readable by earlier versions.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evals.models.checkpoint_checks import (
    COMPUTE_DTYPES,
    assemble,
    dtype_name,
    fp8_layer,
    layer_spec,
    read_safetensors,
    short,
)
from evals.models.comfyui_files import comfy_parts, import_comfy_file
from evals.models.comfyui_files import import_comfy_scaled_fp8 as import_comfy_scaled_fp8  # kept importable here
from evals.models.fp8 import Fp8Linear
from evals.models.names import USUAL_FILE_MODE
from evals.models.precision import COMPONENTS
from evals.models.yamlspec import InputError

FORMAT_MARKER = "sd35-fp8-gate/quantized-transformer"
FORMAT_VERSION = "1"
COMPONENTS_VERSION = "2"

DROPPABLE = ("text_encoder_3",)
"""What a policy may leave out of the candidate (T5: SD3 runs without it)."""


@dataclass
class LoadedCheckpoint:
    components: dict[str, Any]
    """The components the file replaces ({name: module}, None for a dropped one, with its tokenizer)."""
    metadata: dict[str, str]
    """The file's metadata (ours), or what was found (a ComfyUI file)."""
    read: tuple[str, ...]
    """The components built from the file's tensors, in pipeline order."""


def _fp8_settings(module: Any) -> dict[str, Any]:
    return {
        name: {"spec": asdict(m.spec), "compute_dtype": dtype_name(m.compute_dtype)}
        for name, m in module.named_modules()
        if isinstance(m, Fp8Linear)
    }


def _unique_state(module: Any) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once: tied weights (T5's `shared` and `encoder.embed_tokens`)
    are one tensor, which safetensors stores under one name; loading fills its other names."""
    seen: set[int] = set()
    state = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            state[key] = value.detach().contiguous().cpu()
    return state


def _write(state: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """One safetensors file at `path`, atomically, with the usual file permissions."""
    from safetensors.torch import save_file

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


def save_quantized_transformer(transformer: Any, path: Path, *, policy_name: str, policy_sha256: str) -> None:
    """Write the candidate transformer (with its Fp8Linear layers) to one safetensors file (version 1)."""
    layers = _fp8_settings(transformer)
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
    _write(state, metadata, path)


def save_quantized_components(
    components: dict[str, tuple[Any, str]],
    path: Path,
    *,
    policy_name: str,
    policy_sha256: str,
    dropped: tuple[str, ...] = (),
) -> None:
    """Write several components ({name: (module, dtype name)}) to one safetensors file (version 2)."""
    if not any(_fp8_settings(module) for module, _ in components.values()):
        raise ValueError("no component has FP8 layers: nothing to save")
    state = {f"{name}.{k}": v for name, (module, _) in components.items() for k, v in _unique_state(module).items()}
    parts = {name: {"dtype": dtype, "layers": _fp8_settings(module)} for name, (module, dtype) in components.items()}
    metadata = {
        "format": FORMAT_MARKER,
        "version": COMPONENTS_VERSION,
        "policy": policy_name,
        "policy_sha256": policy_sha256,
        "components": json.dumps(parts, sort_keys=True),
        "dropped": json.dumps(list(dropped)),
    }
    _write(state, metadata, path)


def save_policy_build(policy: Any, built: dict[str, Any], reference: dict[str, Any], path: Path) -> list[str]:
    """Save what `policy` changed in the reference's components (`built`: the candidate's): every
    component with FP8 layers or a dtype of its own, and which are dropped. A change to the
    transformer alone is written as version 1. Returns the components saved."""

    def dtype_of(module: Any) -> str:
        return dtype_name(next(module.parameters()).dtype)

    fp8 = [c for c in COMPONENTS if built.get(c) is not None and _fp8_settings(built[c])]
    if not fp8:
        raise InputError(f"{policy.path}: quantizes no layer of any component: there is nothing to save")
    retyped = {
        c: part.dtype
        for c, part in policy.components.items()
        if part.dtype and reference.get(c) is not None and part.dtype != dtype_of(reference[c])
    }
    saved = [c for c in COMPONENTS if c in fp8 or c in retyped]
    dropped = tuple(c for c, part in policy.components.items() if part.drop)
    if saved == ["transformer"] and not retyped and not dropped:
        save_quantized_transformer(built["transformer"], path, policy_name=policy.name, policy_sha256=policy.sha256)
        return saved
    parts = {c: (built[c], retyped.get(c) or dtype_of(reference[c])) for c in saved}
    save_quantized_components(parts, path, policy_name=policy.name, policy_sha256=policy.sha256, dropped=dropped)
    return saved


def _json_metadata(path: Path, metadata: dict[str, str], key: str, what: str) -> Any:
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise InputError(f"{path}: no {key!r} metadata ({what})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: metadata {key!r} is not JSON ({exc})") from exc


def _load_transformer(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], reference: Any, device: torch.device
) -> Any:
    """Version 1: the transformer alone."""
    layers = _json_metadata(path, metadata, "layers", "the FP8 settings of each layer")
    if not isinstance(layers, dict) or not layers:
        raise InputError(f"{path}: metadata 'layers' must map layer names to their FP8 settings, got {short(layers)}")
    specs = {name: layer_spec(path, name, info) for name, info in layers.items()}
    fp8_layers = {name: fp8_layer(path, name, tensors, *specs[name], device) for name in specs}
    return assemble(reference, fp8_layers, tensors, path).to(device)


def _load_components(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], reference: dict[str, Any], device: Any
) -> dict[str, Any]:
    """Version 2: each component the metadata lists, from the tensors under its name."""
    parts = _json_metadata(path, metadata, "components", "what each saved component holds")
    if not isinstance(parts, dict) or not parts:
        raise InputError(f"{path}: metadata 'components' must map component names to settings, got {short(parts)}")
    dropped = _json_metadata(path, metadata, "dropped", "the components the policy leaves out")
    if not isinstance(dropped, list) or any(c not in DROPPABLE for c in dropped):
        raise InputError(f"{path}: metadata 'dropped' {short(dropped)}, expected a list of {', '.join(DROPPABLE)}")
    if set(dropped) & set(parts):
        raise InputError(f"{path}: metadata 'dropped' names {sorted(set(dropped) & set(parts))}, which it also holds")
    for name, entry in parts.items():
        where = f"{path}: metadata 'components' entry {short(name)}"
        if name not in COMPONENTS:
            raise InputError(f"{where}: expected one of {', '.join(COMPONENTS)}")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "layers"}:
            raise InputError(f"{where}: expected {{'dtype': ..., 'layers': {{...}}}}, got {short(entry)}")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in COMPUTE_DTYPES:
            raise InputError(f"{where}: dtype {short(entry['dtype'])}, expected one of {', '.join(COMPUTE_DTYPES)}")
        if not isinstance(entry["layers"], dict):
            raise InputError(f"{where}: 'layers' must map layer names to their FP8 settings")
        if reference.get(name) is None:
            raise InputError(f"{path}: holds {name}, which this model does not have")
    stray = [k for k in tensors if k.split(".", 1)[0] not in parts]
    if stray:
        raise InputError(f"{path}: tensor {stray[0]} belongs to no component that the metadata 'components' lists")
    out: dict[str, Any] = {}
    for name, entry in parts.items():
        section = f"components.{name}.layers"
        specs = {layer: layer_spec(path, layer, info, section) for layer, info in entry["layers"].items()}
        prefix = f"{name}."
        fp8_layers = {layer: fp8_layer(path, layer, tensors, *specs[layer], device, prefix) for layer in specs}
        rest = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        dtype = COMPUTE_DTYPES[entry["dtype"]]
        out[name] = assemble(reference[name], fp8_layers, rest, path, name, dtype, prefix).to(device)
    for name in dropped:
        out[name] = None
        out[name.replace("text_encoder", "tokenizer")] = None
    return out


def load_quantized_transformer(path: Path, reference: Any, device: torch.device) -> tuple[Any, dict[str, str]]:
    """Load a file written by `save_quantized_transformer` (version 1) onto `reference`'s architecture."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT_MARKER:
        raise InputError(f"{path}: not a quantized transformer written by this tool (no {FORMAT_MARKER!r} metadata)")
    if metadata.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint version {metadata.get('version')!r}, this tool reads {FORMAT_VERSION}")
    return _load_transformer(path, tensors, metadata, reference, device), metadata


def load_checkpoint(path: Path, reference: dict[str, Any], device: torch.device) -> LoadedCheckpoint:
    """Any quantized file `--candidate-checkpoint` takes (ours, either version, or a ComfyUI-style
    one) onto the reference pipeline's `components`."""
    from evals.models.precision import _cast_transformer_inputs_if_mixed  # the policy build's own rule

    tensors, metadata = read_safetensors(path)
    ours = metadata.get("format") == FORMAT_MARKER
    if not ours and comfy_parts(tensors):
        out, metadata = import_comfy_file(path, tensors, reference, device)
    elif not ours:
        raise InputError(f"{path}: not a quantized transformer written by this tool (no {FORMAT_MARKER!r} metadata)")
    elif metadata.get("version") == FORMAT_VERSION:
        out = {"transformer": _load_transformer(path, tensors, metadata, reference["transformer"], device)}
    elif metadata.get("version") == COMPONENTS_VERSION:
        out = _load_components(path, tensors, metadata, reference, device)
    else:
        versions = f"{FORMAT_VERSION} and {COMPONENTS_VERSION}"
        raise InputError(f"{path}: checkpoint version {metadata.get('version')!r}, this tool reads {versions}")
    read = tuple(c for c in COMPONENTS if out.get(c) is not None)
    components = dict(reference, **out)
    _cast_transformer_inputs_if_mixed(components, reference)  # a component in another dtype than the reference's
    changed = {k: v for k, v in components.items() if v is not reference.get(k)}
    return LoadedCheckpoint(changed, metadata, read)
