"""`random:sd35-medium` and `random:sd35-large`: the full SD3.5 pipeline architecture (transformer,
CLIP-L, CLIP-G, VAE at their real sizes; no T5) with random weights, built on the target device.

For timing whole suites on a GPU without the real weights (which need a license and a download):
the images are not meaningful, the compute is the real one. The tokenizers are the tiny byte-level
one (token ids stay below CLIP's vocabulary), so prompts cost what real prompts cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

RANDOM_VERSION = "random-sd35-v1"  # part of the fingerprint: bump when the configs change
CONFIGS = Path(__file__).parent / "configs"
ARCHITECTURES = ("sd35-medium", "sd35-large")

CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CLIP_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
VAE: dict[str, Any] = {  # SD3's 16-channel VAE
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
}


@contextlib.contextmanager
def built_on(dtype: torch.dtype, device: str) -> Iterator[None]:
    """New modules' parameters are created on `device` in `dtype` (not in float32 on the CPU first)."""
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def build_random_pipeline(architecture: str, dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    """Every component built directly on `device` in `dtype` (SD3.5-Large in float32 on a CPU first
    would take minutes and twice the memory)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from evals.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    }
    transformer_config = SD3Transformer2DModel.load_config(str(CONFIGS / architecture / "transformer"))
    with built_on(dtype, device):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel.from_config(transformer_config)
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **special))
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **special))
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(**VAE)
    modules = {"transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
    for module in modules.values():
        module.eval().requires_grad_(False)
    pipe: Any = StableDiffusion3Pipeline(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_fingerprint(architecture: str, seed: int) -> str:
    return f"{RANDOM_VERSION}:{architecture}:seed={seed}"
