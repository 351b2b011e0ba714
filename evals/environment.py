"""What a run ran on: versions, device, threads, and the commit of the code; recorded in run.json,
the reference cache's keys and MLflow."""

from __future__ import annotations

import platform
import subprocess
from typing import Any


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        env["device_name"] = torch.cuda.get_device_name(index)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        env["device_kind"] = f"cuda:{env['device_name']}"
    else:
        env["device_kind"] = f"cpu:{platform.machine()}"
    return env


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
