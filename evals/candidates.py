"""Candidates: a policy applied to the reference's components, the noise floor (the reference under
a harmless change), or a quantized checkpoint file; each a pipeline that shares what it does not change."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evals.models.names import check_name, tame_name
from evals.models.precision import LayerPlan, PrecisionPolicy, apply_policy, backend_summary, resolve_plan
from evals.models.sources import LoadedModel
from evals.suite_types import Generation


@dataclass
class Candidate:
    name: str
    """Policy name; names the candidate everywhere."""
    pipeline: Any
    """The candidate pipeline (shares unchanged components with the reference)."""
    policy_sha256: str
    """Hash of the policy file's content."""
    plan: list[LayerPlan] = field(default_factory=list)
    """The resolved per-layer plan."""
    calibration: dict[str, float] | None = None
    """Calibrated input amax per `component.layer`, for static activations."""
    checkpoint: str | None = None
    """The checkpoint file the candidate was loaded from, if any."""
    activate: Callable[[], None] | None = None
    """Called before each of its batches: variants of a sensitivity sweep share one pipeline."""
    policy_path: str | None = None
    """The policy file it was built from (recorded so that `--resume` can rebuild it)."""
    images_per_call: int | None = None
    """Generate this many images per pipeline call instead of the suite's batch (the noise floor)."""
    noise_floor: str | None = None
    """Set on the noise-floor pseudo-candidate: the harmless change it measures."""
    baseline_of: str = ""
    """The policy whose baseline its baseline gates compare with (empty: its own name)."""

    @property
    def baseline_policy(self) -> str:
        return self.baseline_of or self.name

    @property
    def backends(self) -> str:
        return backend_summary(self.plan)


def _pipeline_with(model: LoadedModel, components: dict[str, Any]) -> Any:
    pipe = type(model.pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibrate(model: LoadedModel, policy: PrecisionPolicy, gen: Generation) -> dict[str, float]:
    """Input amax of every static layer, from the reference on the policy's calibration prompts."""
    from evals.models.calibration import calibrate_input_amax

    static: dict[str, list[str]] = {}
    for layer in resolve_plan(policy, model.pipeline.components):
        if layer.spec is not None and layer.spec.activations == "static":
            static.setdefault(layer.component, []).append(layer.name)
    cal = policy.calibration
    return calibrate_input_amax(
        model.pipeline,
        static,
        prompts=cal.prompts,
        seed=cal.seed,
        height=gen.height,
        width=gen.width,
        steps=gen.steps,
        guidance=gen.guidance,
        batch_size=gen.batch_size,
    )


def layers_of(transformer: Any, rule: str, component: str = "transformer") -> list[LayerPlan]:
    """The plan a built component shows (a checkpoint's, a factory's): each linear layer with the
    backend that runs it (this project's FP8 engine, `keep` for a plain layer, else the weight's
    tensor type, e.g. torchao's `Int8Tensor`) and its stored bytes."""
    from evals.models.fp8 import Fp8Linear
    from evals.models.precision import tensor_bytes

    plan = []
    for name, m in transformer.named_modules():
        if isinstance(m, Fp8Linear):
            spec, backend = m.spec, m.backend
        elif isinstance(m, torch.nn.Linear):
            plain = type(m.weight) in (torch.Tensor, torch.nn.Parameter)
            spec, backend = None, "keep" if plain else type(m.weight).__name__
        else:
            continue
        stored = sum(tensor_bytes(t) for t in [*m.parameters(), *m.buffers()])
        plan.append(LayerPlan(component, name, (m.out_features, m.in_features), rule, spec, backend, 0, stored))
    return plan


def build_candidate(model: LoadedModel, policy: PrecisionPolicy, gen: Generation) -> Candidate:
    if policy.factory:
        from evals.models.factories import build_with_factory

        components, digest = build_with_factory(policy.factory, policy.path, model.pipeline)
        built = _pipeline_with(model, components)
        sha256 = hashlib.sha256(f"{policy.sha256}:{digest}".encode()).hexdigest()  # a changed build is another
        plan = layers_of(built.transformer, f"factory {policy.factory}")
        return Candidate(policy.name, built, sha256, plan, policy_path=policy.path)
    if policy.diffusers_quantization:
        from evals.models.diffusers_quantization import load_quantized_transformer

        build = policy.diffusers_quantization
        transformer, digest = load_quantized_transformer(build, policy.path, model.source, model.pipeline.transformer)
        built = _pipeline_with(model, dict(model.pipeline.components, transformer=transformer))
        sha256 = hashlib.sha256(f"{policy.sha256}:{digest}".encode()).hexdigest() if digest else policy.sha256
        return Candidate(policy.name, built, sha256, layers_of(transformer, build.rule), policy_path=policy.path)
    amax = calibrate(model, policy, gen) if policy.needs_calibration else None
    components, plan = apply_policy(policy, model.pipeline.components, amax)
    return Candidate(
        policy.name, _pipeline_with(model, components), policy.sha256, plan, calibration=amax, policy_path=policy.path
    )


NOISE_FLOOR = "noise-floor"
"""Name of the pseudo-candidate that measures the reference against itself; never gated."""


def noise_floor_candidate(model: LoadedModel, change: str) -> Candidate:
    """The reference under a harmless change: one image per call (`batch`), or every component in
    float32 (`float32`). Its scores show how far identical builds drift, beside every candidate's."""
    import copy

    if change == "batch":
        pipeline = _pipeline_with(model, dict(model.pipeline.components))
        return Candidate(NOISE_FLOOR, pipeline, f"noise-floor:{change}", images_per_call=1, noise_floor=change)
    components = {
        k: (copy.deepcopy(v).to(torch.float32) if isinstance(v, torch.nn.Module) else v)
        for k, v in model.pipeline.components.items()
    }
    return Candidate(NOISE_FLOOR, _pipeline_with(model, components), f"noise-floor:{change}", noise_floor=change)


def candidate_from_checkpoint(model: LoadedModel, path: Path, name: str | None = None) -> Candidate:
    """A candidate built from a quantized checkpoint: ours (the transformer, or every component a
    policy changed), or a ComfyUI-style FP8 file (its transformer and text encoders). Named `name`,
    else after the policy its metadata names, else the file; its baseline is that policy's."""
    from evals.models.checkpoints import load_checkpoint

    device = next(model.pipeline.transformer.parameters()).device
    loaded = load_checkpoint(path, model.pipeline.components, device)
    meta = loaded.metadata
    plan = [layer for c in loaded.read for layer in layers_of(loaded.components[c], f"checkpoint {path.name}", c)]
    with path.open("rb") as f:
        given = meta.get("policy_sha256")  # untrusted: used only when it is a sha256 at all
        if given is not None and re.fullmatch(r"[0-9a-f]{64}", given):
            digest = given
        else:
            digest = hashlib.sha256(f.read(1 << 24)).hexdigest()
    components = dict(model.pipeline.components, **loaded.components)
    # A file's own name is made tame; names from its metadata (untrusted) must already be safe.
    from_metadata = meta.get("policy")
    if from_metadata is None:
        source_policy = tame_name(path.stem)
    else:
        source_policy = check_name(from_metadata, f"--candidate-checkpoint {path}: its metadata 'policy'")
    display = check_name(name or source_policy, f"--candidate-checkpoint {path}: the candidate name (NAME=FILE)")
    return Candidate(
        display, _pipeline_with(model, components), digest, plan, checkpoint=str(path), baseline_of=source_policy
    )
