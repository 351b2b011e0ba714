"""Images of a batch from a pipeline, and their 8-bit form: what the runner, the bench and the tests
generate with, apart from the runner so that none of them imports another for it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evals.suite_types import Generation, Sample


@torch.inference_mode()
def generate(pipe: Any, batch: list[Sample], gen: Generation) -> torch.Tensor:
    """Images of a batch as float NCHW on the 0..1 scale, *unclamped*: NaN/Inf stay visible.

    Latents come from CPU generators, so the starting noise is the same on every device. The VAE
    decode is done here rather than in the pipeline, whose post-processing clamps away Inf.
    """
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch]
    latents = pipe(
        prompt=[s.case.prompt for s in batch],
        height=gen.height,
        width=gen.width,
        num_inference_steps=gen.steps,
        guidance_scale=gen.guidance,
        max_sequence_length=gen.max_sequence_length,
        generator=generators,
        output_type="latent",
    ).images
    return decode_latents(pipe, latents).cpu()


@torch.inference_mode()
def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The VAE decode of SD3 latents as float NCHW on the 0..1 scale, unclamped, on the VAE's device
    (the pipeline's own post-processing would clamp away Inf)."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return decoded.float() / 2 + 0.5


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW float -> NHWC uint8, as the PNG files hold them (NaN becomes 0: black)."""
    clean = torch.nan_to_num(images, nan=0.0).clamp(0, 1)
    return (clean * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
