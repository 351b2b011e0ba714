"""A candidate's layer profile: each part's own error against the reference's, teacher-forced.

Both transformers sit in one process. The reference runs once on a recorded step's inputs with hooks
that keep what each transformer block (and each top-level layer around the blocks) received and gave.
Each candidate part then runs on exactly what the reference part received, so its error is its own,
never inherited from a part before it: block by block, then layer by layer inside each block. A
broken layer stands out against the same layer's error in the baseline's profile (what the policy
predicts: a sound FP8 layer has an error of its own too), by the ratio of the two (evals.step_error.locate).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from evals.step_error.locate import BLOCKS
from evals.step_error.trajectory import Trajectory, step_inputs


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a module's output, in order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value if v is not None for t in _tensors(v)]
    if hasattr(value, "sample"):
        return _tensors(value.sample)
    return []


def relative_error(candidate: Any, reference: Any) -> float:
    """||cand - ref|| / ||ref|| over every tensor of two outputs, summed in float64 where the tensors
    are (on a GPU: the outputs of SD3.5-Large's layers are too large to copy to the CPU per layer)."""
    cands, refs = _tensors(candidate), _tensors(reference)
    if len(cands) != len(refs) or not refs or any(c.shape != r.shape for c, r in zip(cands, refs, strict=True)):
        return math.nan
    diff = sum(float((c.double() - r.to(c.device).double()).square().sum()) for c, r in zip(cands, refs, strict=True))
    norm = sum(float(r.double().square().sum()) for r in refs)
    if math.isnan(diff):
        return math.nan
    return math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


@contextmanager
def _captured(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]]]:
    """(args, kwargs, output) of the first call of each module while the block runs."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
    handles = []
    for name, module in modules.items():

        def hook(m: Any, args: Any, kwargs: Any, output: Any, name: str = name) -> None:
            seen.setdefault(name, (args, kwargs, output))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _units(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The blocks and the top-level layers around them, in the order they run."""
    units = {}
    for name, module in transformer.named_children():
        if name == BLOCKS:
            units.update({f"{BLOCKS}.{i}": block for i, block in enumerate(module.children())})
        elif any(True for _ in module.parameters()):
            for sub, m in module.named_modules():
                if _is_layer(m):
                    units[f"{name}.{sub}" if sub else name] = m
    return units


def _is_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or hasattr(module, "weight_fp8")


def _layers(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in block.named_modules() if n and _is_layer(m)}


def _submodule(root: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


@torch.inference_mode()
def profile(reference: torch.nn.Module, candidate: torch.nn.Module, traj: Trajectory, step: int) -> dict[str, float]:
    """Each part's own relative error at recorded step `step` of `traj` (the index into its steps):
    every block and top-level layer, then every layer inside each block, by name."""
    ref_device = next(reference.parameters()).device
    cand_device = next(candidate.parameters()).device
    inputs = step_inputs(traj, step, ref_device)
    units = _units(reference)
    with _captured(units) as seen:  # its class's forward: a CUDA-graph replay (evals.graphed) runs no hooks
        type(reference).forward(reference, **inputs, return_dict=False)
    errors: dict[str, float] = {}
    for name, (args, kwargs, output) in seen.items():
        part = _submodule(candidate, name)
        if part is None:
            continue
        dtype = _compute_dtype(part)
        moved_args, moved_kwargs = _to(args, cand_device, dtype), _to(kwargs, cand_device, dtype)
        # `forward`, not the module: a block compiled in place would be compiled again for calls
        # from here (minutes on SD3.5-Large); eager, each part's own error is the same up to rounding.
        errors[name] = relative_error(part.forward(*moved_args, **moved_kwargs), output)
        if not name.startswith(f"{BLOCKS}."):
            continue
        layers = _layers(units[name])
        with _captured(layers) as inside:
            units[name](*args, **kwargs)
        for layer, (largs, lkwargs, lout) in inside.items():
            cand_layer = _submodule(part, layer)
            if cand_layer is not None:
                dtype = _compute_dtype(cand_layer)
                got = cand_layer(*_to(largs, cand_device, dtype), **_to(lkwargs, cand_device, dtype))
                errors[f"{name}.{layer}"] = relative_error(got, lout)
    return errors


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(part: torch.nn.Module) -> torch.dtype | None:
    """The dtype a candidate part computes in (a bf16 build's parts take bf16 inputs); None for a
    part with no such parameter (an FP8 layer casts its input itself)."""
    return next((p.dtype for p in part.parameters() if p.dtype in COMPUTE_DTYPES), None)


def _to(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """The reference's captured inputs, on the candidate's device and in its part's dtype."""
    if torch.is_tensor(value):
        cast = dtype is not None and value.is_floating_point()
        return value.to(device, dtype) if cast else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value
