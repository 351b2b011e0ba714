"""The precision policy file, described once: these models validate a policy's YAML (its structure,
types and choices) and publish its JSON Schema (`evals schema policy`), which editors use to complete
and check policy files. What depends on more than one key (inheritance from `default`, a backend
that cannot run a combination) is checked by `evals.models.precision`. Imports no torch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from evals.models.calibration_prompts import CALIBRATION_PROMPTS
from evals.models.fp8_spec import Activations, PolicyBackend, PolicyFormat, WeightScale
from evals.models.names import SAFE_NAME, SAFE_NAME_RULE
from evals.models.yamlspec import MAX_SEED, StrictModel

Dtype = Literal["float32", "bfloat16", "float16"]
# Prompt i is rendered with seed + i, and torch takes seeds up to 2**64-1.
MAX_CALIBRATION_SEED = MAX_SEED - (len(CALIBRATION_PROMPTS) - 1)
MAX_BLOCK_SIZE = 4096  # weight tile side (the usual is 128); a larger tile than a layer is one tile anyway


FACTORY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


class Fp8Settings(StrictModel):
    """How a layer runs; a key left out is inherited from the component's `default`."""

    precision: Literal["fp8", "keep"] = Field(
        "fp8", description="fp8, or keep: the layer stays in the component's dtype"
    )
    format: PolicyFormat | None = Field(
        None, description="e4m3fn (max 448, more mantissa), e5m2 (max 57344, more range), or int8 (backend: torchao)"
    )
    weights: WeightScale | None = Field(
        None, description="weight scale granularity: per_tensor, per_channel (one per output row) or per_block"
    )
    activations: Activations | None = Field(
        None,
        description="none (weight-only), dynamic_per_tensor, dynamic_per_token, or static (one calibrated scale)",
    )
    backend: PolicyBackend | None = Field(
        None, description="auto picks the fastest of this project's kernels that runs here; torchao: torchao's"
    )
    block_size: int | None = Field(
        None,
        ge=1,
        le=MAX_BLOCK_SIZE,
        description=f"side of the square weight tiles (per_block), a power of two, at most {MAX_BLOCK_SIZE}",
    )
    fast_accum: bool | None = Field(None, description="the FP8 GEMM's faster, less precise accumulation (scaled_mm)")


class Rule(Fp8Settings):
    """A rule: the first whose pattern matches a layer's name decides it."""

    match: str = Field(description="fnmatch pattern on the layer's qualified name inside its component")


class Component(StrictModel):
    dtype: Dtype | None = Field(None, description="the component's dtype; left out: the reference's")


class Quantizable(Component):
    """A component whose linear layers the rules may quantize (every component of SD3)."""

    default: Fp8Settings | None = Field(None, description="settings of the layers no rule matches; left out: kept")
    rules: list[Rule] = Field(default_factory=list, description="ordered rules, first match wins")


AttentionPrecision = Literal["bf16", "fp8", "int8"]
ATTENTION_HELP = (
    "bf16: diffusers' attention in the transformer's dtype; int8: SageAttention's smoothed INT8 Q·Kᵀ; "
    "fp8: e4m3 Q, K, V and P (emulated: quality only)"
)


class AttentionRule(StrictModel):
    """An attention rule: the first whose pattern matches an attention module's name decides it."""

    match: str = Field(description="fnmatch pattern on the attention module's name, e.g. transformer_blocks.1?.attn")
    precision: AttentionPrecision = Field(description=ATTENTION_HELP)


class Attention(StrictModel):
    """The precision of the joint attention product (Q·Kᵀ, softmax, P·V) of each transformer block."""

    default: AttentionPrecision = Field("bf16", description=ATTENTION_HELP)
    rules: list[AttentionRule] = Field(default_factory=list, description="ordered rules, first match wins")


class Transformer(Quantizable):
    attention: Attention | None = Field(None, description="attention precision per block; left out: bf16")


class T5(Quantizable):
    drop: bool = Field(False, description="leave T5 out of the candidate (SD3 runs without it)")


class Components(StrictModel):
    """The pipeline's components; one left out stays as the reference has it. Each takes a dtype and
    FP8 rules for its linear layers (the VAE's are its attention projections)."""

    transformer: Transformer | None = None
    vae: Quantizable | None = None
    text_encoder: Quantizable | None = Field(None, description="CLIP-L")
    text_encoder_2: Quantizable | None = Field(None, description="CLIP-G")
    text_encoder_3: T5 | None = Field(None, description="T5-XXL")


class Calibration(StrictModel):
    """How static activation scales are calibrated (used only where a layer is `static`)."""

    prompts: int = Field(
        8,
        ge=1,
        le=len(CALIBRATION_PROMPTS),
        description=f"the first N calibration prompts, 1 to {len(CALIBRATION_PROMPTS)}",
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_CALIBRATION_SEED,
        description=f"generator seed of the calibration images, 0 to {MAX_CALIBRATION_SEED} (prompt i uses seed + i)",
    )


DiffusersBackend = Literal["torchao", "quanto", "bitsandbytes", "gguf"]
# Config values are small settings (thresholds, group sizes): bounded like every number of a policy.
ConfigScalar = (
    str | Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | Annotated[float, Field(ge=-1e9, le=1e9)] | bool | None
)
ConfigValue = ConfigScalar | list[ConfigScalar] | dict[str, ConfigScalar]


class DiffusersQuantization(StrictModel):
    """The transformer loaded through one of diffusers' own quantization backends, with that backend's
    config class (evals.models.diffusers_quantization)."""

    backend: DiffusersBackend = Field(
        description="torchao (TorchAoConfig), quanto (QuantoConfig), bitsandbytes (BitsAndBytesConfig, CUDA only) "
        "or gguf (GGUFQuantizationConfig and a .gguf file)"
    )
    config: dict[str, ConfigValue] = Field(
        default_factory=dict,
        description="keyword arguments of the backend's diffusers config class; dtypes by name (bfloat16); "
        "torchao: quant_type names a torchao.quantization config class, quant_type_kwargs its arguments",
    )
    file: str | None = Field(None, description="gguf only: the quantized .gguf transformer, relative to this file")


class PolicyFile(StrictModel):
    """A precision policy: which layers of which component run in FP8, and how."""

    name: str = Field(
        pattern=SAFE_NAME.pattern,
        description=f"{SAFE_NAME_RULE} characters: it names the candidate's folders, records and MLflow runs",
    )
    description: str = Field("", description="what the policy mirrors")
    components: Components | None = Field(None, description="what changes in each component (or `factory`)")
    factory: str | None = Field(
        None,
        pattern=FACTORY_PATTERN,
        description="`module:function` that builds the candidate from the reference pipeline and returns a "
        "pipeline or a transformer (an in-house build); instead of `components`",
    )
    diffusers_quantization: DiffusersQuantization | None = Field(
        None, description="the transformer quantized by a diffusers backend; instead of `components` or `factory`"
    )
    calibration: Calibration = Calibration()
