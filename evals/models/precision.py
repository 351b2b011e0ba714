"""Precision policies: YAML -> PrecisionPolicy -> a resolved per-layer plan -> a candidate pipeline.

Rules are ordered and the first whose `fnmatch` pattern matches a linear layer's qualified name
(inside its component) wins; unmatched layers take `default`. A rule field left out is inherited
from `default`. `precision: keep` leaves a layer in the component's dtype. A rule must match at least
one module of its component (a conv embedding counts): one that matches nothing is almost always a
typo, and is an error.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from evals.models import policy_schema as schema
from evals.models.attention_policy import AttentionPolicy, parse_attention, resolve_attention
from evals.models.diffusers_quantization import DiffusersBuild, parse_build
from evals.models.fp8_spec import TORCHAO, Fp8Spec, torchao_recipe_problem
from evals.models.yamlspec import Errors, InputError, YamlDoc, did_you_mean, load_yaml, validate

POLICY_DIR = Path(__file__).parent / "policies"
COMPONENTS = tuple(schema.Components.model_fields)
QUANTIZABLE = COMPONENTS  # FP8 rules apply to the linear layers of every component
SPEC_KEYS = ("format", "weights", "activations", "backend", "block_size", "fast_accum")
"""The keys of a `default` or a rule that become Fp8Spec fields."""


@dataclass(frozen=True)
class Rule:
    match: str
    """fnmatch pattern on the layer's qualified name inside its component."""
    spec: Fp8Spec | None
    """FP8 settings, or None for `precision: keep`."""
    line: int | None
    """Line in the policy file, for errors."""


@dataclass(frozen=True)
class ComponentPolicy:
    dtype: str | None = None
    """Component dtype; None keeps the reference's."""
    default: Fp8Spec | None = None
    """Settings for layers no rule matches; None keeps them."""
    rules: tuple[Rule, ...] = ()
    """Ordered rules, first match wins."""
    drop: bool = False
    """Leave the component out of the candidate (T5 only)."""
    attention: AttentionPolicy | None = None
    """The attention product's precision per block (transformer only); None: bf16 everywhere."""


@dataclass(frozen=True)
class Calibration:
    prompts: int = 8
    """Calibration prompts (the first N of `evals.models.calibration.CALIBRATION_PROMPTS`)."""
    seed: int = 0
    """Generator seed of the calibration images."""


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    """Policy name: names the candidate in records, images and MLflow."""
    path: str
    """File it was loaded from."""
    sha256: str
    """Hash of its parsed content."""
    components: dict[str, ComponentPolicy]
    """Component name -> policy; components not listed stay as the reference has them."""
    description: str = ""
    """What the policy mirrors."""
    calibration: Calibration = Calibration()
    """How static activation scales are calibrated (used only when a layer is `static`)."""
    factory: str | None = None
    """`module:function` that builds the candidate instead (evals.factories); no components then."""
    diffusers_quantization: DiffusersBuild | None = None
    """A diffusers quantization backend builds the transformer instead; no components then."""

    def specs(self) -> list[Fp8Spec]:
        """Every layer setting the policy states (its defaults and rules; `keep` left out)."""
        given = [c.default for c in self.components.values()] + [
            r.spec for c in self.components.values() for r in c.rules
        ]
        return [s for s in given if s is not None]

    @property
    def needs_calibration(self) -> bool:
        return any(s.activations == "static" for s in self.specs())


@dataclass(frozen=True)
class LayerPlan:
    component: str
    """Component the layer is in."""
    name: str
    """Qualified module name inside the component."""
    shape: tuple[int, int]
    """(out_features, in_features)."""
    rule: str
    """What decided: `rule N (pattern)` or `default`."""
    spec: Fp8Spec | None
    """FP8 settings, or None when kept."""
    backend: str
    """Backend that runs it: scaled_mm, emulated, weight_only, torchao, or keep."""
    bytes_before: int
    """Weight and bias bytes in the component's dtype."""
    bytes_after: int
    """Bytes once quantized: FP8 weight, float32 scales, bias (== before when kept)."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spec": asdict(self.spec) if self.spec else None}


def _spec(doc: YamlDoc, given: schema.Fp8Settings, path: tuple[Any, ...], base: Fp8Spec) -> Fp8Spec | None:
    """The FP8 settings of a `default` or a rule: `base`'s, with the keys given replaced; None to keep."""
    keys = [k for k in SPEC_KEYS if k in given.model_fields_set]
    if given.precision == "keep":
        for key in keys:
            raise doc.error(path + (key,), f"{key!r} makes no sense with precision: keep")
        return None
    if given.block_size is not None and given.block_size & (given.block_size - 1):
        raise doc.error(path + ("block_size",), f"expected a power of two, got {given.block_size}")
    spec = replace(base, **{k: getattr(given, k) for k in keys if getattr(given, k) is not None})
    if spec.backend == "scaled_mm" and spec.activations == "none":
        raise doc.error(
            path + ("backend",), "scaled_mm needs quantized activations; use weight_only for activations: none"
        )
    if spec.backend == "scaled_mm" and spec.weights == "per_block":
        raise doc.error(path + ("backend",), "per_block weights have no scaled_mm kernel here; use auto or emulated")
    if spec.backend == TORCHAO:
        problem = torchao_recipe_problem(spec.format, spec.weights, spec.activations)
        if problem:
            raise doc.error(path + ("backend",), problem)
        if spec.fast_accum:
            raise doc.error(path + ("fast_accum",), "fast_accum is this project's scaled_mm setting, not torchao's")
    elif spec.format == "int8":
        raise doc.error(path + ("format",), "int8 runs on backend: torchao only (this project's engine is FP8)")
    return spec


def _component(doc: YamlDoc, name: str, given: schema.Component, errors: Errors) -> ComponentPolicy:
    path = ("components", name)
    drop = isinstance(given, schema.T5) and given.drop
    if drop and len(given.model_fields_set) > 1:
        errors.found.append(doc.error(path, "a dropped component takes no other settings"))
    if not isinstance(given, schema.Quantizable):
        return ComponentPolicy(dtype=given.dtype, drop=drop)
    default = None
    if given.default is not None:
        default = errors.attempt(lambda: _spec(doc, given.default, path + ("default",), Fp8Spec()), None)  # type: ignore[arg-type]
    base = default or Fp8Spec()
    rules = []
    for i, rule in enumerate(given.rules):
        rule_path = path + ("rules", i)

        def parse(rule: schema.Rule = rule, rule_path: tuple[Any, ...] = rule_path) -> Rule:
            return Rule(rule.match, _spec(doc, rule, rule_path, base), doc.line(rule_path))

        rules.append(errors.attempt(parse, None))
    attention = None
    if isinstance(given, schema.Transformer) and given.attention is not None:
        attention = parse_attention(doc, given.attention, path + ("attention",))
    return ComponentPolicy(
        dtype=given.dtype, default=default, rules=tuple(r for r in rules if r), drop=drop, attention=attention
    )


def policy_path(name_or_path: str) -> Path:
    """A shipped policy's name (`fp8-e4m3-rowwise`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = POLICY_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise InputError(
        f"policy {name_or_path!r} is neither a file nor a shipped policy"
        + did_you_mean(name_or_path, shipped_policies())
    )


def shipped_policies() -> list[str]:
    return sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))


def load_policy(name_or_path: str) -> PrecisionPolicy:
    """Parse and validate a policy; any problem raises InputError naming file, line and key (every
    problem of the file at once)."""
    doc = load_yaml(policy_path(name_or_path), "policy")
    given = validate(doc, schema.PolicyFile)
    errors = Errors()
    if given.name in ("ref", ".", ".."):
        errors.found.append(doc.error(("name",), f"name {given.name!r} is reserved (it names folders)"))
    builds = [k for k in ("components", "factory", "diffusers_quantization") if getattr(given, k) is not None]
    if len(builds) != 1:
        errors.found.append(
            doc.error((), "a policy has either `components` or a `factory` or `diffusers_quantization`: exactly one")
        )
    diffusers_build = None
    if given.diffusers_quantization is not None:
        quantization = given.diffusers_quantization
        diffusers_build = errors.attempt(lambda: parse_build(doc, quantization), None)
    parts = given.components or schema.Components()
    components = {name: _component(doc, name, part, errors) for name, part in parts if part is not None}
    errors.raise_any()
    canonical = json.dumps(doc.data, sort_keys=True, default=str).encode()
    return PrecisionPolicy(
        name=given.name,
        path=str(doc.path),
        sha256=hashlib.sha256(canonical).hexdigest(),
        components=components,
        description=given.description,
        calibration=Calibration(prompts=given.calibration.prompts, seed=given.calibration.seed),
        factory=given.factory,
        diffusers_quantization=diffusers_build,
    )


def _linear_layers(module: Any) -> list[tuple[str, Any]]:
    from torch import nn

    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds. A tensor subclass (torchao's quantized weights) reports its original
    dtype's element size, so its own tensors (quantized data, scales) are counted instead."""
    import torch

    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel() * tensor.element_size())


def _layer_bytes(layer: Any, spec: Fp8Spec | None) -> tuple[int, int]:
    weight, bias = layer.weight, layer.bias
    bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
    before = weight.numel() * weight.element_size() + bias_bytes
    if spec is None:
        return before, before
    out_f, in_f = weight.shape
    scales = {"per_tensor": 1, "per_channel": out_f}.get(spec.weights) or (
        -(-out_f // spec.block_size) * -(-in_f // spec.block_size)
    )
    return before, weight.numel() + 4 * (scales + (spec.activations == "static")) + bias_bytes


def resolve_plan(policy: PrecisionPolicy, components: dict[str, Any], device: Any = None) -> list[LayerPlan]:
    """Decide every linear layer of every quantizable component, backends included.

    `device` is where the layers will run (default: where their weights are); weights may be on the
    meta device, so a plan can be made from configs alone.
    """
    from evals.models.fp8 import resolve_backend

    plan: list[LayerPlan] = []
    for comp_name, comp_policy in policy.components.items():
        if comp_name not in QUANTIZABLE or (comp_policy.default is None and not comp_policy.rules):
            continue
        module = components.get(comp_name)
        if module is None:
            raise InputError(
                f"policy {policy.name!r} quantizes {comp_name!r}, which this model does not have", source=policy.path
            )
        names = [n for n, _ in module.named_modules() if n]
        errors = Errors()
        for i, rule in enumerate(comp_policy.rules):
            if not any(fnmatchcase(n, rule.match) for n in names):
                errors.found.append(
                    InputError(
                        f"components.{comp_name}.rules[{i}]: pattern {rule.match!r} matches no module of {comp_name} "
                        f"(module names look like {names[0]!r}; `evals policy explain` lists the linear ones)",
                        source=policy.path,
                        line=rule.line,
                    )
                )
        errors.raise_any()
        for layer_name, layer in _linear_layers(module):
            rule_desc, spec = "default", comp_policy.default
            for i, rule in enumerate(comp_policy.rules):
                if fnmatchcase(layer_name, rule.match):
                    rule_desc, spec = f"rule {i} ({rule.match})", rule.spec
                    break
            shape = (layer.out_features, layer.in_features)
            run_on = device if device is not None else layer.weight.device
            try:
                backend = "keep" if spec is None else resolve_backend(spec, shape, run_on, layer.weight.dtype)
            except InputError as exc:  # backend: scaled_mm where it cannot run
                raise InputError(f"{comp_name}.{layer_name} ({rule_desc}): {exc}", source=policy.path) from exc
            plan.append(LayerPlan(comp_name, layer_name, shape, rule_desc, spec, backend, *_layer_bytes(layer, spec)))
    return plan


def plan_totals(plan: list[LayerPlan], module_bytes: int) -> dict[str, float]:
    """Totals of a plan: share of linear parameters in FP8, and memory of the component before/after."""
    params = sum(a * b for a, b in (layer.shape for layer in plan))
    fp8_params = sum(a * b for (a, b), spec in ((layer.shape, layer.spec) for layer in plan) if spec is not None)
    saved = sum(layer.bytes_before - layer.bytes_after for layer in plan)
    return {
        "linear_layers": len(plan),
        "fp8_layers": sum(layer.spec is not None for layer in plan),
        "linear_params": params,
        "fp8_params": fp8_params,
        "fp8_param_share": fp8_params / params if params else 0.0,
        "bytes_before": module_bytes,
        "bytes_after": module_bytes - saved,
        "bytes_saved": saved,
        "saved_share": saved / module_bytes if module_bytes else 0.0,
    }


def backend_summary(plan: list[LayerPlan]) -> str:
    """What actually ran, e.g. `scaled_mm:30,keep:5`."""
    counts = Counter(layer.backend for layer in plan)
    return ",".join(f"{b}:{n}" for b, n in sorted(counts.items())) or "none"


def apply_policy(
    policy: PrecisionPolicy, components: dict[str, Any], input_amax: dict[str, float] | None = None
) -> tuple[dict[str, Any], list[LayerPlan]]:
    """Candidate components: a quantized copy of each component the policy changes; the reference's
    own objects for the rest (shared, so unchanged text encoders and VAE are loaded once).

    `input_amax` maps `component.layer` to the calibrated largest input magnitude, for static layers.
    """
    import torch

    from evals.models.fp8 import Fp8Linear
    from evals.models.sources import cast

    plan = resolve_plan(policy, components)
    out = dict(components)
    for comp_name, comp_policy in policy.components.items():
        if comp_policy.drop:
            out[comp_name] = None
            out[comp_name.replace("text_encoder", "tokenizer")] = None
            continue
        module = components.get(comp_name)
        layers = [layer for layer in plan if layer.component == comp_name and layer.spec is not None]
        dtype = getattr(torch, comp_policy.dtype) if comp_policy.dtype else None
        attention = comp_policy.attention
        attention_plan = resolve_attention(attention, module, policy.path) if attention and module else []
        changes_attention = any(entry.precision != "bf16" for entry in attention_plan)
        if module is None or (not layers and not changes_attention and (dtype is None or module.dtype == dtype)):
            continue
        module = copy.deepcopy(module)
        if dtype is not None:
            cast(module, dtype)
        handed_over = [(layer.name, layer.spec) for layer in layers if layer.backend == TORCHAO]
        if handed_over:
            from evals.models.torchao_backend import quantize_layers

            quantize_layers(module, handed_over)  # type: ignore[arg-type]
        for layer in layers:
            assert layer.spec is not None
            if layer.backend == TORCHAO:
                continue
            amax = None
            if layer.spec.activations == "static":
                key = f"{comp_name}.{layer.name}"
                if input_amax is None or key not in input_amax:
                    raise ValueError(f"{key}: static activations need calibration (no input amax recorded)")
                amax = input_amax[key]
            fp8 = Fp8Linear.from_linear(module.get_submodule(layer.name), layer.spec, layer.backend, amax)
            module.set_submodule(layer.name, fp8)
        if layers and comp_name == "transformer":  # the fused paths are the SD3 blocks'
            from evals.models.fp8_block import fuse_fp8_modules

            fuse_fp8_modules(module)
        if changes_attention:
            from evals.models.attention import set_attention_precision

            set_attention_precision(module, {entry.name: entry.precision for entry in attention_plan})
        out[comp_name] = module
    _cast_transformer_inputs_if_mixed(out, components)
    return out, plan


def _cast_floating_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch

    def cast(value: Any) -> Any:
        return value.to(module.dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _cast_transformer_inputs_if_mixed(out: dict[str, Any], reference: dict[str, Any]) -> None:
    """diffusers pipelines assume one dtype throughout; once a policy changes a component's dtype the
    candidate's transformer (a copy, never the reference's) casts its floating inputs to its own."""
    changed = [
        name
        for name in COMPONENTS
        if out.get(name) is not None and reference.get(name) is not None and out[name].dtype != reference[name].dtype
    ]
    if not changed or out.get("transformer") is None:
        return
    if out["transformer"] is reference["transformer"]:
        out["transformer"] = copy.deepcopy(reference["transformer"])
    out["transformer"].register_forward_pre_hook(_cast_floating_inputs, with_kwargs=True)
