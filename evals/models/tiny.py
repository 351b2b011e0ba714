"""The built-in `tiny` SD3 pipeline: small enough for a CPU, trained, never downloaded.

It has the shape of SD3.5-Medium (two CLIP encoders, no T5, a dual-attention first block, RMS q/k
norm, a 16-channel VAE) at a size that makes a 64x64 image in well under a second on a CPU. `tiny`
loads the trained weights committed in `models/weights/` (made by `python -m evals.models.tiny_train`, see
that module); `tiny-random[:SEED]` is the same architecture with seeded random weights, for tests
that need a model whose weights differ. Either way the same source gives bit-identical images in
every process.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from evals.models.safetensors_files import opened_safetensors

TINY_SEED = 0
TINY_VERSION = "tiny-sd3-v2"  # bump when the configs below change: it is part of the model fingerprint
WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "tiny-sd3.safetensors"
# printed by evals/models/tiny_train.py when it wrote WEIGHTS_FILE; tests/test_tiny_model.py checks it
WEIGHTS_SHA256 = "cd7afc0dc0aa82a5917f8c160338e4761d8b23463cb9cfaeed3878ccf2221c70"
T5_TOKENS = 8
"""The T5 budget the model was trained with (T5 is absent: zeros stand in). Suites on `tiny` set
`max_sequence_length` to this; other lengths work, a little less faithfully."""

# Dimensions are multiples of 16 so every transformer linear layer can run through torch._scaled_mm.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 128,  # >= sum of the CLIP hidden sizes, or F.pad silently truncates
    "caption_projection_dim": 128,  # == heads * head_dim
    "pooled_projection_dim": 128,  # == sum of the CLIP projection dims
    "out_channels": 16,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "projection_dim": 64,
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
    "block_out_channels": (32, 64, 64),  # vae_scale_factor 4: 64x64 images, 16x16 latents
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 16,
    "sample_size": 64,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    # Latent statistics of the trained VAE: replaced from the weights file's metadata on load.
    "shift_factor": 0.0,
    "scaling_factor": 1.0,
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


def build_tiny_components(seed: int = TINY_SEED, vae_factors: tuple[float, float] | None = None) -> dict[str, Any]:
    """Every component of the tiny pipeline with seeded random weights; each module is seeded on its
    own so that changing one config leaves the others' weights as they were. `vae_factors`:
    (shift_factor, scaling_factor) of the VAE's latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    clip_config = CLIPTextConfig(
        **CLIP_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vae_config = dict(VAE_CONFIG)
    if vae_factors is not None:
        vae_config["shift_factor"], vae_config["scaling_factor"] = vae_factors
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**vae_config)
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


TRAINED = ("transformer", "text_encoder", "text_encoder_2", "vae")
"""The components whose weights the weights file holds, as `component.parameter` keys."""


def weights_sha256(path: Path = WEIGHTS_FILE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_trained_components(path: Path = WEIGHTS_FILE) -> dict[str, Any]:
    """The tiny pipeline's components with the trained weights of `path` (float32, eval mode); a
    missing, unreadable or mismatched file is an InputError naming it."""
    from evals.models.yamlspec import InputError

    remedy = (
        "they are committed in the repository (a Git LFS pointer or a damaged checkout shows this); "
        "`python -m evals.models.tiny_train` on a GPU makes them again"
    )
    if not path.is_file():
        raise InputError(f"the tiny model's weights are missing: {path} ({remedy})")
    with opened_safetensors(path, remedy) as f:
        meta = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    try:
        factors = (float(meta["vae_shift_factor"]), float(meta["vae_scaling_factor"]))
    except (KeyError, ValueError) as exc:
        raise InputError(
            f"{path}: metadata vae_shift_factor/vae_scaling_factor missing or not numbers; {remedy}"
        ) from exc
    not_float = sorted(k for k, v in tensors.items() if not v.dtype.is_floating_point)
    if not_float:
        raise InputError(f"{path}: {not_float[0]} is {tensors[not_float[0]].dtype}, expected float weights; {remedy}")
    components = build_tiny_components(vae_factors=factors)
    for name in TRAINED:
        prefix = f"{name}."
        state = {k.removeprefix(prefix): v.float() for k, v in tensors.items() if k.startswith(prefix)}
        # strict: every parameter and buffer comes from the file, none keeps its random value
        try:
            components[name].load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing, unexpected or misshapen tensors
            raise InputError(f"{path}: does not fit the tiny model's {name} ({_first_line(exc)}); {remedy}") from exc
    return components


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3])[:500]


def build_tiny_pipeline(seed: int | None = None) -> Any:
    """The trained pipeline (`seed` None) or the random-weight one of that seed."""
    from diffusers import StableDiffusion3Pipeline

    components = load_trained_components() if seed is None else build_tiny_components(seed)
    pipe: Any = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_fingerprint(seed: int | None = None) -> str:
    if seed is None:
        return f"{TINY_VERSION}:trained:{WEIGHTS_SHA256[:16]}"
    return f"{TINY_VERSION}:random:seed={seed}"
