"""Model sources: `tiny`, a local diffusers folder, the offline HF cache, or a single file.

Never downloads anything. See `load_source` for the forms a source string takes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.models.safetensors_files import opened_safetensors
from evals.models.yamlspec import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
GET_WEIGHTS_HINT = (
    "download it on a machine with network access, e.g. "
    "`huggingface-cli download stabilityai/stable-diffusion-3.5-medium --local-dir PATH` "
    "(the model's license must be accepted on the Hub first), then pass --model PATH"
)


@dataclass
class LoadedModel:
    pipeline: Any
    """A diffusers StableDiffusion3Pipeline, on its device, in the reference dtype."""
    source: str
    """The source string it was loaded from."""
    fingerprint: str
    """Identifies the weights: part of the reference cache key and logged with every run."""


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""SD3.5 configs installed with the package: plans and `policy explain` without weights."""


def shipped_config(source: str) -> Path | None:
    """The shipped config folder a source names (`sd35-large`, or `models/configs/sd35-large` outside
    the repository), when no such path exists here."""
    path = Path(source).expanduser()
    shipped = SHIPPED_CONFIGS / path.name
    if not path.exists() and shipped.is_dir() and path.parent.as_posix() in (".", "configs", "models/configs"):
        return shipped
    return None


def cast(module: Any, dtype: Any) -> Any:
    """`module.to(dtype)` without diffusers' warning about modules "kept in float32" (printed on every
    cast of a model that lists none): torch's own `Module.to`, which is what diffusers calls after
    the warning for a model that is not quantized."""
    import torch

    if getattr(module, "is_quantized", False):
        return module.to(dtype)
    return torch.nn.Module.to(module, dtype)


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, name)


def resolved_dtype_name(name: str, device: str) -> str:
    return str(resolve_dtype(name, device)).removeprefix("torch.")


def _folder_fingerprint(folder: Path) -> str:
    """Hash of every config file's content and every weight file's name and size.

    Hashing gigabytes of weights on every run would cost minutes; names, sizes and configs change
    whenever a different checkpoint is put in place.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".json" or path.name.endswith(".txt"):
            digest.update(f"{rel}\n".encode() + path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{rel}:{path.stat().st_size}\n".encode())
    return f"folder:{digest.hexdigest()[:16]}"


OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")


def _check_folder(folder: Path, need_transformer_weights: bool = True) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise InputError(f"model folder not found: {folder}; {GET_WEIGHTS_HINT}")
    if not index.is_file():
        raise InputError(f"missing {index}: not a diffusers model folder; {GET_WEIGHTS_HINT}")
    try:
        components = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {index}: {exc}") from exc
    if not isinstance(components, dict) or "transformer" not in components:
        raise InputError(f"{index} does not describe an SD3 pipeline (no 'transformer' entry)")
    weights = list((folder / "transformer").glob("*.safetensors"))
    if need_transformer_weights and not weights:
        raise InputError(
            f"missing {folder / 'transformer'}/*.safetensors (the transformer weights); only safetensors "
            f"are loaded, never pickle files; {GET_WEIGHTS_HINT}"
        )
    return components


def _from_hf_cache(repo_id: str) -> Path:
    """The snapshot folder of an already-downloaded Hub repository (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        raise InputError(
            f"model {repo_id!r} is neither a local folder nor in the Hugging Face cache ({HF_HUB_CACHE}); "
            f"on a machine with network access run `huggingface-cli download {repo_id}` with the same "
            "HF_HOME (SD3.5 repositories are gated: accept the license on huggingface.co and "
            "`huggingface-cli login` first), or download it to a folder and pass `--model FOLDER`"
        ) from exc


def _single_file_transformer(path: Path, config: Path, dtype: Any) -> Any:
    from diffusers import SD3Transformer2DModel

    if path.suffix != ".safetensors":
        raise InputError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
    if not (config / "transformer" / "config.json").is_file():
        raise InputError(
            f"missing {config / 'transformer' / 'config.json'}: --model-config must be a diffusers SD3 folder "
            f"(its configs, text encoders and VAE); {GET_WEIGHTS_HINT}"
        )
    _check_safetensors_header(path)
    try:
        return SD3Transformer2DModel.from_single_file(
            str(path), config=str(config), subfolder="transformer", local_files_only=True, torch_dtype=dtype
        )
    except MemoryError:
        raise
    except Exception as exc:  # diffusers, on whatever keys, shapes and bytes the file holds
        raise InputError(
            f"{path}: not an SD3 transformer checkpoint that fits {config / 'transformer' / 'config.json'} "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3])[:500]


def _check_safetensors_header(path: Path) -> None:
    """InputError unless `path` is a complete safetensors file (its header only is read: cheap)."""
    with opened_safetensors(path) as f:
        keys = list(f.keys())
    if not keys:
        raise InputError(f"{path}: holds no tensors; expected an SD3 transformer checkpoint")


def _locate(source: str, config: str | None) -> tuple[Path, Path | None]:
    """The diffusers folder a source reads from, and its single transformer file if it is one."""
    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        if config is None:
            raise InputError(
                f"{path}: a single-file checkpoint needs --model-config FOLDER (a local diffusers SD3 folder)"
            )
        return Path(config).expanduser(), path
    shipped = shipped_config(source)
    if shipped is not None:
        return shipped, None
    if not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _from_hf_cache(source), None  # a Hub repo id, read from the cache
    return path, None


def is_tiny(source: str) -> bool:
    return source in ("tiny", "tiny-random") or source.startswith(("tiny:", "tiny-random:"))


def _tiny_seed(source: str) -> int | None:
    """None for the trained `tiny`; the seed of `tiny-random[:SEED]` (random weights)."""
    if source == "tiny":
        return None
    name, _, seed_text = source.partition(":")
    if name != "tiny-random" or not (seed_text or "0").isdigit():
        raise InputError(
            f"model source {source!r}: expected `tiny` (the trained CI model) or `tiny-random[:SEED]` "
            "(its architecture with random weights, SEED an integer)"
        )
    return int(seed_text or "0")


def load_source(
    source: str, dtype_name: str = "auto", device: str = "cpu", *, config: str | None = None, drop_t5: bool = False
) -> LoadedModel:
    """Load the reference pipeline; every missing file is an InputError naming it.

    `source`: `tiny` (trained), `tiny-random[:SEED]`, `random:sd35-medium[:SEED]` / `random:sd35-large` (real
    architecture, random weights, for timing), a local diffusers folder, a Hub repository id already in the
    Hugging Face cache (read with HF_HUB_OFFLINE=1), or a single `.safetensors` transformer
    checkpoint (original SD3 or diffusers key names) with `config` naming a local diffusers folder
    for everything else. `drop_t5` loads the pipeline without T5 (zeros stand in for its embeddings).
    """
    import torch

    dtype = resolve_dtype(dtype_name, device)
    if is_tiny(source):
        from evals.models.tiny import build_tiny_pipeline, tiny_fingerprint

        seed = _tiny_seed(source)
        pipe = build_tiny_pipeline(seed)
        fingerprint = tiny_fingerprint(seed)
        if dtype != torch.float32:  # built in float32
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    cast(component, dtype)
        pipe.to(device)
        return LoadedModel(pipeline=pipe, source=source, fingerprint=fingerprint)

    if source.startswith("random:"):
        from evals.models.random_sd35 import ARCHITECTURES, build_random_pipeline, random_fingerprint

        architecture, _, seed_text = source.removeprefix("random:").partition(":")
        if architecture not in ARCHITECTURES or not (seed_text or "0").isdigit():
            raise InputError(
                f"model source {source!r}: expected random:ARCH or random:ARCH:SEED with ARCH one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        seed = int(seed_text or "0")
        pipe = build_random_pipeline(architecture, dtype, device, seed)
        return LoadedModel(pipeline=pipe, source=source, fingerprint=random_fingerprint(architecture, seed))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model must never fall back to the Hub
    folder, single_file = _locate(source, config)
    overrides: dict[str, Any] = {}
    if single_file is not None:
        if not single_file.is_file():
            raise InputError(f"checkpoint not found: {single_file}; {GET_WEIGHTS_HINT}")
        index = _check_folder(folder, need_transformer_weights=False)
        overrides["transformer"] = _single_file_transformer(single_file, folder, dtype)
        fingerprint = f"file:{single_file.name}:{single_file.stat().st_size}:{_folder_fingerprint(folder)}"
    else:
        index = _check_folder(folder)
        fingerprint = _folder_fingerprint(folder)
    from diffusers import StableDiffusion3Pipeline

    # Components a folder leaves out (T5 in a T5-less save) must be passed as None explicitly.
    absent = {name: None for name in OPTIONAL_COMPONENTS if index.get(name, [None])[0] is None}
    if drop_t5:
        absent.update(text_encoder_3=None, tokenizer_3=None)
        fingerprint += ":no-t5"
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(
            str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True, **absent, **overrides
        )
    except MemoryError:
        raise
    except Exception as exc:  # a config or weights file of the folder that diffusers cannot read
        raise InputError(
            f"{folder}: cannot load the diffusers SD3 pipeline ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return LoadedModel(pipeline=pipe, source=source, fingerprint=fingerprint)


def load_transformer_skeleton(source: str, dtype_name: str, *, config: str | None = None) -> Any:
    """The transformer's architecture without loading its weights (on the meta device), for plans
    and `evals policy explain`; `tiny` is built for real since it costs nothing."""
    import torch

    dtype = resolve_dtype(dtype_name, "cuda")  # auto: what a GPU deployment uses
    if source.startswith("random:"):  # the same architecture as its shipped config
        source = str(SHIPPED_CONFIGS / source.removeprefix("random:").split(":")[0])
    if is_tiny(source):
        return cast(load_source(source, dtype_name="float32").pipeline.transformer, dtype)
    folder, _ = _locate(source, config)
    config_file = folder / "transformer" / "config.json"
    if not config_file.is_file():
        raise InputError(f"missing {config_file}: not a diffusers SD3 folder; {GET_WEIGHTS_HINT}")
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(folder / "transformer")))
    return cast(model, dtype)


def check_generation_fits(pipeline: Any, height: int, width: int, where: str) -> None:
    """InputError when the model cannot make images of this size: SD3's position embedding covers
    `pos_embed_max_size` patches a side, and a side must be a whole number of patches."""
    config = pipeline.transformer.config
    patch = int(config.patch_size) * int(pipeline.vae_scale_factor)
    largest = int(config.pos_embed_max_size or 0) * patch
    for side, value in (("height", height), ("width", width)):
        if value % patch:
            raise InputError(f"{where}: generation.{side} {value} must be a multiple of {patch} for this model")
        if largest and value > largest:
            raise InputError(
                f"{where}: generation.{side} {value} is larger than this model makes ({largest} pixels a side); "
                "use a smaller size or a larger model"
            )


def cpu_warning(pipeline: Any, source: str) -> str | None:
    """A warning when a full-size transformer is to run on the CPU, where one image takes minutes."""
    count = sum(p.numel() for p in pipeline.transformer.parameters())
    if count < 200_000_000:
        return None
    return (
        f"{source} has a {count / 1e9:.1f} B-parameter transformer and runs on the CPU: each image takes "
        "minutes (`--device cuda` on a GPU; `--model tiny` for a quick check)"
    )
