"""A labelled validation set for the failure detectors, built from photographs that ship with
scikit-image (no download): clean photos, dark and finely textured ones among them, and the same
photos with injected defects of known kind and strength."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Real photographs; binary graphics (horse, logo) are not photographs and are left out.
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "moon",
    "motorcycle",
    "retina",
    "rocket",
    "text",
)
# Document scans: the text lines of a page are a real periodic row pattern; measured and reported
# separately because the stripe detector cannot tell them from banding.
DOCUMENTS = ("page",)
# Bases for injected defects: plain, textured (brick, grass, gravel), dark (hubble), document (page).
DEFECT_BASES = ("astronaut", "brick", "grass", "gravel", "hubble_deep_field", "page", "coffee")


@dataclass(frozen=True)
class Labelled:
    name: str
    """Photo and defect, e.g. `brick+stripes(rows,p=8,a=4/255)`."""
    image: np.ndarray
    """Float HWC RGB on the 0..1 scale (defects may put NaN or values past 0..1 in it)."""
    defect: str | None
    """The detector that should fire, or None for a clean photo."""
    strength: str
    """The defect's strength, for recall tables."""


def photo(name: str, size: int = 256) -> np.ndarray:
    from skimage import data
    from skimage.transform import resize

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3].astype(np.float64) / 255
    side = min(image.shape[:2])  # centre square, resized: generated images are square
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return resize(image[top : top + side, left : left + side], (size, size), anti_aliasing=True)


def clean_set(size: int = 256, documents: bool = False) -> Iterator[Labelled]:
    for name in DOCUMENTS if documents else PHOTOS:
        yield Labelled(name, photo(name, size), None, "clean")
    if documents:
        return
    night = photo("astronaut", size) * 0.08  # a dark scene with a few lights
    night[size // 5 : size // 5 + 6, size // 2 : size // 2 + 30] = 0.9
    yield Labelled("night(astronaut x0.08 + lights)", night, None, "clean")


def square_wave(n: int, period: int) -> np.ndarray:
    """+1/-1 bands; an odd period gets bands of unequal height."""
    return np.where((np.arange(n) % period) < period / 2, 1.0, -1.0)


def with_stripes(image: np.ndarray, amplitude: float, period: int, axis: int) -> np.ndarray:
    wave = square_wave(image.shape[axis], period)
    shape = [1, 1, 1]
    shape[axis] = -1
    return image + amplitude * wave.reshape(shape)


def defect_set(size: int = 256) -> Iterator[Labelled]:
    rng = np.random.default_rng(0)
    for base in DEFECT_BASES:
        image = photo(base, size)
        for period in (2, 3, 4, 8, 16, 32):
            for amp in (1, 2, 4, 8):
                for axis, orient in ((0, "rows"), (1, "columns")):
                    name = f"{base}+stripes({orient},p={period},a={amp}/255)"
                    yield Labelled(
                        name, with_stripes(image, amp / 255, period, axis), "stripe_noise", f"p={period} a={amp}/255"
                    )
        checker = np.where(np.add.outer(np.arange(size), np.arange(size)) % 2 == 0, 1.0, -1.0)[..., None]
        for amp in (1, 2, 4, 8):
            yield Labelled(
                f"{base}+checkerboard(a={amp}/255)", image + amp / 255 * checker, "checkerboard", f"a={amp}/255"
            )
        for gain in (3.0, 5.0):
            yield Labelled(f"{base}+overexposed(x{gain:g})", image * gain, "saturation", f"x{gain:g}")
        for contrast in (0.1, 0.03):
            washed = image.mean() + (image - image.mean()) * contrast
            yield Labelled(f"{base}+washed-out(contrast {contrast:g})", washed, "flat", f"contrast {contrast:g}")
        for count, label in ((1, "1 pixel"), (size * size // 100, "1% of pixels")):
            broken = image.copy()
            idx = rng.integers(0, size, size=(count, 2))
            broken[idx[:, 0], idx[:, 1], rng.integers(0, 3, size=count)] = np.nan
            yield Labelled(f"{base}+NaN({label})", broken, "nonfinite", f"NaN {label}")
        inf = image.copy()
        inf[3, 5, 0] = np.inf
        yield Labelled(f"{base}+Inf(1 pixel)", inf, "nonfinite", "Inf 1 pixel")
    for level in (0, 1, 3, 6):
        noise = rng.normal(0, 1 / 255, (size, size, 3))
        yield Labelled(f"black(level {level}/255)", np.clip(level / 255 + noise, 0, 1), "black_frame", f"{level}/255")
    yield Labelled("black(NaN everywhere)", np.full((size, size, 3), np.nan), "black_frame", "all NaN")
    yield Labelled("flat(constant grey)", np.full((size, size, 3), 0.5), "flat", "constant")
