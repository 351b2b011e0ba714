"""Candidates built by diffusers' own quantization backends: a policy file's
`diffusers_quantization: {backend, config, file}` loads the reference's transformer again through
diffusers' quantizer, with the backend's own config class built from `config`:

    torchao       TorchAoConfig(quant_type=<torchao.quantization class>(**quant_type_kwargs), ...)
    quanto        QuantoConfig(weights_dtype=..., modules_to_not_convert=...)   (optimum-quanto)
    bitsandbytes  BitsAndBytesConfig(load_in_8bit=... | load_in_4bit=..., ...)  (CUDA only)
    gguf          GGUFQuantizationConfig(compute_dtype=...), with the quantized `.gguf` transformer
                  file read by SD3Transformer2DModel.from_single_file

A model folder's transformer is loaded from the folder; an in-memory reference (tiny, random:*, a
single file) is saved to a temporary folder first. Each backend's package is an extra
(`pip install 'sd35-fp8-gate[quanto]'`); one that is missing, or hardware a backend cannot use, is an
InputError that says what to install or what is needed. The config's keys are checked against the
config class when the policy loads: diffusers' config classes take unknown keywords silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.models import policy_schema as schema
from evals.models.yamlspec import Errors, InputError, YamlDoc, did_you_mean


@dataclass(frozen=True)
class Backend:
    config_class: str
    """The diffusers config class (in the `diffusers` namespace)."""
    packages: tuple[tuple[str, str], ...]
    """(import name, pip name) of what diffusers needs for it."""
    extra: str
    """This project's extra that installs them."""
    needs_gpu: bool = False
    """diffusers' quantizer refuses to run without a CUDA (or XPU) device."""
    extra_keys: tuple[str, ...] = ()
    """Keys this project adds to the config class's own (built into its arguments)."""


BACKENDS = {
    "torchao": Backend("TorchAoConfig", (("torchao", "torchao"),), "torchao", extra_keys=("quant_type_kwargs",)),
    "quanto": Backend("QuantoConfig", (("optimum.quanto", "optimum-quanto"), ("accelerate", "accelerate")), "quanto"),
    "bitsandbytes": Backend(
        "BitsAndBytesConfig", (("bitsandbytes", "bitsandbytes"), ("accelerate", "accelerate")), "bitsandbytes", True
    ),
    "gguf": Backend("GGUFQuantizationConfig", (("gguf", "gguf"), ("accelerate", "accelerate")), "gguf"),
}
DTYPE_KEYS = ("compute_dtype", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
"""Config keys whose value is a torch dtype, written in YAML by name."""
DTYPES = ("float32", "bfloat16", "float16")
NOT_FROM_YAML = ("self", "kwargs", "forward_loop")


@dataclass(frozen=True)
class DiffusersBuild:
    """A policy's `diffusers_quantization`, checked."""

    backend: str
    """torchao, quanto, bitsandbytes or gguf."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the backend's config class, as written (dtypes by name)."""
    file: str | None = None
    """gguf: the quantized transformer file, resolved against the policy file's folder."""

    @property
    def rule(self) -> str:
        """What each layer of its plan says decided it."""
        return f"diffusers {self.backend}" + (f" {Path(self.file).name}" if self.file else "")


def config_keys(backend: str) -> list[str]:
    """The keys `config` may hold: the config class's named arguments (diffusers' own truth)."""
    import diffusers

    spec = BACKENDS[backend]
    parameters = inspect.signature(getattr(diffusers, spec.config_class).__init__).parameters
    named = [n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return [n for n in named if n not in NOT_FROM_YAML] + list(spec.extra_keys)


def parse_build(doc: YamlDoc, given: schema.DiffusersQuantization) -> DiffusersBuild:
    """Check `diffusers_quantization` as far as can be done without the backend's package: its keys,
    dtype names, the torchao class name's type and the gguf file."""
    path = ("diffusers_quantization",)
    errors = Errors()
    allowed = config_keys(given.backend)
    for key, value in given.config.items():
        where = path + ("config", key)
        if key not in allowed:
            config_class = BACKENDS[given.backend].config_class
            errors.found.append(doc.error(where, f"{config_class} takes no {key!r}" + did_you_mean(key, allowed)))
        elif key in DTYPE_KEYS and value is not None and value not in DTYPES:
            errors.found.append(doc.error(where, f"expected a dtype name, one of {', '.join(DTYPES)}; got {value!r}"))
    if given.backend == "torchao" and not isinstance(given.config.get("quant_type"), str):
        errors.found.append(
            doc.error(path + ("config",), "torchao needs quant_type: the name of a torchao.quantization config class")
        )
    if "quant_type_kwargs" in given.config and not isinstance(given.config["quant_type_kwargs"], dict):
        errors.found.append(
            doc.error(path + ("config", "quant_type_kwargs"), "expected a mapping of keyword arguments")
        )
    file = None
    if given.backend == "gguf":
        if given.file is None:
            errors.found.append(doc.error(path, "backend gguf needs `file`: the quantized .gguf transformer file"))
        else:
            resolved = (Path(doc.path).parent / given.file).resolve()
            if resolved.suffix != ".gguf" or not resolved.is_file():
                errors.found.append(doc.error(path + ("file",), f"no .gguf file at {resolved}"))
            file = str(resolved)
    elif given.file is not None:
        errors.found.append(doc.error(path + ("file",), "only backend gguf reads a file; the others quantize on load"))
    errors.raise_any()
    return DiffusersBuild(given.backend, dict(given.config), file)


def backend_problem(backend: str, device: Any) -> str | None:
    """Why `backend` cannot build a candidate on `device` here (None when it can)."""
    spec = BACKENDS[backend]
    missing = [pip for module, pip in spec.packages if not _installed(module)]
    if missing:
        return (
            f"diffusers' {backend} backend needs {', '.join(missing)}, not installed: "
            f"pip install 'sd35-fp8-gate[{spec.extra}]' (or pip install {' '.join(missing)})"
        )
    if spec.needs_gpu and device.type != "cuda":
        return f"diffusers' {backend} backend quantizes on a CUDA GPU only, not on {device}; run with --device cuda"
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (`optimum` of `optimum.quanto`)
        return False


def diffusers_config(build: DiffusersBuild, dtype: Any, source: str) -> Any:
    """The backend's config object. `dtype` (the reference's) is GGUF's compute dtype unless given."""
    import diffusers
    import torch

    kwargs = {k: (getattr(torch, v) if k in DTYPE_KEYS and v is not None else v) for k, v in build.config.items()}
    if build.backend == "torchao":
        import torchao.quantization as recipes

        name = kwargs.pop("quant_type")
        recipe = getattr(recipes, name, None)
        if not inspect.isclass(recipe):
            known = [n for n in dir(recipes) if n.endswith("Config") and inspect.isclass(getattr(recipes, n))]
            raise InputError(
                f"diffusers_quantization.config.quant_type: torchao has no {name!r}" + did_you_mean(name, known),
                source=source,
            )
        kwargs["quant_type"] = _built(recipe, kwargs.pop("quant_type_kwargs", None) or {}, source)
    if build.backend == "gguf":
        kwargs.setdefault("compute_dtype", dtype)
    return _built(getattr(diffusers, BACKENDS[build.backend].config_class), kwargs, source)


def _built(config_class: Any, kwargs: dict[str, Any], source: str) -> Any:
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as exc:  # the config class's own check of its values
        raise InputError(f"diffusers_quantization.config: {config_class.__name__}: {exc}", source=source) from exc


def check_runs_in_inference_mode(transformer: Any, backend: str, source: str) -> None:
    """One converted layer run as generation runs it (torch.inference_mode): some builds load but
    cannot run there (optimum-quanto 0.2's packed int4 and int2 weights), and should say so before
    the run starts rather than break it."""
    import torch

    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and type(layer.weight) not in (torch.Tensor, torch.nn.Parameter):
            probe = torch.zeros(1, layer.in_features, dtype=transformer.dtype, device=layer.weight.device)
            try:
                with torch.inference_mode():
                    layer(probe)
            except RuntimeError as exc:
                raise InputError(
                    f"diffusers_quantization: the {backend} build of {name} cannot run under torch.inference_mode, "
                    f"in which the harness generates: {exc}",
                    source=source,
                ) from exc
            return


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_quantized_transformer(
    build: DiffusersBuild, source: str, model_source: str, reference: Any
) -> tuple[Any, str]:
    """The reference's transformer loaded again through the backend, on the reference's device and
    in its dtype; and the digest of what else decides the build (the gguf file's sha256, else "")."""
    from diffusers import SD3Transformer2DModel

    device = next(reference.parameters()).device
    problem = backend_problem(build.backend, device)
    if problem:
        raise InputError(problem, source=source)
    config = diffusers_config(build, reference.dtype, source)
    on_device: dict[str, Any] = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
    if build.file is not None:
        with tempfile.TemporaryDirectory() as folder:
            reference.save_config(Path(folder) / "transformer")  # the architecture; the file has the weights
            try:
                transformer = SD3Transformer2DModel.from_single_file(
                    build.file,
                    config=folder,
                    subfolder="transformer",
                    quantization_config=config,
                    torch_dtype=reference.dtype,
                    device=device,
                )
            except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:  # an untrusted file
                raise InputError(
                    f"diffusers_quantization.file: {build.file} cannot be loaded: {exc}", source=source
                ) from exc
        check_runs_in_inference_mode(transformer, build.backend, source)
        return transformer.eval(), file_sha256(build.file)
    folder_of_model = Path(model_source)
    if (folder_of_model / "transformer" / "config.json").is_file():
        transformer = SD3Transformer2DModel.from_pretrained(
            folder_of_model,
            subfolder="transformer",
            quantization_config=config,
            torch_dtype=reference.dtype,
            **on_device,
        )
    else:  # an in-memory reference: through a folder, as diffusers' quantizers load only from one
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            transformer = SD3Transformer2DModel.from_pretrained(
                folder, quantization_config=config, torch_dtype=reference.dtype, **on_device
            )
    check_runs_in_inference_mode(transformer, build.backend, source)
    return transformer.eval(), ""
