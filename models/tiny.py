"""The built-in `tiny` SD3 pipeline: built from configs with fixed seeds, never downloaded.

It has the shape of SD3.5-Medium (two CLIP encoders, no T5, a dual-attention first block, RMS
q/k norm) at a size that runs a 64x64 image in a few hundredths of a second on a CPU. Its weights are
random but fixed: the same seed gives the same weights, and the same image, in every process.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

TINY_SEED = 0
TINY_VERSION = "tiny-sd3-v1"  # bump when the configs below change: it is part of the model fingerprint

# Dimensions are multiples of 16 so every transformer linear layer can run through torch._scaled_mm.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,  # >= sum of the CLIP hidden sizes, or F.pad silently truncates
    "caption_projection_dim": 64,  # == heads * head_dim
    "pooled_projection_dim": 64,  # == sum of the CLIP projection dims
    "out_channels": 4,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 32,
    "vocab_size": 1000,  # must exceed the 514 ids of the byte-level tokenizer below
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 32),  # vae_scale_factor 4: 64x64 images, 16x16 latents
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5035,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the one CLIP's BPE uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


@lru_cache(maxsize=1)
def tokenizer_folder() -> Path:
    """Write a byte-level CLIP tokenizer (no merges) to a temp folder, once per process."""
    folder = Path(tempfile.mkdtemp(prefix="tiny-sd3-tokenizer-"))
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def build_tiny_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_folder()), model_max_length=77)


def build_tiny_components(seed: int = TINY_SEED) -> dict[str, Any]:
    """Every component of the tiny pipeline; each module is seeded on its own so that changing one
    config leaves the others' weights as they were."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    clip_config = CLIPTextConfig(
        **CLIP_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**VAE_CONFIG)
    components: dict[str, Any] = {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "vae": vae,
    }
    for module in components.values():
        module.eval()  # models built from a config start in train mode
    return {
        **components,
        "tokenizer": tokenizer,
        "tokenizer_2": build_tiny_tokenizer(),
        "text_encoder_3": None,
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def build_tiny_pipeline(seed: int = TINY_SEED) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe: Any = StableDiffusion3Pipeline(**build_tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_fingerprint(seed: int = TINY_SEED) -> str:
    return f"{TINY_VERSION}:seed={seed}"
