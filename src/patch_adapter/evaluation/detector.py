"""A deterministic reader of the object inside a mask: its colour and its shape.

No learning: it leans on how scenes are built. Backgrounds are low-chroma tints with
achromatic texture, objects are flat high-chroma colours, so in chroma space
(a pixel minus its grey level) every background pixel of a picture sits at one point
and a pixel that is a share `a` object sits at `a` of the way to the object's colour.
That makes colour a vote among strongly coloured pixels and gives each pixel's object
coverage exactly, anti-aliased edges included. The shape is the template (each shape
rendered to fill a square) that best overlaps the coverage resampled to its bounding box.

It is meant for the procedural scenes of this package; on other pictures it still
answers, but without its guarantees.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..masks import mask_bbox
from ..tiny_world.scenes import OBJECT_COLOURS, SHAPES, coverage_from_distance, shape_signed_distance

TEMPLATE_SIZE = 32  # side of the shape templates, pixels
BACKGROUND_CHROMA = 50.0  # chroma length below which a pixel counts as background (tints reach ~26)
MIN_OBJECT_PIXELS = 8  # fewer coloured pixels than this (or than 0.2% of the mask) is "no object"


def chroma(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3) float32: each pixel minus its grey level (achromatic texture cancels)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    return pixels - pixels.mean(axis=-1, keepdims=True)


_PALETTE_NAMES = tuple(OBJECT_COLOURS)
_PALETTE_CHROMA = chroma(np.array([OBJECT_COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32))


def background_chroma(pixel_chroma: np.ndarray) -> np.ndarray:
    """(N, 3) chroma of the masked pixels -> (3,) the background's: median of the weakly coloured ones."""
    weak = pixel_chroma[np.linalg.norm(pixel_chroma, axis=-1) < BACKGROUND_CHROMA]
    if len(weak) == 0:
        return np.zeros(3, dtype=np.float32)
    return np.median(weak, axis=0).astype(np.float32)


def object_pixels(pixel_chroma: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(..., 3) chroma -> (...) bool: pixels at least half-way from the background to the weakest colour."""
    lengths = np.linalg.norm(_PALETTE_CHROMA - background, axis=-1)
    return np.linalg.norm(pixel_chroma - background, axis=-1) > 0.5 * lengths.min()


def colour_votes(pixel_chroma: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(N, 3) -> (len(OBJECT_COLOURS),) counts of pixels whose colour direction is nearest each colour.

    Only pixels at least half-way from the background to the weakest palette colour vote.
    """
    offsets = pixel_chroma - background
    directions = _PALETTE_CHROMA - background
    lengths = np.linalg.norm(directions, axis=-1)
    strong = object_pixels(pixel_chroma, background)
    if not strong.any():
        return np.zeros(len(_PALETTE_NAMES), dtype=np.int64)
    # the cosine's denominator |offset| is the same for every colour, so the argmax can skip it
    similarity = offsets[strong] @ (directions / lengths[:, None]).T
    return np.bincount(similarity.argmax(axis=1), minlength=len(_PALETTE_NAMES))


def colour_coverage(pixel_chroma: np.ndarray, background: np.ndarray, colour: str) -> np.ndarray:
    """Share of each pixel that is `colour`: projection of its chroma on the background-to-colour segment."""
    direction = _PALETTE_CHROMA[_PALETTE_NAMES.index(colour)] - background
    share = ((pixel_chroma - background) @ direction) / float(direction @ direction)
    return np.clip(share, 0.0, 1.0)


@lru_cache(maxsize=None)
def shape_template(shape: str, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """(size, size) anti-aliased coverage of `shape` filling the whole square."""
    centres = np.arange(size, dtype=np.float32) + 0.5 - size / 2
    distance = shape_signed_distance(shape, centres[None, :], centres[:, None], size / 2)
    return coverage_from_distance(distance).astype(np.float32)


def area_weights(length: int, size: int) -> np.ndarray:
    """(size, length) matrix that area-averages `length` cells into `size` (up or down)."""
    edges = np.linspace(0, length, size + 1)
    cells = np.arange(length)
    overlap = np.minimum(cells[None, :] + 1, edges[1:, None]) - np.maximum(cells[None, :], edges[:-1, None])
    weights = np.clip(overlap, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def shape_scores(coverage: np.ndarray) -> dict[str, float]:
    """Soft IoU of the coverage, resampled to its bounding box, with every shape's template.

    The bounding box is that of the pixels at least half covered; empty coverage scores 0.
    """
    box = mask_bbox(coverage >= 0.5)
    if box is None:
        return {shape: 0.0 for shape in SHAPES}
    top, left, bottom, right = box
    crop = coverage[top:bottom, left:right]
    fitted = area_weights(crop.shape[0], TEMPLATE_SIZE) @ crop @ area_weights(crop.shape[1], TEMPLATE_SIZE).T
    scores = {}
    for shape in SHAPES:
        template = shape_template(shape)
        scores[shape] = float(np.minimum(fitted, template).sum() / np.maximum(fitted, template).sum())
    return scores


def masked_window(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """What the readers look at: (mask, chroma, background chroma) over the mask's bounding box; None if empty."""
    box = mask_bbox(mask)
    if box is None:
        return None
    top, left, bottom, right = box
    window = (slice(top, bottom), slice(left, right))
    inside = mask[window]
    window_chroma = chroma(image[window])
    return inside, window_chroma, background_chroma(window_chroma[inside])


SMALLEST_PIECE = 0.1
"""A coloured piece counts as an object when it has at least this share of the largest piece's pixels."""


def count_objects(image: np.ndarray, mask: np.ndarray) -> int:
    """How many separate objects are drawn inside `mask`: the structure check (truth: 1 for an insert).

    Strongly coloured pixels (of any object colour) in the mask, grouped by
    8-connectivity; pieces smaller than SMALLEST_PIECE of the largest, or than
    MIN_OBJECT_PIXELS, are specks and not counted. A duplicated object counts 2, one
    broken in two pieces too, and an empty fill 0.
    """
    import cv2

    window = masked_window(image, mask)
    if window is None:
        return 0
    inside, window_chroma, background = window
    coloured = object_pixels(window_chroma, background) & inside
    if coloured.sum() < MIN_OBJECT_PIXELS:
        return 0
    _, _, stats, _ = cv2.connectedComponentsWithStats(coloured.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    smallest = max(MIN_OBJECT_PIXELS, SMALLEST_PIECE * areas.max())
    return int((areas >= smallest).sum())


def detect_object(image: np.ndarray, mask: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the object inside `mask`, or (None, None) where there is none.

    image: (H, W, 3) uint8; mask: (H, W) bool. Only the mask's bounding box is read.
    """
    window = masked_window(image, mask)
    if window is None:
        return None, None
    inside, window_chroma, background = window
    votes = colour_votes(window_chroma[inside], background)
    if votes.max() < max(MIN_OBJECT_PIXELS, 0.002 * inside.sum()):
        return None, None
    colour = _PALETTE_NAMES[int(votes.argmax())]
    coverage = np.where(inside, colour_coverage(window_chroma, background, colour), 0.0)
    scores = shape_scores(coverage)
    return colour, max(scores, key=scores.get)
