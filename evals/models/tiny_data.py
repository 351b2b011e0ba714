"""Captioned scenes rendered procedurally, the tiny model's training data (no download, any device).

Five kinds of scene, each caption built from the attributes it was rendered with, so every word
means something a picture shows: coloured shapes placed left/right/top/bottom on plain backgrounds,
textures (fine and wide stripes, checkerboards, dots, bricks, knitted wool, grass, wood), signs whose
text is drawn with a 5x7 pixel font, landscapes (sky by time of day, ground, sun or moon) and streets
lit by a lamp. A lighting phrase ("at night", "in the dark", "by day", "in bright daylight") darkens or
lightens the whole picture. `render(n, generator)` gives n images (N, 3, 64, 64) in [-1, 1] and
their captions; the same generator state gives the same batch.
"""

from __future__ import annotations

import math

import torch

SIZE = 64

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.88, 0.12),
    "green": (0.12, 0.68, 0.18),
    "blue": (0.12, 0.28, 0.90),
    "purple": (0.52, 0.18, 0.76),
    "pink": (0.96, 0.50, 0.70),
    "brown": (0.50, 0.30, 0.10),
    "white": (0.95, 0.95, 0.95),
    "grey": (0.50, 0.50, 0.50),
    "black": (0.05, 0.05, 0.05),
}
COLOUR_NAMES = list(COLOURS)
CHROMATIC = ["red", "orange", "yellow", "green", "blue", "purple", "pink"]
SHAPES = ["circle", "square", "triangle", "ring", "cross", "diamond"]
POSITIONS = {  # name -> (cx, cy)
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
    "in the centre": (0.5, 0.5),
}
TEXTURES = ["fine vertical stripes", "fine horizontal stripes", "wide vertical stripes", "wide horizontal stripes",
            "checkerboard", "polka dots", "brick wall", "knitted wool", "grass", "wooden planks"]  # fmt: skip
WORDS = ["OPEN", "STOP", "EXIT", "SALE", "CAFE", "TAXI", "BANK", "HOTEL", "BAR", "PIZZA", "BOOKS", "2024"]
TIMES = {  # landscape sky: top colour, horizon colour
    "by day": ((0.35, 0.6, 0.95), (0.85, 0.92, 1.0)),
    "at sunrise": ((0.55, 0.55, 0.85), (0.98, 0.7, 0.45)),
    "at sunset": ((0.45, 0.2, 0.5), (0.98, 0.5, 0.15)),
    "at night": ((0.01, 0.02, 0.06), (0.05, 0.07, 0.16)),
}
GROUNDS = {
    "green hills": (0.2, 0.6, 0.2),
    "a calm lake": (0.15, 0.35, 0.7),
    "a sandy desert": (0.9, 0.78, 0.45),
    "a snowy field": (0.93, 0.95, 0.98),
    "grey mountains": (0.45, 0.45, 0.5),
}
LIGHTING = ["", "", "", ", at night", ", in the dark", ", by day", ", in bright daylight"]
KINDS = ["object", "texture", "sign", "landscape", "street"]
KIND_WEIGHTS = [0.38, 0.2, 0.16, 0.16, 0.1]

# 5x7 capitals and digits, one string of 7 rows per character ('#' = ink).
_FONT_ROWS = {
    "A": ".###.#...##...#######...##...##...#", "B": "####.#...#####.#...##...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.", "D": "####.#...##...##...##...##...#####.",
    "E": "######....####.#....#....#....#####", "F": "######....####.#....#....#....#....",
    "G": ".###.#...##....#.####...##...#.####", "H": "#...##...#######...##...##...##...#",
    "I": ".###...#....#....#....#....#...###.", "J": "..###...#....#....#....##..#..##...",
    "K": "#...##..#.#.#..##...#.#..#..#.#...#", "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##...##...##...##...#", "N": "#...###..##.#.##..###...##...##...#",
    "O": ".###.#...##...##...##...##...#.###.", "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#", "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".####.....#.....###.....#....#####.", "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.", "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.###.###...#", "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..", "Z": "#####....#...#...#...#...#....#####",
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "####.....#....#.###.....#....#####.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": ".###.#....#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#....#.###.",
}  # fmt: skip
FONT = {ch: torch.tensor([c == "#" for c in rows], dtype=torch.float32).view(7, 5) for ch, rows in _FONT_ROWS.items()}


def _pick(options: list, n: int, g: torch.Generator, weights: list[float] | None = None) -> list[int]:
    if weights is None:
        return torch.randint(len(options), (n,), generator=g).tolist()
    return torch.multinomial(torch.tensor(weights), n, replacement=True, generator=g).tolist()


def _grid(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ax = (torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5) / SIZE
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return yy, xx


def _rgb(name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(COLOURS[name], device=device).view(3, 1, 1)


def _shape_mask(shape: str, yy: torch.Tensor, xx: torch.Tensor, cx: float, cy: float, r: float) -> torch.Tensor:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    elif shape == "triangle":
        inside = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.58)
    elif shape == "ring":
        d2 = dx**2 + dy**2
        inside = (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    elif shape == "cross":
        inside = ((dx.abs() <= r * 0.28) & (dy.abs() <= r)) | ((dy.abs() <= r * 0.28) & (dx.abs() <= r))
    else:  # diamond
        inside = dx.abs() + dy.abs() <= r
    return inside.float()


def _texture(name: str, c1: torch.Tensor, c2: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, phase: float):
    px, py = xx * SIZE, yy * SIZE
    if "stripes" in name:
        coord = px if "vertical" in name else py
        period = 4.0 if "fine" in name else 12.0
        t = ((coord + phase * period) % period < period / 2).float()
    elif name == "checkerboard":
        t = (((px + phase * 16) // 8 + (py // 8)) % 2).float()
    elif name == "polka dots":
        fx, fy = (px + phase * 12) % 12 - 6, py % 12 - 6
        t = (fx**2 + fy**2 <= 9).float()
    elif name == "brick wall":
        row = py // 8
        shifted = px + (row % 2) * 8 + phase * 16
        mortar = ((py % 8) < 1.5) | ((shifted % 16) < 1.5)
        t = 1 - mortar.float()
        c1, c2 = torch.tensor(COLOURS["red"], device=xx.device).view(3, 1, 1) * 0.8, _rgb("grey", xx.device) * 1.4
        return c2 + (c1 - c2) * t
    elif name == "knitted wool":
        v = torch.sin((px % 6) / 6 * math.pi) * 0.5 + 0.5
        chevron = ((py + (px % 6 - 3).abs() * 1.5 + phase * 6) % 6) / 6
        t = (v * chevron).clamp(0, 1)
    elif name == "grass":
        blades = torch.sin(px * 2.3 + torch.sin(py * 0.7 + phase * 6) * 3) * 0.5 + 0.5
        t = blades * (0.6 + 0.4 * torch.sin(py * 1.3 + px * 0.4))
        c1, c2 = _rgb("green", xx.device), _rgb("green", xx.device) * 0.45
    else:  # wooden planks
        grain = torch.sin(py * 1.6 + torch.sin(px * 0.15 + phase * 6) * 2.5) * 0.5 + 0.5
        seams = ((px + phase * 16) % 16 < 1).float()
        t = (grain * 0.7 + 0.3) * (1 - seams)
        c1, c2 = _rgb("brown", xx.device) * 1.3, _rgb("brown", xx.device) * 0.6
    return c2 + (c1 - c2) * t


def _text(word: str, img: torch.Tensor, ink: torch.Tensor, cx: float, cy: float) -> torch.Tensor:
    scale = 2 if len(word) <= 4 else 1
    glyphs = torch.cat([torch.nn.functional.pad(FONT[ch], (0, 1)) for ch in word], dim=1)[:, :-1]
    mask = glyphs.repeat_interleave(scale, 0).repeat_interleave(scale, 1).to(img.device)
    h, w = mask.shape
    top, left = int(cy * SIZE - h / 2), int(cx * SIZE - w / 2)
    region = img[:, top : top + h, left : left + w]
    img[:, top : top + h, left : left + w] = region + (ink - region) * mask
    return img


def _scene(kind: str, attrs: dict, yy: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, str]:
    dev = xx.device
    if kind == "object":
        fg, bg, shape, pos, size = attrs["fg"], attrs["bg"], attrs["shape"], attrs["pos"], attrs["size"]
        cx, cy = POSITIONS[pos] if pos else (0.5 + attrs["jx"], 0.5 + attrs["jy"])
        r = 0.13 if size == "small" else 0.27 if size == "large" else 0.2
        mask = _shape_mask(shape, yy, xx, cx, cy, r)
        img = _rgb(bg, dev) * (1 - mask) + _rgb(fg, dev) * mask
        words = [w for w in ("a", size, fg, shape, pos) if w]
        return img, " ".join(words) + f" on a {bg} background"
    if kind == "texture":
        name, c1, c2 = attrs["texture"], attrs["fg"], attrs["bg"]
        img = _texture(name, _rgb(c1, dev), _rgb(c2, dev), yy, xx, attrs["phase"])
        if name in ("brick wall", "grass", "wooden planks"):
            return img, f"close-up of a {name} texture" if name != "grass" else "close-up of green grass"
        if name == "knitted wool":
            return img, f"close-up of a knitted {c1} wool sweater"
        return img, f"{name} in {c1} and {c2}" if "stripes" in name or name == "checkerboard" else (
            f"{c1} polka dots on {c2}")  # fmt: skip
    if kind == "sign":
        plate, word, wall = attrs["fg"], attrs["word"], attrs["bg"]
        img = _rgb(wall, dev).expand(3, SIZE, SIZE).clone()
        inside = (xx - 0.5).abs().le(0.45) & (yy - attrs["cy"]).abs().le(0.17)
        img = torch.where(inside, _rgb(plate, dev), img)
        ink = _rgb("black" if plate in ("white", "yellow", "pink", "orange") else "white", dev).view(3, 1, 1)
        return _text(word, img, ink, 0.5, attrs["cy"]), f"a {plate} shop sign that reads {word}"
    if kind == "landscape":
        time, ground = attrs["time"], attrs["ground"]
        top, horizon = (torch.tensor(c, device=dev).view(3, 1, 1) for c in TIMES[time])
        h = 0.55 + attrs["jy"] * 0.5
        sky = top + (horizon - top) * (yy / h).clamp(0, 1)
        g = torch.tensor(GROUNDS[ground], device=dev).view(3, 1, 1)
        if time == "at night":
            g = g * 0.12
        line = h + (0.06 * torch.sin(xx * 7 + attrs["phase"] * 6) if ground in ("green hills", "a snowy field") else 0)
        if ground == "grey mountains":
            line = h - 0.25 * (1 - ((xx - 0.3 - attrs["jx"]).abs() * 3).clamp(0, 1))
        below = (yy >= line).float()
        img = sky * (1 - below) + g * (0.85 + 0.15 * yy) * below
        disc = _shape_mask("circle", yy, xx, 0.25 + attrs["jx"] * 2, 0.22, 0.08) * (1 - below)
        body = _rgb("white" if time == "at night" else "yellow", dev)
        img = img * (1 - disc) + body * disc
        return img, f"{ground} {time}"
    # street: a road between dark houses, lit by one lamp at night or by day
    night = attrs["time"] == "at night"
    img = torch.where(yy > 0.6, _rgb("grey", dev) * (0.9 - yy * 0.4), _rgb("blue", dev) * 0.3 + 0.55)
    houses = (yy > 0.25 + 0.1 * ((xx * 5).floor() % 2)) & (yy <= 0.6)
    img = torch.where(houses, _rgb(attrs["bg"], dev) * 0.8, img)
    if night:
        img = img * 0.1
        lx = 0.3 + attrs["jx"] * 2
        glow = torch.exp(-((xx - lx) ** 2 + (yy - 0.35) ** 2) / 0.006)
        img = img + _rgb("yellow", dev) * glow.unsqueeze(0)
        return img, "a rainy street at night lit by a single lamp"
    return img, f"a street with {attrs['bg']} houses by day"


def _light(img: torch.Tensor, phrase: str) -> torch.Tensor:
    if "night" in phrase or "dark" in phrase:
        return img * 0.12
    if "day" in phrase:
        return img * 0.6 + 0.4
    return img


def render(n: int, generator: torch.Generator, device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[str]]:
    """n scenes (N, 3, 64, 64) in [-1, 1] and their captions."""
    device = torch.device(device)
    yy, xx = _grid(device)
    g = generator
    kinds = _pick(KINDS, n, g, KIND_WEIGHTS)
    cols = torch.randint(len(COLOUR_NAMES), (n, 2), generator=g).tolist()
    picks = {
        "shape": _pick(SHAPES, n, g),
        "pos": _pick(["", *POSITIONS], n, g),
        "size": _pick(["", "small", "large"], n, g),
        "texture": _pick(TEXTURES, n, g),
        "word": _pick(WORDS, n, g),
        "time": _pick(list(TIMES), n, g),
        "ground": _pick(list(GROUNDS), n, g),
        "light": _pick(LIGHTING, n, g),
    }
    floats = torch.rand(n, 4, generator=g).tolist()
    noise = torch.randn(n, 3, SIZE, SIZE, generator=g).to(device)
    images, captions = [], []
    for i in range(n):
        fg, bg = COLOUR_NAMES[cols[i][0]], COLOUR_NAMES[cols[i][1]]
        if fg == bg:
            bg = "white" if fg != "white" else "black"
        jx, jy, phase, cy = floats[i]
        attrs = {
            "fg": fg,
            "bg": bg,
            "shape": SHAPES[picks["shape"][i]],
            "pos": ["", *POSITIONS][picks["pos"][i]],
            "size": ["", "small", "large"][picks["size"][i]],
            "texture": TEXTURES[picks["texture"][i]],
            "word": WORDS[picks["word"][i]],
            "time": list(TIMES)[picks["time"][i]],
            "ground": list(GROUNDS)[picks["ground"][i]],
            "jx": (jx - 0.5) * 0.3,
            "jy": (jy - 0.5) * 0.3,
            "phase": phase,
            "cy": 0.35 + cy * 0.3,
        }
        kind = KINDS[kinds[i]]
        img, caption = _scene(kind, attrs, yy, xx)
        if kind in ("object", "texture", "sign"):
            phrase = LIGHTING[picks["light"][i]]
            img, caption = _light(img, phrase), caption + phrase
        img = img.expand(3, SIZE, SIZE) + noise[i] * 0.015  # a little grain, as photographs have
        images.append(img.clamp(0, 1))
        captions.append(caption)
    return torch.stack(images) * 2 - 1, captions
