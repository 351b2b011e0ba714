"""Precision policies: YAML -> PrecisionPolicy -> a resolved per-layer plan -> a candidate pipeline.

Rules are ordered and the first whose `fnmatch` pattern matches a linear layer's qualified name
(inside its component) wins; unmatched layers take `default`. A rule field left out is inherited
from `default`. `precision: keep` leaves a layer in the component's dtype. A rule that matches no
layer is an error: it is almost always a typo.
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

from evals.yamlspec import InputError, YamlDoc, check_mapping, expect, expect_choice, load_yaml
from models.fp8 import ACTIVATIONS, BACKENDS, FORMATS, WEIGHT_SCALES, Fp8Spec

POLICY_DIR = Path(__file__).parent / "policies"
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
QUANTIZABLE = ("transformer",)  # FP8 rules apply to the transformer; other components take a dtype
DTYPES = ("float32", "bfloat16", "float16")
SPEC_FIELDS = {"format": FORMATS, "weights": WEIGHT_SCALES, "activations": ACTIVATIONS, "backend": BACKENDS}


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
    """Backend that runs it: scaled_mm, emulated, weight_only, or keep."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spec": asdict(self.spec) if self.spec else None}


def _parse_spec(doc: YamlDoc, raw: Any, path: tuple[Any, ...], base: Fp8Spec, extra: tuple[str, ...]) -> Fp8Spec | None:
    """A `{precision: keep}` or `{format, weights, activations, backend}` mapping (plus `extra` keys)."""
    m = check_mapping(doc, raw, path, optional=("precision", *SPEC_FIELDS, *extra))
    precision = expect_choice(doc, m.get("precision", "fp8"), path + ("precision",), ("fp8", "keep"))
    if precision == "keep":
        for key in SPEC_FIELDS:
            if key in m:
                raise doc.error(path + (key,), f"{key!r} makes no sense with precision: keep")
        return None
    values = {
        key: expect_choice(doc, m[key], path + (key,), choices) for key, choices in SPEC_FIELDS.items() if key in m
    }
    spec = replace(base, **values)
    if spec.backend == "scaled_mm" and spec.activations == "none":
        raise doc.error(
            path + ("backend",), "scaled_mm needs quantized activations; use weight_only for activations: none"
        )
    return spec


def _parse_component(doc: YamlDoc, name: str, raw: Any) -> ComponentPolicy:
    path = ("components", name)
    keys = ("dtype", "default", "rules") if name in QUANTIZABLE else ("dtype",)
    c = check_mapping(doc, raw, path, optional=keys)
    dtype = expect_choice(doc, c["dtype"], path + ("dtype",), DTYPES) if "dtype" in c else None
    default = _parse_spec(doc, c["default"], path + ("default",), Fp8Spec(), ()) if "default" in c else None
    base = default or Fp8Spec()
    rules_raw = expect(doc, c.get("rules", []), path + ("rules",), list, "a list of rules")
    rules = []
    for i, r in enumerate(rules_raw):
        rpath = path + ("rules", i)
        check_mapping(doc, r, rpath, required=("match",), optional=("precision", *SPEC_FIELDS))
        pattern = expect(doc, r["match"], rpath + ("match",), str, "an fnmatch pattern string")
        spec = _parse_spec(doc, {k: v for k, v in r.items() if k != "match"}, rpath, base, ())
        rules.append(Rule(pattern, spec, doc.line(rpath)))
    return ComponentPolicy(dtype=dtype, default=default, rules=tuple(rules))


def policy_path(name_or_path: str) -> Path:
    """A shipped policy's name (`fp8-e4m3-rowwise`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = POLICY_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))
    raise InputError(f"policy {name_or_path!r} is neither a file nor a shipped policy; shipped: {', '.join(known)}")


def load_policy(name_or_path: str) -> PrecisionPolicy:
    """Parse and validate a policy; any problem raises InputError naming file, line and key."""
    doc = load_yaml(policy_path(name_or_path), "policy")
    d = check_mapping(doc, doc.data, (), required=("name", "components"), optional=("description",))
    name = expect(doc, d["name"], ("name",), str, "a string")
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name in ("ref", ".", ".."):
        raise doc.error(
            ("name",), f"name {name!r} must be letters, digits, '-', '_' or '.' (it names folders), not 'ref'"
        )
    comps = check_mapping(doc, d["components"], ("components",), optional=COMPONENTS)
    components = {c: _parse_component(doc, c, raw) for c, raw in comps.items()}
    canonical = json.dumps(doc.data, sort_keys=True, default=str).encode()
    return PrecisionPolicy(
        name=name,
        path=str(doc.path),
        sha256=hashlib.sha256(canonical).hexdigest(),
        components=components,
        description=expect(doc, d.get("description", ""), ("description",), str, "a string"),
    )


def _linear_layers(module: Any) -> list[tuple[str, Any]]:
    from torch import nn

    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def resolve_plan(policy: PrecisionPolicy, components: dict[str, Any]) -> list[LayerPlan]:
    """Decide every linear layer of every quantizable component; backends are resolved here too."""
    from models.fp8 import resolve_backend

    plan: list[LayerPlan] = []
    for comp_name, comp_policy in policy.components.items():
        if comp_name not in QUANTIZABLE or (comp_policy.default is None and not comp_policy.rules):
            continue
        module = components.get(comp_name)
        if module is None:
            raise InputError(
                f"policy {policy.name!r} quantizes {comp_name!r}, which this model does not have", source=policy.path
            )
        # A rule may name any module (a conv embedding too), but only linear layers are quantized.
        names = [n for n, _ in module.named_modules() if n]
        for i, rule in enumerate(comp_policy.rules):
            if not any(fnmatchcase(n, rule.match) for n in names):
                raise InputError(
                    f"components.{comp_name}.rules[{i}]: pattern {rule.match!r} matches no module of "
                    f"{comp_name} (module names look like {names[0]!r})",
                    source=policy.path,
                    line=rule.line,
                )
        for layer_name, layer in _linear_layers(module):
            decided: tuple[str, Fp8Spec | None] = ("default", comp_policy.default)
            for i, rule in enumerate(comp_policy.rules):
                if fnmatchcase(layer_name, rule.match):
                    decided = (f"rule {i} ({rule.match})", rule.spec)
                    break
            rule_desc, spec = decided
            backend = "keep" if spec is None else resolve_backend(spec, layer.weight)
            shape = (layer.out_features, layer.in_features)
            plan.append(LayerPlan(comp_name, layer_name, shape, rule_desc, spec, backend))
    return plan


def backend_summary(plan: list[LayerPlan]) -> str:
    """What actually ran, e.g. `scaled_mm:30,keep:5`."""
    counts = Counter(layer.backend for layer in plan)
    return ",".join(f"{b}:{n}" for b, n in sorted(counts.items())) or "none"


def _set_submodule(root: Any, qualified_name: str, new: Any) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_policy(policy: PrecisionPolicy, components: dict[str, Any]) -> tuple[dict[str, Any], list[LayerPlan]]:
    """Candidate components: a quantized copy of each component the policy changes; the reference's
    own objects for the rest (shared, so unchanged text encoders and VAE are loaded once)."""
    import torch

    from models.fp8 import Fp8Linear

    plan = resolve_plan(policy, components)
    out = dict(components)
    for comp_name, comp_policy in policy.components.items():
        module = components.get(comp_name)
        layers = [layer for layer in plan if layer.component == comp_name and layer.spec is not None]
        dtype = getattr(torch, comp_policy.dtype) if comp_policy.dtype else None
        if module is None or (not layers and (dtype is None or module.dtype == dtype)):
            continue
        module = copy.deepcopy(module)
        if dtype is not None:
            module.to(dtype)
        for layer in layers:
            assert layer.spec is not None
            _set_submodule(module, layer.name, Fp8Linear(module.get_submodule(layer.name), layer.spec, layer.backend))
        out[comp_name] = module
    return out, plan
