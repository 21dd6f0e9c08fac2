"""A model-free judge for the shapes language (``training.shapes``): what does a picture show?

``judge(image)`` reads, from pixels alone:

* the background: the median of the border pixels, named by the nearest background colour;
* the shape's pixels: those far from the background in RGB (the largest connected region, so that a
  speck of noise elsewhere does not count), its colour (their median, named by the nearest shape colour),
  its centre (named by thirds: left/right third first, then top/bottom, else center) and its area fraction
  (small/large);
* the shape, from simple moments of that region: solidity (area over convex-hull area), the fill ratio of
  its bounding box, the circularity of the hull (4*pi*A/P^2) and the number of its points (the peaks of the
  outline's distance from the centre: a triangle's three corners, a star's five tips, the corners of its
  convex hull), with thresholds that hold for sharp edges and for the demo model's soft ones
  (:func:`classify`).

``score(scene, verdict)`` says which of background/colour/shape/position/size were read back right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage, signal
from scipy.spatial import ConvexHull, QhullError

from training.shapes import BACKGROUNDS, COLOURS, RGB, SIZE_THRESHOLD, Scene

FloatArray = npt.NDArray[np.float64]

FIRST_PASS_DISTANCE = 60.0
"""RGB distance from the background above which a pixel is taken as shape on the first pass."""

STAR_SOLIDITY = 0.93
"""Below this solidity (area over hull area) the shape is a star; the others are convex. A drawn star is at
0.62, and still at most 0.92 when its edges are soft (the demo model's decoder draws one-cell ramps); the
convex shapes are at 0.95 or more either way."""

TRIANGLE_FILL = 0.70
"""Below this fill ratio of its bounding box a convex shape is a triangle: 0.47-0.50 drawn, 0.57-0.67 soft;
squares (turned up to 12 degrees) and circles are at 0.73 or more."""

CIRCLE_CIRCULARITY = 0.965
"""From this circularity of its hull a convex, well-filled shape is a circle (0.98-0.99 drawn or soft);
squares are at 0.79 drawn and 0.89-0.95 with soft corners."""

DRAWN_STAR_SOLIDITY = 0.62
"""The solidity of the drawn five-pointed star (inner radius half the outer: 5 R r sin 36 over the pentagon's
5/2 R^2 sin 72). A three-pointed outline at least this solid is a triangle whose sides bow in (its inner
radius is at least 0.31 of the outer; a straight-sided triangle's is 0.5, solidity 1): :func:`classify`."""

POINT_PROMINENCE = 0.03
"""A peak of the outline's radius counts as a point from this prominence, as a fraction of the mean radius:
just above the pixels' own raggedness. Drawn shapes, sharp or soft, have their points at 0.11 or more (a small
soft square's corners; a triangle's are at 0.45 or more) and no other peak from 0.03; a soft circle may show a
few (its count is never used: only a non-convex shape's is)."""

POINT_BINS = 72
"""Angular bins (5 degrees each) of the outline's radius profile, smoothed over three."""


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    background_rgb: RGB
    colour_rgb: RGB | None = None
    centre: tuple[float, float] | None = None
    area_fraction: float = 0.0
    fill_ratio: float = 0.0
    solidity: float = 0.0
    circularity: float = 0.0
    points: int = 0


def _nearest(rgb: FloatArray, palette: dict[str, RGB]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.asarray(palette[name], dtype=np.float64))))


def _as_rgb(value: FloatArray) -> RGB:
    r, g, b = (round(float(v)) for v in value)
    return (r, g, b)


def _largest_region(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    result: npt.NDArray[np.bool_] = labels == int(np.argmax(sizes))
    return result


def count_points(mask: npt.NDArray[np.bool_]) -> int:
    """The points of a region's outline: peaks of its distance from the centroid around the full turn, with
    a prominence of at least :data:`POINT_PROMINENCE` of the mean distance (a circle has none, a triangle 3,
    a square 4, a star 5)."""
    ys, xs = np.nonzero(mask)
    cy, cx = float(ys.mean()), float(xs.mean())
    outline = mask & ~ndimage.binary_erosion(mask)
    oy, ox = np.nonzero(outline)
    angle = np.arctan2(oy - cy, ox - cx)
    radius = np.hypot(oy - cy, ox - cx) + 0.5
    which = ((angle + math.pi) / (2 * math.pi) * POINT_BINS).astype(int) % POINT_BINS
    profile = np.full(POINT_BINS, np.nan)
    np.fmax.at(profile, which, radius)
    seen = ~np.isnan(profile)
    if not seen.any():
        return 0
    if not seen.all():  # a small region leaves some bins empty: fill them around the circle
        bins = np.arange(POINT_BINS)
        known = bins[seen]
        profile = np.interp(
            bins, np.concatenate([known - POINT_BINS, known, known + POINT_BINS]), np.tile(profile[seen], 3)
        )
    wrapped = np.concatenate([profile[-1:], profile, profile[:1]])
    profile = np.convolve(wrapped, np.ones(3) / 3, mode="valid")
    profile = profile / profile.mean()
    # three turns, so that a peak at the seam and its prominence are seen whole; count the middle turn's
    peaks, _ = signal.find_peaks(np.tile(profile, 3), prominence=POINT_PROMINENCE)
    return int(np.count_nonzero((peaks >= POINT_BINS) & (peaks < 2 * POINT_BINS)))


def classify(solidity: float, fill_ratio: float, circularity: float, points: int) -> str:
    """The shape from its moments: stars are not convex, except that a non-convex outline with three points
    (and at least as solid as a drawn star) is a triangle whose sides bow in; of the convex ones, triangles
    fill half their bounding box, and circles are rounder than squares. The thresholds hold for sharp and
    for soft edges (one-cell ramps, as the demo model draws); the point count decides only between a star
    and a triangle with concave sides, where a soft small star may show four of its five points but never
    three (``tests/test_shapes_judge.py``)."""
    if solidity < STAR_SOLIDITY:
        return "triangle" if points == 3 and solidity >= DRAWN_STAR_SOLIDITY else "star"
    if fill_ratio < TRIANGLE_FILL:
        return "triangle"
    if circularity < CIRCLE_CIRCULARITY:
        return "square"
    return "circle"


def position_word(x: float, y: float) -> str:
    """The position of a centre (fractions of the image) by thirds."""
    if x < 1 / 3:
        return "on the left"
    if x > 2 / 3:
        return "on the right"
    if y < 1 / 3:
        return "at the top"
    if y > 2 / 3:
        return "at the bottom"
    return "in the center"


def judge(image: Image.Image | npt.NDArray[np.generic]) -> Verdict:
    """Read background, shape colour, shape, position and size back from an RGB picture."""
    if isinstance(image, Image.Image):
        pixels: FloatArray = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        pixels = np.asarray(image, dtype=np.float64)[..., :3]
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    mask = _largest_region(distance > FIRST_PASS_DISTANCE)
    if int(mask.sum()) < 4:
        return Verdict(background, None, None, None, None, _as_rgb(background_rgb))
    colour_rgb = np.median(pixels[mask], axis=0)
    # second pass: a pixel is shape where it is at least half way from the background to the shape colour,
    # so that antialiased edges count as much as they cover
    half = 0.5 * float(np.linalg.norm(colour_rgb - background_rgb))
    second = _largest_region(distance > min(half, FIRST_PASS_DISTANCE * 2))
    if int(second.sum()) >= 4:
        mask = second
        colour_rgb = np.median(pixels[mask], axis=0)
    colour = _nearest(colour_rgb, COLOURS)

    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    cx, cy = (float(xs.mean()) + 0.5) / width, (float(ys.mean()) + 0.5) / height
    area_fraction = area / (width * height)
    bbox = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))

    points = np.column_stack([xs, ys]).astype(np.float64)
    try:
        hull = ConvexHull(points)
    except QhullError:  # degenerate (a line of pixels): no shape to name
        return Verdict(
            background,
            colour,
            None,
            position_word(cx, cy),
            None,
            _as_rgb(background_rgb),
            _as_rgb(colour_rgb),
            (cx, cy),
            area_fraction,
        )
    # the hull runs through pixel centres: grow it by half a pixel all round to compare with the pixel count
    hull_area = float(hull.volume) + 0.5 * float(hull.area) + 1.0
    hull_perimeter = float(hull.area) + 4.0
    solidity = area / hull_area
    circularity = 4 * math.pi * hull_area / hull_perimeter**2
    tips = count_points(mask)
    return Verdict(
        background=background,
        colour=colour,
        shape=classify(solidity, area / bbox, circularity, tips),
        position=position_word(cx, cy),
        size="large" if area_fraction > SIZE_THRESHOLD else "small",
        background_rgb=_as_rgb(background_rgb),
        colour_rgb=_as_rgb(colour_rgb),
        centre=(cx, cy),
        area_fraction=area_fraction,
        fill_ratio=area / bbox,
        solidity=solidity,
        circularity=circularity,
        points=tips,
    )


def score(scene: Scene, verdict: Verdict) -> dict[str, bool]:
    """Which parts of ``scene`` the verdict read back right."""
    return {
        "background": verdict.background == scene.background,
        "colour": verdict.colour == scene.colour,
        "shape": verdict.shape == scene.shape,
        "position": verdict.position == scene.position,
        "size": verdict.size == scene.size,
    }


INTERIOR_SHARE = 0.5
""":func:`interior_colour` reads the shape's pixels at least this share as far inside its outline as its innermost
one."""


def interior_colour(image: Image.Image | npt.NDArray[np.generic], verdict: Verdict) -> RGB | None:
    """The median colour of the shape's interior (None where the judge found no shape): of the shape's pixels
    as :func:`judge` finds them (at least half way from the background to the shape's colour, the largest
    region), those at least :data:`INTERIOR_SHARE` as far from its outline as the innermost one. Unlike the
    median over the whole shape (``verdict.colour_rgb``) it leaves out the soft edges, half shape and half
    background, which on a small shape pull the colour towards the background's (a small yellow shape on
    navy reads nearer the green-yellows than it is drawn); unlike the pixels farthest from the background's
    colour, it is not pulled away from the background either."""
    if verdict.colour_rgb is None:
        return None
    if isinstance(image, Image.Image):
        pixels: FloatArray = np.asarray(image.convert("RGB"), dtype=np.float64)
    else:
        pixels = np.asarray(image, dtype=np.float64)[..., :3]
    background = np.asarray(verdict.background_rgb, dtype=np.float64)
    distance = np.linalg.norm(pixels - background, axis=-1)
    half = 0.5 * float(np.linalg.norm(np.asarray(verdict.colour_rgb, dtype=np.float64) - background))
    mask = _largest_region(distance > min(half, FIRST_PASS_DISTANCE * 2))
    if int(mask.sum()) < 4:
        return verdict.colour_rgb
    inside = ndimage.distance_transform_edt(mask)
    return _as_rgb(np.median(pixels[inside >= INTERIOR_SHARE * float(inside.max())], axis=0))


def nearest_colour(rgb: RGB | FloatArray, extra: dict[str, RGB] | None = None) -> str:
    """The name of the shape colour nearest ``rgb`` (RGB distance) among the palette's (:data:`COLOURS`) and
    ``extra`` ones, e.g. ``{"chartreuse": (132, 198, 35)}``: a colour that no palette word says (a textual
    inversion's, ``training/train_embedding.py``)."""
    return _nearest(np.asarray(rgb, dtype=np.float64), {**COLOURS, **(extra or {})})
