"""Does the real FP8 GEMM (torch._scaled_mm) compute what the emulated path computes?

For linear layers with SD3.5-Large shapes (random weights, bf16 activations, 2 images of 1024x1024
worth of tokens), prints for each weight-scale / activation mode the relative error of scaled_mm
against the emulated path, and of both against the unquantized bf16 layer.

    python benchmarks/fp8_matches_emulated.py [--tokens 8192] [--json OUT.json]

Needs a GPU with FP8 GEMMs (compute capability 8.9+); on the CPU it runs PyTorch's CPU kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.models.fp8 import Fp8Linear, Fp8Spec, resolve_backend

# (out, in) of SD3.5-Large's main linear layers: attention q/k/v/out, MLP up/down, adaLN modulation.
SHAPES = {
    "attn.to_q": (2432, 2432),
    "ff.net.0.proj": (9728, 2432),
    "ff.net.2": (2432, 9728),
    "norm1.linear": (14592, 2432),
}
MODES = [
    ("per_channel", "dynamic_per_token"),
    ("per_channel", "dynamic_per_tensor"),
    ("per_tensor", "dynamic_per_tensor"),
    ("per_tensor", "static"),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="rows of the activation matrix")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    results = []
    print(f"device: {name}, torch {torch.__version__}, tokens {args.tokens}")
    print(
        f"{'layer':16} {'weights':12} {'activations':19} {'sm vs emulated':>15} {'sm vs bf16':>11} {'em vs bf16':>11}"
    )
    for layer_name, (out_f, in_f) in SHAPES.items():
        linear = torch.nn.Linear(in_f, out_f, device=device, dtype=torch.bfloat16)
        torch.nn.init.normal_(linear.weight, std=in_f**-0.5)
        x = torch.randn(args.tokens, in_f, device=device, dtype=torch.bfloat16)
        exact = linear(x)
        for weights, activations in MODES:
            spec = Fp8Spec(weights=weights, activations=activations)
            backend = resolve_backend(spec, (out_f, in_f), device, torch.bfloat16)
            if backend != "scaled_mm":
                print(f"scaled_mm does not run here ({backend}); nothing to compare")
                return 1
            amax = float(x.abs().amax()) if activations == "static" else None
            real = Fp8Linear.from_linear(linear, spec, "scaled_mm", amax)(x)
            emulated = Fp8Linear.from_linear(linear, spec, "emulated", amax)(x)
            row = {
                "layer": layer_name,
                "shape": [out_f, in_f],
                "weights": weights,
                "activations": activations,
                "scaled_mm_vs_emulated": rel(real, emulated),
                "scaled_mm_vs_bf16": rel(real, exact),
                "emulated_vs_bf16": rel(emulated, exact),
            }
            results.append(row)
            print(
                f"{layer_name:16} {weights:12} {activations:19} {row['scaled_mm_vs_emulated']:15.2e} "
                f"{row['scaled_mm_vs_bf16']:11.2e} {row['emulated_vs_bf16']:11.2e}"
            )
    worst = max(r["scaled_mm_vs_emulated"] for r in results)
    print(f"worst scaled_mm vs emulated relative error: {worst:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
