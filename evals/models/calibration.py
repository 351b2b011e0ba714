"""Static activation calibration: the largest input magnitude each layer sees on calibration prompts.

Like TensorRT Model Optimizer's FP8 recipe, one per-tensor scale per layer is fixed ahead of time
(amax / format max) from the reference model's activations over every denoising step of a few
prompts. The prompts differ from the suites' so that a gate is not scored on its own calibration data.
"""

from __future__ import annotations

from typing import Any

import torch

from evals.models.calibration_prompts import CALIBRATION_PROMPTS


@torch.inference_mode()
def calibrate_input_amax(
    pipeline: Any,
    layers: dict[str, list[str]],
    *,
    prompts: int,
    seed: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    batch_size: int,
) -> dict[str, float]:
    """Run the reference pipeline on `prompts` calibration prompts and return, for each
    `component.layer` in `layers` ({component: [layer names]}), the largest |input| seen."""
    amax: dict[str, float] = {}
    handles = []

    def recorder(key: str) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            value = float(args[0].detach().abs().amax().float())
            amax[key] = max(amax.get(key, 0.0), value)

        return hook

    for component, names in layers.items():
        module = getattr(pipeline, component)
        for name in names:
            handles.append(module.get_submodule(name).register_forward_pre_hook(recorder(f"{component}.{name}")))
    try:
        texts = list(CALIBRATION_PROMPTS[:prompts])
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
            pipeline(
                prompt=batch,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="latent",
            )
    finally:
        for handle in handles:
            handle.remove()
    missing = [f"{c}.{n}" for c, names in layers.items() for n in names if f"{c}.{n}" not in amax]
    if missing:
        raise RuntimeError(f"calibration never reached {len(missing)} layers, e.g. {missing[0]}")
    return amax
