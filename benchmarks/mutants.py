"""Broken FP8 builds ("mutants") of the tiny model, made only through public surfaces: edits of a
checkpoint written by `evals quantize` (FP8 bytes, float32 per-row scales, float tensors of kept
layers; the metadata is kept, so each candidate is compared with its source policy's baseline) and
policy YAML files. Each one must fail the smoke gate, except the "coarse" builds (per-tensor weight
scales, requantized correctly), which are reported only. Deterministic: every random choice is
seeded by the mutant's name.

    make_mutants(Path("rowwise.safetensors"), Path("mutants/"))
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from evals.models.fp8 import FORMATS, quantize
from evals.models.precision import policy_path

SEED = 20261129
ALL_LAYERS = "all"
POSITIONS = ("early", "middle", "late", "output", "all")
DARKEN_SHIFT = 0.8  # normalized latent units the velocity is pushed along the brightness direction


@dataclass(frozen=True)
class Mutant:
    name: str
    """Display name and candidate name ([a-z0-9-])."""
    layer: str
    """Qualified layer name in the transformer, or `all`."""
    kind: str
    """What was broken, e.g. `scale-x2`."""
    position: str
    """early (blocks 0-1), middle (2-3), late (4-5), output (norm_out, proj_out, embeddings) or all."""
    must_fail: bool
    """Whether the gate must fail it (False: a coarser but correct build, reported only)."""
    checkpoint: Path | None = None
    """The mutated checkpoint, for `--candidate-checkpoint NAME=FILE`."""
    policy: Path | None = None
    """The mutated policy YAML, for `--policy FILE`."""


Tensors = dict[str, torch.Tensor]
Edit = Callable[[Tensors, str, torch.Generator], None]


def _edit(suffix: str, fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Edit:
    """`fn` on a copy of the layer's `weight_scale`, or of its `weight_fp8` bytes as uint8."""

    def edit(t: Tensors, layer: str, g: torch.Generator) -> None:
        old = t[f"{layer}.{suffix}"]
        new = fn(old.view(torch.uint8).clone() if suffix == "weight_fp8" else old.clone(), g)
        t[f"{layer}.{suffix}"] = new.contiguous().view(old.dtype)

    return edit


def _row_gain_edit(gain: Callable[[int, torch.Generator], torch.Tensor]) -> Edit:
    """A gain per output row: on the scales of an FP8 layer, on the weight of a kept float layer."""

    def edit(t: Tensors, layer: str, g: torch.Generator) -> None:
        key = f"{layer}.weight_scale" if f"{layer}.weight_scale" in t else f"{layer}.weight"
        rows = t[key].shape[0]
        t[key] = (t[key] * gain(rows, g)[:, None]).contiguous()

    return edit


def _constant(value: float) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, g: torch.full((n,), value)


def _periodic(period: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    """1 + 0.5 cos(2 pi i / period): 1.5, 0.5, ... (period 2) or 1.5, 1, 0.5, 1, ... (period 4)."""
    return lambda n, g: 1 + 0.5 * torch.cos(2 * torch.pi * torch.arange(n) / period).round(decimals=6)


def _sign_flip_half_rows(t: Tensors, layer: str, g: torch.Generator) -> None:
    """The sign bit of a seeded half of the rows (FP8 bytes), or of the weight's rows (kept layer)."""
    key = f"{layer}.weight_fp8" if f"{layer}.weight_fp8" in t else f"{layer}.weight"
    rows = torch.randperm(t[key].shape[0], generator=g)[: t[key].shape[0] // 2]
    if key.endswith("_fp8"):
        dtype, q = t[key].dtype, t[key].view(torch.uint8).clone()
        q[rows] ^= 0x80
        t[key] = q.view(dtype)
    else:
        t[key] = t[key].clone()
        t[key][rows] *= -1


def _swap_extreme_scales(s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    i, j = int(s.argmax()), int(s.argmin())  # the two rows whose exchange hurts most
    s[[i, j]] = s[[j, i]]
    return s


def _permute_rows(s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return s[torch.randperm(s.shape[0], generator=g)]


def _nan_row(s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    s[int(torch.randint(s.shape[0], (1,), generator=g))] = float("nan")
    return s


def _zero_row_block(q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = q.shape[0]
    block = n // 8
    start = int(torch.randint(n - block + 1, (1,), generator=g))
    q[start : start + block] = 0  # the FP8 byte 0x00 is +0.0
    return q


def _zero_16_rows(q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Sixteen consecutive output rows zeroed: a small slice of a layer, which images barely show."""
    start = int(torch.randint(q.shape[0] - 16 + 1, (1,), generator=g))
    q[start : start + 16] = 0
    return q


def _flip_sign(q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return q ^ 0x80  # the sign bit of either FP8 format


def _permute_within_rows(q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    order = torch.rand(q.shape, generator=g).argsort(dim=1)  # its own permutation for each row
    return q.gather(1, order)


def _shuffle_columns(q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return q[:, torch.randperm(q.shape[1], generator=g)]


def _e5m2_read_as_e4m3(t: Tensors, layer: str, g: torch.Generator) -> None:
    """A writer that quantized to E5M2 (bytes and scales) under a checkpoint that says E4M3."""
    w = t[f"{layer}.weight_fp8"].float() * t[f"{layer}.weight_scale"]
    q, scale = quantize(w, "e5m2", per_row=True)
    t[f"{layer}.weight_fp8"] = q.view(torch.uint8).view(FORMATS["e4m3fn"]).contiguous()
    t[f"{layer}.weight_scale"] = scale.contiguous()


def _darken(t: Tensors, layer: str, g: torch.Generator) -> None:
    """Push proj_out's velocity along the latent direction that brightens the VAE's images: the
    sampler integrates it away from the image, so every picture comes out darker."""
    direction = brightness_direction()
    channels = direction.numel()
    bias = t[f"{layer}.bias"].clone()
    patches = bias.numel() // channels  # rows are (p, q, channel): one copy of the shift per patch pixel
    bias += DARKEN_SHIFT * direction.repeat(patches)
    t[f"{layer}.bias"] = bias


@cache
def brightness_direction() -> torch.Tensor:
    """Unit vector over the tiny VAE's latent channels along which decoded images get brighter
    (the gradient of mean pixel value, averaged over seeded random latents)."""
    from evals.models.tiny import load_trained_components

    vae = load_trained_components()["vae"]
    z = torch.randn(4, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(SEED))
    z.requires_grad_(True)
    raw = z / vae.config.scaling_factor + vae.config.shift_factor  # as the pipeline decodes latents
    vae.decode(raw).sample.mean().backward()
    assert z.grad is not None
    grad = z.grad.sum(dim=(0, 2, 3))
    return (grad / grad.norm()).detach()


def _per_tensor(t: Tensors, layer: str, g: torch.Generator) -> None:
    """Coarser but correct: the layer's weight requantized with one scale for the whole tensor."""
    fmt = next(name for name, dtype in FORMATS.items() if dtype == t[f"{layer}.weight_fp8"].dtype)
    w = t[f"{layer}.weight_fp8"].float() * t[f"{layer}.weight_scale"]
    q, scale = quantize(w, fmt, per_row=False)
    t[f"{layer}.weight_fp8"], t[f"{layer}.weight_scale"] = q.contiguous(), scale.contiguous()


KINDS: dict[str, Edit] = {
    "scale-x2": _row_gain_edit(_constant(2.0)),
    "scale-half": _row_gain_edit(_constant(0.5)),
    "scales-swapped": _edit("weight_scale", _swap_extreme_scales),
    "scales-permuted": _edit("weight_scale", _permute_rows),
    "nan-scale": _edit("weight_scale", _nan_row),
    "periodic-gain-2": _row_gain_edit(_periodic(2)),
    "periodic-gain-4": _row_gain_edit(_periodic(4)),
    "sign-flip": _edit("weight_fp8", _flip_sign),
    "sign-flip-half-rows": _sign_flip_half_rows,
    "rows-zeroed": _edit("weight_fp8", _zero_row_block),
    "16-rows-zeroed": _edit("weight_fp8", _zero_16_rows),
    "bytes-permuted-in-rows": _edit("weight_fp8", _permute_within_rows),
    "columns-shuffled": _edit("weight_fp8", _shuffle_columns),
    "e5m2-read-as-e4m3": _e5m2_read_as_e4m3,
    "darken": _darken,
    "per-tensor-scale": _per_tensor,
}

B = "transformer_blocks"
# (name, layer, kind, position, must_fail): blocks 0-1 early, 2-3 middle, 4-5 late
CHECKPOINT_MUTANTS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("b0-to-q-sign-half", f"{B}.0.attn.to_q", "sign-flip-half-rows", "early", True),
    ("b0-attn2-to-k-scales-permuted", f"{B}.0.attn2.to_k", "scales-permuted", "early", True),
    ("b0-to-v-scale-x2", f"{B}.0.attn.to_v", "scale-x2", "early", True),
    ("b0-attn2-to-out-rows-zeroed", f"{B}.0.attn2.to_out.0", "rows-zeroed", "early", True),
    ("b0-norm1-linear-scale-x2", f"{B}.0.norm1.linear", "scale-x2", "early", True),
    ("b1-add-q-proj-columns-shuffled", f"{B}.1.attn.add_q_proj", "columns-shuffled", "early", True),
    ("b1-ff-net-2-periodic-gain-2", f"{B}.1.ff.net.2", "periodic-gain-2", "early", True),
    ("b1-to-add-out-sign-flip", f"{B}.1.attn.to_add_out", "sign-flip", "early", True),
    ("b2-to-k-bytes-permuted", f"{B}.2.attn.to_k", "bytes-permuted-in-rows", "middle", True),
    ("b2-to-out-scale-half", f"{B}.2.attn.to_out.0", "scale-half", "middle", True),
    ("b2-norm1-linear-e5m2-as-e4m3", f"{B}.2.norm1.linear", "e5m2-read-as-e4m3", "middle", True),
    ("b2-ff-context-net-0-rows-zeroed", f"{B}.2.ff_context.net.0.proj", "rows-zeroed", "middle", True),
    ("b3-add-k-proj-scales-swapped", f"{B}.3.attn.add_k_proj", "scales-swapped", "middle", True),
    ("b3-add-v-proj-sign-half", f"{B}.3.attn.add_v_proj", "sign-flip-half-rows", "middle", True),
    ("b3-ff-net-0-nan-scale", f"{B}.3.ff.net.0.proj", "nan-scale", "middle", True),
    ("b3-norm1-context-periodic-gain-4", f"{B}.3.norm1_context.linear", "periodic-gain-4", "middle", True),
    ("b4-to-q-columns-shuffled", f"{B}.4.attn.to_q", "columns-shuffled", "late", True),
    ("b4-add-v-proj-scale-x2", f"{B}.4.attn.add_v_proj", "scale-x2", "late", True),
    ("b4-ff-net-2-sign-flip", f"{B}.4.ff.net.2", "sign-flip", "late", True),
    ("b4-norm1-linear-rows-zeroed", f"{B}.4.norm1.linear", "rows-zeroed", "late", True),
    ("b5-to-v-periodic-gain-2", f"{B}.5.attn.to_v", "periodic-gain-2", "late", True),
    ("b5-to-out-nan-scale", f"{B}.5.attn.to_out.0", "nan-scale", "late", True),
    ("b5-ff-net-0-e5m2-as-e4m3", f"{B}.5.ff.net.0.proj", "e5m2-read-as-e4m3", "late", True),
    ("b5-add-k-proj-sign-half", f"{B}.5.attn.add_k_proj", "sign-flip-half-rows", "late", True),
    ("b0-to-v-16-rows-zeroed", f"{B}.0.attn.to_v", "16-rows-zeroed", "early", True),
    ("norm-out-linear-scale-half", "norm_out.linear", "scale-half", "output", True),
    ("proj-out-sign-half", "proj_out", "sign-flip-half-rows", "output", True),
    ("proj-out-darken", "proj_out", "darken", "output", True),
    ("coarse-b1-ff-net-0-per-tensor", f"{B}.1.ff.net.0.proj", "per-tensor-scale", "early", False),
    ("coarse-b4-to-v-per-tensor", f"{B}.4.attn.to_v", "per-tensor-scale", "late", False),
    ("coarse-all-per-tensor", ALL_LAYERS, "per-tensor-scale", "all", False),
)

_LINEARS = ("pos_embed*", "time_text_embed*", "context_embedder", "norm_out*", "proj_out")
_E5M2_TENSOR = "{format: e5m2, weights: per_tensor, activations: dynamic_per_tensor, backend: auto}"
_E4M3_ROWWISE = "{format: e4m3fn, weights: per_channel, activations: dynamic_per_token, backend: auto}"
_E5M2_ROWWISE = "{format: e5m2, weights: per_channel, activations: dynamic_per_token, backend: auto}"
# (name, layer, kind, position, YAML after `name:`, None: the shipped policy copied); all must fail
POLICY_MUTANTS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("fp8-all-linears", ALL_LAYERS, "keep-rules-removed", "all", None),  # fp8-e4m3-rowwise, no keep-rules
    (
        "mut-all-e5m2-per-tensor",
        ALL_LAYERS,
        "policy-e5m2-per-tensor-everything",
        "all",
        f"components:\n  transformer:\n    default: {_E5M2_TENSOR}\n",
    ),
    (
        "mut-outputs-e5m2-per-tensor",
        "proj_out,norm_out.linear,embeddings",
        "policy-kept-layers-e5m2-per-tensor",
        "output",
        f"components:\n  transformer:\n    default: {_E4M3_ROWWISE}\n    rules:\n"
        + "".join(f'      - {{match: "{m}", {_E5M2_TENSOR[1:]}\n' for m in _LINEARS),
    ),
    (
        "mut-proj-out-e5m2",
        "proj_out",
        "policy-proj-out-e5m2",
        "output",
        f"components:\n  transformer:\n    default: {_E4M3_ROWWISE}\n    rules:\n"
        + "".join(f'      - {{match: "{m}", precision: keep}}\n' for m in _LINEARS[:-1])
        + f'      - {{match: "proj_out", {_E5M2_ROWWISE[1:]}\n',
    ),
)


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()))


def fp8_layers(metadata: dict[str, str]) -> list[str]:
    return sorted(json.loads(metadata["layers"]))


def _write_checkpoint(source: Tensors, metadata: dict[str, str], name: str, layer: str, kind: str, out: Path) -> None:
    from safetensors.torch import save_file

    tensors = dict(source)
    layers = fp8_layers(metadata) if layer == ALL_LAYERS else [layer]
    for each in layers:
        KINDS[kind](tensors, each, _generator(name))
    meta = dict(metadata)
    if kind == "per-tensor-scale":  # the layer settings say what the file now holds; the policy stays
        settings = json.loads(meta["layers"])
        for each in layers:
            settings[each]["spec"]["weights"] = "per_tensor"
        meta["layers"] = json.dumps(settings, sort_keys=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=meta)


def read_checkpoint(path: Path) -> tuple[Tensors, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def make_mutants(checkpoint: Path, out_dir: Path) -> list[Mutant]:
    """Write every mutant of `checkpoint` (an `evals quantize fp8-e4m3-rowwise` file) and every
    broken policy to `out_dir`; the same inputs always give the same files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source, metadata = read_checkpoint(checkpoint)
    mutants = []
    for name, layer, kind, position, must_fail in CHECKPOINT_MUTANTS:
        path = out_dir / f"{name}.safetensors"
        _write_checkpoint(source, metadata, name, layer, kind, path)
        mutants.append(Mutant(name, layer, kind, position, must_fail, checkpoint=path))
    for name, layer, kind, position, body in POLICY_MUTANTS:
        path = out_dir / f"{name}.yaml"
        text = f"# mutant: {kind} (benchmarks/mutants.py)\nname: {name}\n{body}" if body else None
        path.write_text(text or policy_path(name).read_text())
        mutants.append(Mutant(name, layer, kind, position, True, policy=path))
    return mutants
