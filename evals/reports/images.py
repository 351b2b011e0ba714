"""Image panels for review: reference | candidate | difference heatmap."""

from __future__ import annotations

import base64
import io

import numpy as np


def difference_heatmap(reference: np.ndarray, candidate: np.ndarray, full_scale: float = 32.0) -> np.ndarray:
    """Per-pixel largest channel difference as a colour map (black: equal; yellow: >= full_scale/255)."""
    from matplotlib import colormaps

    diff = np.abs(reference.astype(np.int16) - candidate.astype(np.int16)).max(axis=-1)
    colours = colormaps["inferno"](np.clip(diff / full_scale, 0.0, 1.0))[..., :3]
    return (colours * 255).round().astype(np.uint8)


def comparison_grid(reference: np.ndarray, candidate: np.ndarray, gap: int = 4) -> np.ndarray:
    """One HWC uint8 image: reference, candidate and their difference heatmap side by side."""
    height = reference.shape[0]
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    panels = [reference, spacer, candidate, spacer, difference_heatmap(reference, candidate)]
    return np.concatenate(panels, axis=1)


def png_data_uri(image: np.ndarray, compress_level: int = 6) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
