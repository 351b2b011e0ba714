"""`evals validate`: every suite and policy file checked without running anything, every error of
every file reported, and policies resolved against a model so a rule that matches nothing is caught
here rather than by `evals run`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from evals.gates import EXIT_BAD_INPUT
from evals.models.yamlspec import InputError


class ModelLayers:
    """The components policies are resolved against, loaded on first use: the whole pipeline of
    `tiny`, the transformer (on the meta device, no weights) of anything else."""

    def __init__(self, source: str, config: str | None):
        self.source, self.config = source, config
        self._components: dict[str, Any] | None = None

    def components(self) -> dict[str, Any]:
        if self._components is None:
            from evals.models.sources import is_tiny, load_source, load_transformer_skeleton

            if is_tiny(self.source):
                pipeline = load_source(self.source, "float32", "cpu").pipeline
                self._components = dict(pipeline.components)
            else:
                skeleton = load_transformer_skeleton(self.source, "bfloat16", config=self.config)
                self._components = {"transformer": skeleton}
        return self._components

    def check(self, policy: Any) -> list[str] | None:
        """Resolve the policy's plan (InputError when a rule matches nothing); returns the format of
        each layer it quantizes, or None with `--model none` (parsed only: no model, no torch).
        Components the model does not load here (a skeleton has only the transformer) are skipped."""
        if self.source == "none":
            return None
        import torch

        from evals.models.precision import resolve_plan

        components = self.components()
        if list(components) == ["transformer"]:  # a skeleton: only the transformer can be checked
            policy = dataclasses.replace(
                policy, components={k: v for k, v in policy.components.items() if k == "transformer"}
            )
        # The meta device: a file is checked, not this machine (what runs where is a run's question).
        plan = resolve_plan(policy, components, device=torch.device("meta"))
        transformer_policy = policy.components.get("transformer")
        if transformer_policy is not None and transformer_policy.attention is not None:
            from evals.models.attention_policy import resolve_attention

            resolve_attention(transformer_policy.attention, components["transformer"], policy.path)
        return [layer.spec.format for layer in plan if layer.spec is not None]


def format_family(fmt: str) -> str:
    """`INT8` for an integer format, `FP8` for e4m3fn and e5m2: an int8 layer is not an FP8 one."""
    return "INT8" if fmt.startswith("int") else "FP8"


def _families(formats: list[str]) -> tuple[str | None, str]:
    """(the one family of every layer, or None; `80 FP8, 5 INT8` when they are mixed, else empty)."""
    counts = Counter(format_family(f) for f in formats)
    if len(counts) == 1:
        return next(iter(counts)), ""
    return None, ", ".join(f"{n} {family}" for family, n in sorted(counts.items()))


def quantized_layers_text(formats: list[str]) -> str:
    """`85 FP8 layers`, `78 INT8 layers`, `85 quantized layers (80 FP8, 5 INT8)`, `0 quantized layers`."""
    family, mixed = _families(formats)
    if family:
        return f"{len(formats)} {family} layers"
    return f"{len(formats)} quantized layers" + (f" ({mixed})" if mixed else "")


def linear_layers_text(formats: list[str], linear_layers: int) -> str:
    """`85/92 linear layers in FP8`, `in INT8`, or `quantized (80 FP8, 5 INT8)` when mixed."""
    family, mixed = _families(formats)
    if family:
        return f"{len(formats)}/{linear_layers} linear layers in {family}"
    return f"{len(formats)}/{linear_layers} linear layers quantized" + (f" ({mixed})" if mixed else "")


def _kind(text: str) -> tuple[str, Path]:
    """("suite" | "policy", file) of a path or a shipped suite's or policy's name."""
    from evals.models.precision import policy_path
    from evals.models.yamlspec import load_yaml
    from evals.suite import suite_path

    path = Path(text)
    if path.is_file():
        data = load_yaml(path, "suite or policy").data
        builds = ("components", "factory", "diffusers_quantization")  # what only a policy has
        return ("policy" if isinstance(data, dict) and any(k in data for k in builds) else "suite"), path
    try:
        return "suite", suite_path(text)
    except InputError:
        try:
            return "policy", policy_path(text)
        except InputError:
            from evals.models.precision import shipped_policies
            from evals.models.yamlspec import did_you_mean
            from evals.suite import shipped_suites

            names = did_you_mean(text, [*shipped_suites(), *shipped_policies()])
            raise InputError(f"{text}: no such file, shipped suite or shipped policy{names}") from None


def validate_one(text: str, model: ModelLayers) -> str:
    """One file's OK line; InputError with all its errors."""
    from evals.models.precision import load_policy
    from evals.suite import load_suite

    kind, path = _kind(text)
    if kind == "policy":
        policy = load_policy(str(path))
        built_by = policy.factory or (
            f"diffusers' {policy.diffusers_quantization.backend} backend" if policy.diffusers_quantization else None
        )
        if built_by:  # its layers exist once built, which validating does not do
            return f"{text}: policy {policy.name!r} ok: built by {built_by} (`evals policy explain` builds it)"
        layers = model.check(policy)
        if layers is None:
            return f"{text}: policy {policy.name!r} ok (not resolved against a model)"
        return f"{text}: policy {policy.name!r} ok: {quantized_layers_text(layers)} on {model.source}"
    suite = load_suite(path)
    errors = []
    for name in suite.policies:
        try:
            model.check(load_policy(name))
        except InputError as exc:
            errors.append(f"policies: {name}: {exc}")
    if errors:
        raise InputError("\n  ".join([f"{path}: its policies do not apply to {model.source}:", *errors]))
    return (
        f"{text}: suite {suite.name!r} ok: {len(suite.cases)} cases, {len(suite.samples())} samples, "
        f"{len(suite.gates)} gates"
        + (f"; policies resolved on {model.source}" if suite.policies and model.source != "none" else "")
    )


def cmd_validate(args: argparse.Namespace) -> int:
    model = ModelLayers(args.model, args.model_config)
    failed = 0
    for text in args.files:
        try:
            print(validate_one(str(text), model))
        except InputError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(args.files)} files have errors", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def add_validate_command(sub: Any) -> None:
    validate = sub.add_parser(
        "validate", help="check suites and policies without running anything (every file, every error)"
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="suite or policy YAML files, or shipped names")
    validate.add_argument(
        "--model",
        default="tiny",
        help="model the policies are resolved against, so a rule that matches nothing is an error "
        "(default: tiny; `sd35-large`, `random:sd35-medium` or a diffusers folder for SD3.5 layer names; "
        "`none` parses only, without torch)",
    )
    validate.add_argument("--model-config", help="local diffusers SD3 folder for a single-file --model")
    validate.set_defaults(func=cmd_validate)
