"""LPIPS per image through the `lpips` package, its ImageNet trunk loaded from a local file.

The linear heads ship inside the package; the trunk (torchvision's AlexNet, VGG16 or SqueezeNet
1.1) is found by `evals.weights.lpips_trunk` and never downloaded here. `.pth` trunks are read with
`torch.load(weights_only=True)`, which restores tensors only and runs no code; `.safetensors` works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from evals.metrics import METRICS, MetricInfo
from evals.models.yamlspec import InputError
from evals.weights import LPIPS_TRUNKS, lpips_trunk
from evals.weights import read_state_dict as _read_weights

NETS = tuple(LPIPS_TRUNKS)
TRUNK_NAMES = {"alex": "AlexNet", "vgg": "VGG16", "squeeze": "SqueezeNet 1.1"}


def expected_trunk(net: str) -> str:
    weights = f"torchvision's ImageNet {TRUNK_NAMES.get(net, net)} weights"
    return f"{weights} ({LPIPS_TRUNKS.get(net, '?')}) for lpips net {net!r}"


def read_state_dict(path: Path, net: str = "alex") -> dict[str, torch.Tensor]:
    """The trunk's tensors; a damaged or hostile file is an InputError naming it (never runs code)."""
    return _read_weights(path, expected_trunk(net))


def build_lpips(net: str, trunk: dict[str, torch.Tensor], source: str = "trunk weights") -> Any:
    """`lpips.LPIPS` with the package's linear heads and the given torchvision trunk weights; weights
    that do not fit (`source` names where they came from) are an InputError."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)  # random trunk, no download
    features = {k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.")}
    for index in range(1, model.net.N_slices + 1):
        for child_name, child in getattr(model.net, f"slice{index}").named_children():
            for param_name, param in child.named_parameters():
                key = f"{child_name}.{param_name}"
                given = features.get(key)
                if given is None:
                    raise InputError(f"{source}: no features.{key}; expected {expected_trunk(net)}")
                if given.shape != param.shape or not given.dtype.is_floating_point or given.element_size() < 2:
                    raise InputError(
                        f"{source}: features.{key} is {str(given.dtype).removeprefix('torch.')} of shape "
                        f"{tuple(given.shape)}, expected float of shape {tuple(param.shape)} ({expected_trunk(net)})"
                    )
                with torch.no_grad():
                    param.copy_(given)
    return model.eval()


def lpips_per_image(model: Any, candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """LPIPS of each pair (float NCHW in [0, 1]; the network wants [-1, 1])."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        distance = model(candidate.to(device) * 2 - 1, reference.to(device) * 2 - 1)
    return distance.flatten().float().cpu()


class LPIPS:
    info: ClassVar[MetricInfo] = METRICS["lpips"]

    def __init__(
        self, device: str = "cpu", weights: dict[str, str] | None = None, net: str = "alex", model: Any = None
    ):
        if net not in NETS:
            raise ValueError(f"lpips net {net!r}: expected one of {', '.join(NETS)}")
        self.net = net
        if model is None:
            path = lpips_trunk(net, weights or {})
            model = build_lpips(net, read_state_dict(path, net), source=f"lpips weights {path}")
        self.model = model.to(device)

    def __call__(self, candidate: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"lpips": lpips_per_image(self.model, candidate, reference)}
