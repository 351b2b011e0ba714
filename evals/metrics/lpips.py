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
from evals.weights import LPIPS_TRUNKS, lpips_trunk

NETS = tuple(LPIPS_TRUNKS)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict")
    return state


def build_lpips(net: str, trunk: dict[str, torch.Tensor]) -> Any:
    """`lpips.LPIPS` with the package's linear heads and the given torchvision trunk weights."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)  # random trunk, no download
    features = {k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.")}
    used = set()
    for index in range(1, model.net.N_slices + 1):
        for child_name, child in getattr(model.net, f"slice{index}").named_children():
            for param_name, param in child.named_parameters():
                key = f"{child_name}.{param_name}"
                if key not in features or features[key].shape != param.shape:
                    raise ValueError(f"trunk weights do not fit lpips net {net!r}: {key} missing or misshapen")
                with torch.no_grad():
                    param.copy_(features[key])
                used.add(key)
    if not used:
        raise ValueError(f"no trunk weights for lpips net {net!r}")
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
        self.model = (model or build_lpips(net, read_state_dict(lpips_trunk(net, weights or {})))).to(device)

    def __call__(self, candidate: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"lpips": lpips_per_image(self.model, candidate, reference)}
