"""A small synthetic visual language for the demo model: one coloured shape on a plain background.

Everything is pure numpy + Pillow and deterministic from a seed:

* ``Scene`` (shape, colour, background, position, size) and ``caption(scene)``, e.g.
  ``"a small red star on the left on a blue background"``;
* ``render(scene, size, rng)``: the picture, drawn at 4x and box-downsampled so that edges are
  antialiased; ``rng`` adds a little jitter (place, area, turn) that never changes what the caption says;
* ``all_combinations()``, ``held_out_combinations(seed, n)`` and ``training_combinations(seed, n)``:
  a fixed split of every caption combination into training and held-out, with no overlap;
* ``scenes(seed, count)``: training scenes drawn from a seed.

Shapes are scaled to a fixed *area* (not a fixed radius), so that the size word is read back from the
area fraction whatever the shape. ``training.judge`` reads all of it back from pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Shape colours: red, orange and yellow sit far apart in hue and in RGB (>= 110 apart).
COLOURS: dict[str, RGB] = {
    "red": (220, 20, 30),
    "orange": (255, 130, 0),
    "yellow": (245, 235, 30),
    "green": (20, 160, 40),
    "blue": (25, 60, 225),
    "purple": (130, 30, 190),
    "pink": (255, 120, 200),
    "black": (15, 15, 15),
}

BACKGROUNDS: dict[str, RGB] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "navy": (15, 25, 80),
    "beige": (235, 220, 180),
    "sky blue": (140, 200, 245),
    "dark green": (20, 75, 40),
}

POSITIONS: dict[str, tuple[float, float]] = {
    # centre (x, y) as fractions of the image; the judge reads positions by thirds
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}

SIZES: dict[str, float] = {
    # area of the shape as a fraction of the image (before jitter of +-10 %)
    "small": 0.018,
    "large": 0.05,
}
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])
"""Area fraction between small and large (their geometric mean)."""

MIN_CONTRAST = 150.0
"""Smallest RGB distance between a shape colour and its background; closer pairs are never drawn."""

STAR_INNER = 0.5
"""Inner radius of the five-pointed star as a fraction of its outer radius."""

_SUPERSAMPLE = 4
_POSITION_JITTER = 0.03
_AREA_JITTER = 0.10
_TURN_JITTER_DEG = 12.0


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")


def caption(scene: Scene) -> str:
    """``"a small red star on the left on a blue background"``."""
    return f"a {scene.size} {scene.colour} {scene.shape} {scene.position} on a {scene.background} background"


def rgb_distance(a: RGB, b: RGB) -> float:
    return float(math.dist(a, b))


def drawable(colour: str, background: str) -> bool:
    """Whether a shape of this colour stands out enough on this background to be drawn and read back."""
    return rgb_distance(COLOURS[colour], BACKGROUNDS[background]) >= MIN_CONTRAST


def all_combinations() -> list[Scene]:
    """Every drawable caption combination, in a fixed order."""
    return [
        Scene(shape, colour, background, position, size)
        for shape in SHAPES
        for colour in COLOURS
        for background in BACKGROUNDS
        if drawable(colour, background)
        for position in POSITIONS
        for size in SIZES
    ]


def _split(seed: int, n: int) -> tuple[list[Scene], list[Scene]]:
    combos = all_combinations()
    if not 0 < n < len(combos):
        raise ValueError(f"n must be between 1 and {len(combos) - 1}")
    order = np.random.default_rng(seed).permutation(len(combos))
    held = sorted(int(i) for i in order[:n])
    held_set = set(held)
    return [combos[i] for i in held], [c for i, c in enumerate(combos) if i not in held_set]


def held_out_combinations(seed: int, n: int = 60) -> list[Scene]:
    """``n`` combinations kept out of training, chosen deterministically from ``seed``."""
    return _split(seed, n)[0]


def training_combinations(seed: int, n: int = 60) -> list[Scene]:
    """Every combination not in ``held_out_combinations(seed, n)``."""
    return _split(seed, n)[1]


def scenes(seed: int, count: int, held_out_seed: int = 0, held_out: int = 60) -> list[Scene]:
    """``count`` training scenes drawn (with replacement) from seed; never a held-out combination."""
    pool = training_combinations(held_out_seed, held_out)
    picks = np.random.default_rng(seed).integers(0, len(pool), size=count)
    return [pool[int(i)] for i in picks]


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """The outline on a unit circumradius, pointing up (y grows downwards), for polygons."""
    if shape == "square":
        return [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    if shape == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            r = 1.0 if k % 2 == 0 else STAR_INNER
            points.append((r * math.cos(a), r * math.sin(a)))
        return points
    raise ValueError(f"no outline for {shape!r}")


def _unit_area(shape: str) -> float:
    if shape == "circle":
        return math.pi
    pts = _unit_outline(shape)
    twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))
    return abs(twice) / 2


def render(scene: Scene, size: int = 1024, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size``x``size`` RGB image; ``rng`` jitters place, area and turn (None: none)."""
    cx, cy = POSITIONS[scene.position]
    area = SIZES[scene.size]
    turn = 0.0
    if rng is not None:
        cx += float(rng.uniform(-_POSITION_JITTER, _POSITION_JITTER))
        cy += float(rng.uniform(-_POSITION_JITTER, _POSITION_JITTER))
        area *= float(rng.uniform(1 - _AREA_JITTER, 1 + _AREA_JITTER))
        if scene.shape != "circle":
            turn = math.radians(float(rng.uniform(-_TURN_JITTER_DEG, _TURN_JITTER_DEG)))
    big = size * _SUPERSAMPLE
    radius = math.sqrt(area / _unit_area(scene.shape)) * big
    centre_x, centre_y = cx * big, cy * big
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=fill)
    else:
        cos_t, sin_t = math.cos(turn), math.sin(turn)
        outline = [
            (centre_x + radius * (x * cos_t - y * sin_t), centre_y + radius * (x * sin_t + y * cos_t))
            for x, y in _unit_outline(scene.shape)
        ]
        draw.polygon(outline, fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)
