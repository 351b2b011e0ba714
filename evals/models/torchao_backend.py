"""`backend: torchao` in a precision policy: the layers its rules pick are quantized by torchao's
`quantize_` with the config that matches their format, weights and activations (fp8_spec's
TORCHAO_RECIPES), so that a torchao build is judged by the same rules, suites and gates as this
project's engine, in the same run.

torchao is an optional dependency (`pip install sd35-fp8-gate[torchao]`); a policy that names it
where it is not installed, or a float8 dynamic recipe off a GPU of compute capability 8.9+, is an
InputError that says what is missing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

import torch

from evals.models.fp8_spec import TORCHAO_RECIPES, Fp8Spec

INSTALL_HINT = "pip install 'sd35-fp8-gate[torchao]' (or pip install torchao)"


def torchao_problem(spec: Fp8Spec, device: torch.device) -> str | None:
    """Why torchao cannot run `spec` on `device` here (None when it can)."""
    if (spec.format, spec.weights, spec.activations) not in TORCHAO_RECIPES:
        return f"torchao has no recipe for {spec.format}/{spec.weights}/{spec.activations}"
    if importlib.util.find_spec("torchao") is None:
        return f"backend: torchao needs the torchao package, which is not installed: {INSTALL_HINT}"
    float8_dynamic = spec.format != "int8" and spec.activations != "none"
    if float8_dynamic and device.type != "meta":
        capable = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
        if not capable:
            return (
                f"torchao's float8 dynamic recipes need a CUDA GPU of compute capability 8.9+ (Ada, Hopper), "
                f"not {device}; its float8 weight-only and int8 recipes run anywhere"
            )
    return None


def torchao_config(spec: Fp8Spec) -> Any:
    """The torchao config object of a layer's settings (fp8_spec.TORCHAO_RECIPES says which)."""
    import torchao.quantization as recipes

    class_name, granularity = TORCHAO_RECIPES[(spec.format, spec.weights, spec.activations)]
    # torchao would otherwise change inductor's global settings, and with them how this project's own
    # compiled candidates in the same process are built.
    options: dict[str, Any] = {"set_inductor_config": False}
    if granularity is not None:
        options["granularity"] = getattr(recipes, granularity)()
    return getattr(recipes, class_name)(**options)


def quantize_layers(module: Any, layers: Iterable[tuple[str, Fp8Spec]]) -> None:
    """Quantize the named linear layers of `module` in place with torchao, one `quantize_` call per
    recipe (a filter keeps every other layer as it is)."""
    from torchao.quantization import quantize_

    groups: dict[Fp8Spec, set[str]] = {}
    for name, spec in layers:
        groups.setdefault(spec, set()).add(name)
    for spec, names in groups.items():
        quantize_(module, torchao_config(spec), filter_fn=lambda _m, fqn, names=names: fqn in names)
