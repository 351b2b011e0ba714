"""Per-layer sensitivity sweep and greedy policy search.

One candidate transformer holds, for every layer the starting policy quantizes, both the
high-precision layer and its FP8 twin (`SwitchLinear`); a variant is just which switches are on. So a
sweep of N groups costs 2N candidate passes over the cached reference, and one extra copy of the
transformer, not 2N.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evals.candidates import Candidate, _pipeline_with
from evals.models.attention import QuantizedJointAttnProcessor
from evals.models.attention_policy import resolve_attention
from evals.models.fp8 import Fp8Linear
from evals.models.precision import LayerPlan, PrecisionPolicy, resolve_plan
from evals.models.sources import LoadedModel
from evals.models.yamlspec import InputError

GROUPINGS = ("block", "type", "module")
BLOCK = re.compile(r"^(transformer_blocks\.\d+)\.(.+)$")
PRODUCT = ".product"
"""Suffix that names an attention module's product (Q·Kᵀ, softmax, P·V) as a unit of the sweep:
`transformer_blocks.3.attn.product` groups with its block, and by type as `attn.product`."""


class SwitchLinear(nn.Module):
    """A linear layer that runs either in high precision or through its FP8 twin."""

    def __init__(self, high: nn.Linear, fp8: Fp8Linear):
        super().__init__()
        self.high = high
        self.fp8 = fp8
        self.use_fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fp8(x) if self.use_fp8 else self.high(x)


@dataclass(frozen=True)
class Group:
    name: str
    """Group name: a block (`transformer_blocks.3`), a layer type (`attn.to_q`) or a module."""
    modules: tuple[str, ...]
    """Linear layers in the group."""
    params: int
    """Their parameter count."""


def group_key(module: str, by: str) -> str:
    match = BLOCK.match(module)
    if by == "module":
        return module
    if by == "block":
        return match.group(1) if match else module.split(".")[0]
    return match.group(2) if match else module  # type: the layer's name inside its block


def linear_groups(shapes: dict[str, tuple[int, int]], by: str) -> list[Group]:
    if by not in GROUPINGS:
        raise InputError(f"--groups {by!r}: expected one of {', '.join(GROUPINGS)}")
    members: dict[str, list[str]] = {}
    for module in shapes:
        members.setdefault(group_key(module, by), []).append(module)
    return [Group(k, tuple(v), sum(shapes[m][0] * shapes[m][1] for m in v)) for k, v in members.items()]


class SwitchableCandidate:
    """The start policy's quantized layers, each switchable; `variant(name, on)` makes a Candidate."""

    def __init__(self, model: LoadedModel, policy: PrecisionPolicy):
        transformer_policy = policy.components.get("transformer")
        if transformer_policy is None:
            raise InputError(f"{policy.path}: the policy quantizes no transformer layers; nothing to sweep")
        plan = [layer for layer in resolve_plan(policy, model.pipeline.components) if layer.spec is not None]
        if any(layer.spec and layer.spec.activations == "static" for layer in plan):
            raise InputError(f"{policy.path}: sweeps need dynamic or weight-only activations, not static")
        attention = transformer_policy.attention
        attention_plan = resolve_attention(attention, model.pipeline.transformer, policy.path) if attention else []
        quantized_attention = {a.name: a.precision for a in attention_plan if a.precision != "bf16"}
        if not plan and not quantized_attention:
            raise InputError(f"{policy.path}: the policy quantizes no transformer layers; nothing to sweep")
        self.policy = policy
        self.plan = {layer.name: layer for layer in plan}
        transformer = copy.deepcopy(model.pipeline.transformer)
        self.switches: dict[str, SwitchLinear] = {}
        for layer in plan:
            assert layer.spec is not None
            high = transformer.get_submodule(layer.name)
            switch = SwitchLinear(high, Fp8Linear.from_linear(high, layer.spec, layer.backend))
            parent, _, child = layer.name.rpartition(".")
            setattr(transformer.get_submodule(parent) if parent else transformer, child, switch)
            self.switches[layer.name] = switch
        # An attention product is switched by its precision; at bf16 the processor runs diffusers' SDPA.
        self.attention: dict[str, tuple[Any, str]] = {}
        for name, precision in quantized_attention.items():
            module = transformer.get_submodule(name)
            module.set_processor(QuantizedJointAttnProcessor())
            self.attention[name + PRODUCT] = (module, precision)
        self.pipeline = _pipeline_with(model, dict(model.pipeline.components, transformer=transformer))

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Every unit of the sweep: linear layers by weight shape, attention products as (0, 0)."""
        return {name: layer.shape for name, layer in self.plan.items()} | {unit: (0, 0) for unit in self.attention}

    def variant(self, name: str, fp8_modules: set[str]) -> Candidate:
        def activate() -> None:
            for module, switch in self.switches.items():
                switch.use_fp8 = module in fp8_modules
            for unit, (attention, precision) in self.attention.items():
                attention.attention_precision = precision if unit in fp8_modules else "bf16"

        plan = [
            layer
            if layer.name in fp8_modules
            else LayerPlan(
                layer.component,
                layer.name,
                layer.shape,
                "kept by the sweep",
                None,
                "keep",
                layer.bytes_before,
                layer.bytes_before,
            )
            for layer in self.plan.values()
        ]
        return Candidate(name, self.pipeline, self.policy.sha256, plan, activate=activate)


@dataclass
class GroupSensitivity:
    group: str
    """Group name."""
    params: int
    """Parameters in the group."""
    only_quantized: float
    """Metric mean when only this group is in FP8."""
    only_kept: float
    """Metric mean when everything but this group is in FP8."""


def rank(groups: list[Group], summaries: dict[str, Any], metric: str, higher_is_better: bool) -> list[GroupSensitivity]:
    """Most sensitive first: the group whose quantization alone hurts the metric most."""
    rows = [
        GroupSensitivity(
            g.name,
            g.params,
            summaries[variant_name("only", g.name)].metrics[metric]["mean"],
            summaries[variant_name("keep", g.name)].metrics[metric]["mean"],
        )
        for g in groups
    ]
    return sorted(rows, key=lambda r: r.only_quantized if higher_is_better else -r.only_quantized)


def variant_name(kind: str, group: str) -> str:
    return f"{kind}-{group}"


def plot_sensitivity(rows: list[GroupSensitivity], metric: str, full: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ordered = rows[::-1]  # most sensitive at the top
    y = list(range(len(ordered)))
    ax.barh(
        [i + 0.2 for i in y],
        [r.only_quantized for r in ordered],
        height=0.4,
        color="#c0392b",
        label="only this group in FP8",
    )
    ax.barh(
        [i - 0.2 for i in y],
        [r.only_kept for r in ordered],
        height=0.4,
        color="#2980b9",
        label="all but this group in FP8",
    )
    ax.set_yticks(y, [r.group for r in ordered])
    ax.axvline(full, color="black", linestyle="--", label=f"whole policy in FP8 ({full:.2f})")
    ax.set_xlabel(f"{metric} mean against the reference")
    ax.set_title("Sensitivity per group (most sensitive at the top)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, rows: list[GroupSensitivity], metric: str, full: float) -> None:
    path.write_text(json.dumps({"metric": metric, "whole_policy": full, "groups": [asdict(r) for r in rows]}, indent=2))
