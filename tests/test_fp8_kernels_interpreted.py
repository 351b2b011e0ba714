"""The Triton kernels of evals/models/fp8_kernels.py on a CPU, in Triton's interpreter: indexing, masks,
strides and arithmetic are checked in CI too, not only on a GPU (tests/kernel_checks.py says what
the interpreter's FP8 rounding changes). The GELU variant is GPU-only: it uses the GPU's tanh
instruction, which the interpreter cannot run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

# Odd sizes: rows and channels that fill no block exactly, so the masks matter.
CHECKS = {
    "quantize_rows": "check_quantize_rows('cpu', exact=False, rows=37, cols=300, gelu=False)",
    "norm_quantize": "check_norm_quantize('cpu', exact=False, batch=2, tokens=23, channels=200)",
    "quantize_heads": "check_quantize_heads('cpu', exact=False, tokens=30)",
}


def interpreted(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh Python with Triton's interpreter on (it is chosen when kernels are defined)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if "wrap_triton only works on functions annotated" in done.stderr:
        pytest.skip("this torch's wrap_triton refuses interpreted kernels (torch 2.11 did; 2.14 takes them)")
    return done


@pytest.mark.parametrize("kernel", list(CHECKS))
def test_kernel_matches_the_torch_code_in_the_interpreter(kernel: str) -> None:
    done = interpreted(f"from tests.kernel_checks import *\n{CHECKS[kernel]}\n")
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_wrong_kernel_fails_the_check() -> None:
    """The check can fail: the row kernel with its bias dropped is caught."""
    code = (
        "from evals.models import fp8_kernels\n"
        "real = fp8_kernels.quantize_rows\n"
        "fp8_kernels.quantize_rows = lambda x, dtype, bias, gelu: real(x, dtype, None, gelu)\n"
        "from tests.kernel_checks import check_quantize_rows\n"
        "check_quantize_rows('cpu', exact=False, rows=37, cols=300, gelu=False)\n"
    )
    done = interpreted(code)
    assert done.returncode != 0 and "AssertionError" in done.stderr
