"""The reference cache: reference images, content-addressed, so a second run generates candidates only.

The key hashes everything that can change a reference image: the model fingerprint, the reference
dtype, the generation settings, the prompt and seed, the batch the sample was generated in (output
moves slightly with batch composition), the torch and diffusers versions, the device kind, and the
detectors and thresholds whose findings the entry stores.
Each entry is `<key>.png` (the 8-bit image) plus `<key>.json` (detector findings made on the float
image, which the PNG can no longer show, and the generation time). A suite that scores step error
also keeps the sample's trajectory at its recorded steps: `<key>.steps-<steps>.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evals.rundir import load_png, save_png, write_json
from evals.suite_types import Generation, Sample

CACHE_ENV = "EVALS_CACHE_DIR"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sd35-fp8-gate" / "reference"


def reference_key(
    *,
    fingerprint: str,
    dtype: str,
    generation: Generation,
    sample: Sample,
    batch: list[Sample],
    environment: dict[str, Any],
    detectors: dict[str, Any],
) -> str:
    payload = {
        "model": fingerprint,
        "dtype": dtype,
        "generation": asdict(generation),
        "prompt": sample.case.prompt,
        "seed": sample.seed,
        "batch": [(s.case.prompt, s.seed) for s in batch],
        "position": batch.index(sample),
        "torch": environment["torch"],
        "diffusers": environment["diffusers"],
        "device": environment["device_kind"],
        "detectors": detectors,  # the entry stores findings made with these
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ReferenceCache:
    def __init__(self, root: Path):
        self.root = root

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.png", folder / f"{key}.json"

    def png_path(self, key: str) -> Path:
        """Where the entry's PNG is (or would be): a run copies it rather than encoding it again."""
        return self._paths(key)[0]

    def get(self, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        png, meta = self._paths(key)
        if not (png.is_file() and meta.is_file()):
            return None
        try:
            return load_png(png), json.loads(meta.read_text())
        except (OSError, ValueError):
            return None  # a damaged entry is regenerated, not trusted

    def put(self, key: str, image_u8: np.ndarray, meta: dict[str, Any]) -> None:
        png, meta_path = self._paths(key)
        save_png(png, image_u8)
        write_json(meta_path, meta)  # written last: an entry counts only once both files exist

    def _steps_path(self, key: str, steps: tuple[int, ...]) -> Path:
        return self.root / key[:2] / f"{key}.steps-{'-'.join(map(str, steps))}.safetensors"

    def get_steps(self, key: str, steps: tuple[int, ...]) -> tuple[dict[str, Any], str] | None:
        """A sample's trajectory tensors at `steps` (evals.step_error) and the dtype its inputs were
        passed in, or None when the entry has none (or a damaged one)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = self._steps_path(key, steps)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                dtype = (f.metadata() or {}).get("input_dtype", "float32")
            return load_file(str(path)), dtype
        except (OSError, SafetensorError, ValueError):
            return None

    def put_steps(self, key: str, steps: tuple[int, ...], tensors: dict[str, Any], input_dtype: str) -> None:
        from safetensors.torch import save_file

        path = self._steps_path(key, steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"input_dtype": input_dtype})
        os.replace(tmp, path)  # a reader never sees half a file
