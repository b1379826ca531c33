"""Random training masks: brush strokes, boxes, large areas, borders and objects.

Each kind is a small pure function ``(rng, height, width) -> (H, W) bool`` (True =
fill) driven only by the `np.random.Generator` it is given, so a mask is a
function of its seed. `random_mask` draws the kind from a configurable mix.

The kinds follow what inpainting models are trained with (LaMa's and SD-inpainting's
generators) and what docs/method.md asks for: brush strokes, boxes, large areas (over half
the image), border masks (outpainting) and object-shaped masks (the dataset's own
object masks where it has them).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..masks import dilate_mask
from .config import MASK_KINDS


def brush_strokes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1-4 free-form strokes: polylines of random direction with round joints."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    side = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        thickness = int(rng.integers(max(2, side // 30), max(3, side // 8) + 1))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        angle = float(rng.uniform(0, 2 * np.pi))
        points = [(x, y)]
        for _ in range(int(rng.integers(2, 9))):
            angle += float(rng.uniform(-1.2, 1.2))
            length = float(rng.uniform(side / 10, side / 3))
            x = float(np.clip(x + length * np.cos(angle), 0, width - 1))
            y = float(np.clip(y + length * np.sin(angle), 0, height - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=thickness)
        r = thickness / 2
        for px, py in points:
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return np.asarray(canvas) > 0


def random_boxes(rng: np.random.Generator, height: int, width: int, largest: float) -> np.ndarray:
    """1-3 axis-aligned rectangles, each side 10% to `largest` of the image's."""
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        h = max(1, int(height * rng.uniform(0.1, largest)))
        w = max(1, int(width * rng.uniform(0.1, largest)))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        mask[top : top + h, left : left + w] = True
    return mask


def boxes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1-3 axis-aligned rectangles of 10-50% of each side."""
    return random_boxes(rng, height, width, largest=0.5)


def large_area(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """More than half of the image, never all of it: a big rectangle, a big blob, or all but a few boxes.

    A blob that falls short is joined with a big rectangle; should the blob cover
    everything, the rectangle alone is used (it always leaves a strip).
    """
    choice = int(rng.integers(0, 3))
    if choice == 1:
        mask = blob(rng, height, width, scale=rng.uniform(0.9, 1.2))
        rectangle = _large_rectangle(rng, height, width)
        if mask.mean() <= 0.5:
            mask = mask | rectangle
        return rectangle if mask.all() else mask
    if choice == 2:
        return ~random_boxes(rng, height, width, largest=0.35)  # 1-3 kept boxes of at most 35% x 35%: under 37%
    return _large_rectangle(rng, height, width)


def _large_rectangle(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A rectangle of 55-90% of the image at a random place; it never covers all of it."""
    area = rng.uniform(0.55, 0.9)
    aspect = rng.uniform(0.6, 1.6)
    h = min(height, int(np.ceil(height * np.sqrt(area * aspect))))
    w = min(width, int(np.ceil(width * area * height / h)))
    if h == height and w == width:  # tiny images: rounding up filled it
        w -= 1
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + h, left : left + w] = True
    return mask


def border(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Outpainting: keep an inner rectangle, fill 1-4 of the borders around it (10-40% each)."""
    mask = np.zeros((height, width), dtype=bool)
    sides = rng.permutation(4)[: int(rng.integers(1, 5))]
    for side in sides:
        if side in (0, 1):
            n = max(1, int(height * rng.uniform(0.1, 0.4)))
            if side == 0:
                mask[:n] = True
            else:
                mask[-n:] = True
        else:
            n = max(1, int(width * rng.uniform(0.1, 0.4)))
            if side == 2:
                mask[:, :n] = True
            else:
                mask[:, -n:] = True
    return mask


def blob(rng: np.random.Generator, height: int, width: int, scale: float = 0.5) -> np.ndarray:
    """An object-shaped mask: a smooth random star-shaped polygon around a random centre.

    `scale` is its mean radius as a share of the shorter side.
    """
    side = min(height, width)
    cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
    n = 24
    harmonics = rng.normal(0, 0.15, size=(3, 2))  # low-frequency wobble of the outline
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = 1 + sum(a * np.cos((k + 2) * angles) + b * np.sin((k + 2) * angles) for k, (a, b) in enumerate(harmonics))
    radius = np.clip(radius, 0.4, 1.6) * scale * side * rng.uniform(0.4, 1.0)
    points = [
        (float(cx + r * np.cos(t) * rng.uniform(0.8, 1.25)), float(cy + r * np.sin(t)))
        for r, t in zip(radius, angles, strict=True)
    ]
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 0


def object_mask(rng: np.random.Generator, height: int, width: int, objects: list | None = None) -> np.ndarray:
    """One of the dataset's object masks (dilated a little, as SD-inpainting does), else a blob."""
    if objects:
        chosen = objects[int(rng.integers(0, len(objects)))]
        mask = np.asarray(chosen, dtype=bool)
        if mask.shape != (height, width):
            mask = (
                np.asarray(
                    Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
                )
                > 0
            )
        radius = int(rng.integers(0, max(1, min(height, width) // 32) + 1))
        mask = dilate_mask(mask, radius)
        if mask.any():
            return mask
    return blob(rng, height, width, scale=rng.uniform(0.15, 0.45))


GENERATORS = {"brush": brush_strokes, "box": boxes, "large": large_area, "border": border}


def random_mask(
    rng: np.random.Generator, height: int, width: int, mix: dict | None = None, objects: list | None = None
) -> tuple[np.ndarray, str]:
    """A mask of a kind drawn from `mix` ({kind: weight}); returns (mask, kind).

    Never empty and never the whole image (a fill needs some context to train on):
    such draws fall back to a box.
    """
    from .config import default_mask_mix

    mix = mix or default_mask_mix()
    kinds = [k for k in MASK_KINDS if float(mix.get(k, 0)) > 0]
    weights = np.array([float(mix[k]) for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind == "object":
        mask = object_mask(rng, height, width, objects)
    else:
        mask = GENERATORS[kind](rng, height, width)
    if not mask.any() or mask.all():
        mask = boxes(rng, height, width)
    return mask, kind
