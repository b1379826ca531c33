"""Procedural scenes with known truth, renderable at any size.

A `Scene` is a description, not a picture. Object geometry is in normalised
coordinates; the background's fine texture (1-2 px lines, dots, grain) is defined in
pixels of the scene's full-resolution size `Scene.width` x `Scene.height`. Rendered at
that size the texture is crisp; rendered smaller, every pixel is (about) the area
average of the full-resolution pixels it covers, so the texture fades into its mean
tint. A downscaled render is what a 1K backbone sees of a 4K picture; the full-size
render says what detail a fill should have.

Colour design, which the detector relies on: backgrounds are low-chroma tints and all
texture is achromatic (the same value added to R, G and B); objects are flat,
high-chroma colours. So "how much object is in this pixel" is a linear function of
its chroma vector, whatever the texture does.

Lines run diagonally (the grid's two sets with coprime periods) and dots sit at
random spots, never along rows or columns: any horizontal or vertical line through
the picture (a box-mask edge, a tile border) crosses the texture at all phases, so
seam and sharpness statistics measured along such lines do not depend on where the
line happens to fall.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 125, 20),
    "yellow": (235, 210, 25),
    "green": (30, 170, 60),
    "blue": (40, 85, 215),
    "purple": (145, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
BACKGROUND_TINTS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (196, 184, 160),
    "slate": (104, 118, 140),
    "sage": (138, 156, 130),
}
TEXTURES: dict[str, str] = {"stripes": "striped", "grid": "gridded", "dots": "dotted", "grain": "grainy"}
"""Texture name -> the adjective captions use for it."""

GRAMMAR_WORDS: tuple[str, ...] = ("a", "an", "and", "on", "background")
VOCABULARY: tuple[str, ...] = tuple(
    sorted(set(GRAMMAR_WORDS) | set(OBJECT_COLOURS) | set(SHAPES) | set(BACKGROUND_TINTS) | set(TEXTURES.values()))
)
"""Every word a caption or prompt of this module can contain (no punctuation, lower case)."""


@dataclass(frozen=True)
class Background:
    """A tinted background with one fine texture, in full-resolution pixels."""

    tint: str  # a BACKGROUND_TINTS name
    texture: str  # a TEXTURES name
    period: int  # lines: spacing along x+y (grid: x-y lines one more); dots: cell side; pixels
    line_width: int  # line width along x+y, or dot side, in pixels (1 or 2)
    direction: int  # stripes: +1 lines follow x+y = const, -1 they follow x-y = const
    contrast: float  # grey levels a line or dot adds (sign: lighter/darker); grain: its std
    gradient: tuple[float, float]  # grey levels added from the left to the right edge, top to bottom
    sensor_grain: float  # std of per-pixel noise over the whole picture, objects included
    seed: int  # texture phase and noise


@dataclass(frozen=True)
class SceneObject:
    """A flat-coloured shape filling a square box; geometry is resolution independent."""

    shape: str  # a SHAPES name
    colour: str  # an OBJECT_COLOURS name
    x: float  # centre, share of the width
    y: float  # centre, share of the height
    size: float  # side of the bounding square, share of the shorter image side


@dataclass(frozen=True)
class Scene:
    """Objects (painted in order, never overlapping) on a background, at a full-resolution size."""

    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...] = ()


# --- shapes -------------------------------------------------------------------------


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _fill_unit_box(vertices: np.ndarray) -> np.ndarray:
    """Stretch a polygon so its bounding box is exactly [-1, 1]^2 (every shape fills its box)."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - low) / (high - low) * 2 - 1


_ARM = 0.34  # half-width of the cross's arms, share of its half-side
SHAPE_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float),
    "triangle": np.array([[0, -1], [1, 1], [-1, 1]], dtype=float),
    "diamond": np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=float),
    "star": _fill_unit_box(_star()),
    "cross": np.array(
        [
            [-_ARM, -1],
            [_ARM, -1],
            [_ARM, -_ARM],
            [1, -_ARM],
            [1, _ARM],
            [_ARM, _ARM],
            [_ARM, 1],
            [-_ARM, 1],
            [-_ARM, _ARM],
            [-1, _ARM],
            [-1, -_ARM],
            [-_ARM, -_ARM],
        ],
        dtype=float,
    ),
}
"""Outlines in unit-box coordinates (x right, y down, box [-1, 1]^2); the circle is analytic."""


def segment_distance(xs: np.ndarray, ys: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance from points (broadcastable xs, ys) to the segment a-b."""
    ex, ey = b[0] - a[0], b[1] - a[1]
    wx, wy = xs - a[0], ys - a[1]
    length2 = ex * ex + ey * ey
    t = np.clip((wx * ex + wy * ey) / length2, 0, 1) if length2 > 0 else 0.0
    return np.sqrt((wx - ex * t) ** 2 + (wy - ey * t) ** 2)


def polygon_signed_distance(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside): nearest edge, even-odd sign.

    xs is (1, w) and ys (h, 1); the crossing test depends on ys only, so it stays cheap.
    """
    nearest = None
    inside = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), dtype=bool)
    for (ax, ay), (bx, by) in zip(vertices.tolist(), np.roll(vertices, 1, axis=0).tolist(), strict=True):
        d = segment_distance(xs, ys, (ax, ay), (bx, by))
        nearest = d if nearest is None else np.minimum(nearest, d)
        if ay != by:
            crosses = (ay > ys) != (by > ys)
            x_at = ax + (ys - ay) * (bx - ax) / (by - ay)
            inside ^= crosses & (xs < x_at)
    return np.where(inside, -nearest, nearest)


def shape_signed_distance(shape: str, xs: np.ndarray, ys: np.ndarray, half: float) -> np.ndarray:
    """Signed distance in pixels to `shape` centred at (0, 0) with half-side `half` pixels."""
    if shape == "circle":
        return np.sqrt(xs * xs + ys * ys) - half
    if shape not in SHAPE_POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return polygon_signed_distance(xs, ys, SHAPE_POLYGONS[shape] * half)


def object_box(obj: SceneObject, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the object's bounding square in pixels of a width x height render."""
    half = obj.size * min(width, height) / 2
    cx, cy = obj.x * width, obj.y * height
    return cx - half, cy - half, cx + half, cy + half


BLOCK = 16  # side of the blocks that `banded_signed_distance` classifies as a whole


def banded_signed_distance(shape: str, xs: np.ndarray, ys: np.ndarray, half: float, band: float) -> np.ndarray:
    """Signed distance over the grid xs (1, w) x ys (h, 1), exact only within `band` of the outline.

    Distances are 1-Lipschitz, so a BLOCK x BLOCK block whose centre lies farther than
    band + its half-diagonal from the outline is all inside or all outside: it gets the
    centre's value (right sign, magnitude beyond `band`). Only blocks along the outline
    are computed pixel by pixel, which makes big objects at 4K cheap.
    """
    height, width = ys.shape[0], xs.shape[1]
    if height * width <= 16 * BLOCK * BLOCK:
        return shape_signed_distance(shape, xs, ys, half)
    rows, cols = -(-height // BLOCK), -(-width // BLOCK)
    step = xs[0, 1] - xs[0, 0] if width > 1 else 1.0
    centre_x = xs[0, 0] + (np.arange(cols) * BLOCK + (BLOCK - 1) / 2) * step
    centre_y = ys[0, 0] + (np.arange(rows) * BLOCK + (BLOCK - 1) / 2) * step
    coarse = shape_signed_distance(shape, centre_x[None, :], centre_y[:, None], half)
    near = np.abs(coarse) <= band + (BLOCK - 1) / np.sqrt(2) * step + 1e-3
    out = np.repeat(np.repeat(coarse.astype(np.float32), BLOCK, axis=0), BLOCK, axis=1)[:height, :width]
    block_r, block_c = np.nonzero(near)
    offsets = np.arange(BLOCK)
    r = (block_r[:, None, None] * BLOCK + offsets[None, :, None]).repeat(BLOCK, axis=2)
    c = (block_c[:, None, None] * BLOCK + offsets[None, None, :]).repeat(BLOCK, axis=1)
    valid = (r < height) & (c < width)
    r, c = r[valid], c[valid]
    out[r, c] = shape_signed_distance(shape, xs[0, c], ys[r, 0], half)
    return out


def object_signed_distance(
    obj: SceneObject, width: int, height: int, margin: float = 1.0
) -> tuple[np.ndarray, tuple[int, int]]:
    """Signed distance (pixels) to the object over its box grown by `margin`, clipped to the image.

    Exact within margin + 1 pixels of the outline (what coverage and grown masks read);
    farther away only the sign and "farther than that" hold. Returns (distances (h, w)
    float32, (top, left) of that window) so a small object on a huge canvas costs only
    its own area.
    """
    left, top, right, bottom = object_box(obj, width, height)
    y0, x0 = max(0, int(np.floor(top - margin - 1))), max(0, int(np.floor(left - margin - 1)))
    y1, x1 = min(height, int(np.ceil(bottom + margin + 1))), min(width, int(np.ceil(right + margin + 1)))
    if y1 <= y0 or x1 <= x0:
        return np.zeros((max(0, y1 - y0), max(0, x1 - x0)), dtype=np.float32), (y0, x0)
    half = obj.size * min(width, height) / 2
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5 - obj.x * width).astype(np.float32)[None, :]
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5 - obj.y * height).astype(np.float32)[:, None]
    return banded_signed_distance(obj.shape, xs, ys, half, band=margin + 1).astype(np.float32), (y0, x0)


def coverage_from_distance(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage: a one-pixel linear ramp centred on the outline."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def object_coverage(obj: SceneObject, width: int, height: int) -> tuple[np.ndarray, tuple[int, int]]:
    """How much of each pixel the object covers, over a window around it: ((h, w), (top, left))."""
    distance, corner = object_signed_distance(obj, width, height)
    return coverage_from_distance(distance), corner


# --- background ---------------------------------------------------------------------


def hash_uniform(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) float32 per integer lattice point (a, b): a stateless integer hash.

    Stateless, so any window of the full-resolution grid renders on its own, identically.
    """
    a = np.asarray(a).astype(np.int64).astype(np.uint32)
    b = np.asarray(b).astype(np.int64).astype(np.uint32)
    h = (a * np.uint32(0x9E3779B1)) ^ (b * np.uint32(0x85EBCA77)) ^ np.uint32(seed * 0x27D4EB2F & 0xFFFFFFFF)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    h = h ^ (h >> np.uint32(16))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1 / (1 << 24))


def _line_integral2(t: np.ndarray, period: float, width: float) -> np.ndarray:
    """Second antiderivative of the pulse train 1[t mod period < width], zero at t = 0.

    With it, the average of the train over a pixel's footprint along a diagonal is a
    four-term difference (exact area averaging, at any render scale).
    """
    n = np.floor(t / period)
    r = t - n * period
    whole = width * period * n * (n - 1) / 2 + n * (width * period - width * width / 2)
    part = np.where(r < width, r * r / 2, width * width / 2 + width * (r - width))
    return whole + n * width * r + part


def diagonal_line_coverage(
    rows: np.ndarray,
    cols: np.ndarray,
    scale: tuple[float, float],
    period: float,
    width: float,
    phase: float,
    direction: int,
    offset: float,
) -> np.ndarray:
    """Share of each output pixel covered by diagonal lines of the full-resolution texture.

    Output pixel (row, col) covers full-resolution [col*sx, (col+1)*sx) x [row*sy, (row+1)*sy).
    Lines are where (x + direction*y - phase) mod period < width; `offset` keeps the
    argument positive. The x-y box of a pixel projects onto u = x +- y as a trapezoid,
    whose average is a four-term difference of the second antiderivative.
    """
    sx, sy = scale
    if direction > 0:
        u = cols * sx + rows * sy
    else:
        u = cols * sx - (rows + 1) * sy
    u = u - phase + offset
    corners = (u + sx + sy, u + sx, u + sy, u)
    f = [_line_integral2(t, period, width) for t in corners]
    return (f[0] - f[1] - f[2] + f[3]) / (sx * sy)


def _diagonal_lines(
    height: int,
    width: int,
    scale: tuple[float, float],
    period: int,
    line_width: int,
    seed: int,
    direction: int,
    full_height: int,
) -> np.ndarray:
    """(H, W) float32 line coverage; at equal x/y scale a lookup along the diagonal index."""
    phase = float(seed % period)
    offset = float(period * (full_height // period + 2))
    args = (scale, float(period), float(line_width), phase, direction, offset)
    if scale[0] == scale[1]:  # the value depends on col +- row only: 1-D, then gather
        k = np.arange(height + width - 1, dtype=np.float64)
        if direction > 0:
            values = diagonal_line_coverage(np.zeros(1), k, *args)
            index = np.add.outer(np.arange(height, dtype=np.int32), np.arange(width, dtype=np.int32))
        else:
            values = diagonal_line_coverage(np.zeros(1), k - (height - 1), *args)
            index = np.add.outer(np.arange(height - 1, -1, -1, dtype=np.int32), np.arange(width, dtype=np.int32))
        return values.astype(np.float32)[index]
    out = np.empty((height, width), dtype=np.float32)
    cols = np.arange(width, dtype=np.float64)[None, :]
    for start in range(0, height, 256):
        rows = np.arange(start, min(height, start + 256), dtype=np.float64)[:, None]
        out[start : start + rows.shape[0]] = diagonal_line_coverage(rows, cols, *args)
    return out


def _pixel_footprints(height: int, width: int, full: tuple[int, int]) -> tuple[float, float, float]:
    """(sx, sy, n): full-resolution pixels per output pixel along x and y, and per output pixel."""
    sx, sy = full[1] / width, full[0] / height
    return sx, sy, sx * sy


def _full_resolution_index(count: int, scale: float) -> np.ndarray:
    """The full-resolution pixel under each output pixel's centre."""
    return np.floor((np.arange(count) + 0.5) * scale).astype(np.int64)


def pixel_noise(height: int, width: int, full: tuple[int, int], seed: int) -> np.ndarray:
    """Zero-mean, unit-std noise of the full-resolution pixels, as seen at height x width.

    At full resolution (or above) each output pixel shows its full-resolution pixel's
    value; below it, fresh noise with the std of an average of n pixels, 1/sqrt(n)
    (the exact average would need the full-resolution render).
    """
    sx, sy, n = _pixel_footprints(height, width, full)
    if n <= 1 + 1e-9:
        rows, cols = _full_resolution_index(height, sy), _full_resolution_index(width, sx)
        return (hash_uniform(cols[None, :], rows[:, None], seed) - 0.5) * np.float32(np.sqrt(12.0))
    noise = hash_uniform(np.arange(width)[None, :], np.arange(height)[:, None], seed + 7919)
    return (noise - 0.5) * np.float32(np.sqrt(12.0 / n))


def _random_dots(height: int, width: int, full: tuple[int, int], background: Background) -> np.ndarray:
    """Coverage of w x w dots, one at a random spot in each period x period cell, minus its mean."""
    p, w = background.period, background.line_width
    density = (w * w) / (p * p)
    sx, sy, n = _pixel_footprints(height, width, full)
    if n > 1 + 1e-9:  # below full resolution: the mean plus the remaining fluctuation
        return pixel_noise(height, width, full, background.seed + 1) * np.float32(np.sqrt(density * (1 - density)))
    rows, cols = _full_resolution_index(height, sy)[:, None], _full_resolution_index(width, sx)[None, :]
    cell_r, cell_c = rows // p, cols // p
    jitter_c = np.floor(hash_uniform(cell_c, cell_r, background.seed + 2) * (p - w + 1)).astype(np.int64)
    jitter_r = np.floor(hash_uniform(cell_c, cell_r, background.seed + 3) * (p - w + 1)).astype(np.int64)
    along_c, along_r = cols - cell_c * p - jitter_c, rows - cell_r * p - jitter_r
    inside = (along_c >= 0) & (along_c < w) & (along_r >= 0) & (along_r < w)
    return inside.astype(np.float32) - np.float32(density)


def texture_values(background: Background, height: int, width: int, full: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 zero-mean grey-level offsets of the fine texture."""
    scale = _pixel_footprints(height, width, full)[:2]
    share = background.line_width / background.period
    lines = (background.line_width, background.seed)
    if background.texture == "stripes":
        pattern = _diagonal_lines(height, width, scale, background.period, *lines, background.direction, full[0])
        pattern -= np.float32(share)
    elif background.texture == "grid":
        # coprime periods: every row and column meets all joint phases of the two line sets
        a = _diagonal_lines(height, width, scale, background.period, *lines, 1, full[0])
        b = _diagonal_lines(height, width, scale, background.period + 1, *lines, -1, full[0])
        other = background.line_width / (background.period + 1)
        pattern = 1 - (1 - a) * (1 - b) - np.float32(1 - (1 - share) * (1 - other))
    elif background.texture == "dots":
        pattern = _random_dots(height, width, full, background)
    elif background.texture == "grain":
        pattern = pixel_noise(height, width, full, background.seed + 4)
    else:
        raise ValueError(f"unknown texture {background.texture!r}; expected one of {tuple(TEXTURES)}")
    return pattern * np.float32(background.contrast)


def render_background(scene: Scene, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float32 background: tint + smooth gradient + fine texture (achromatic)."""
    background = scene.background
    full = (scene.height, scene.width)
    grey = texture_values(background, height, width, full)
    gx, gy = background.gradient
    grey += ((np.arange(width, dtype=np.float32) + 0.5) / width - 0.5)[None, :] * np.float32(gx)
    grey += ((np.arange(height, dtype=np.float32) + 0.5) / height - 0.5)[:, None] * np.float32(gy)
    tint = np.asarray(BACKGROUND_TINTS[background.tint], dtype=np.float32)
    return grey[:, :, None] + tint


def render_scene(scene: Scene, width: int | None = None, height: int | None = None) -> np.ndarray:
    """The scene as (H, W, 3) uint8, by default at its full resolution.

    Any size works; the fine texture is crisp only at the full resolution. Keep the
    scene's aspect ratio: objects stay square, so another aspect moves them relative
    to the edges.
    """
    width, height = width or scene.width, height or scene.height
    canvas = render_background(scene, width, height)
    for obj in scene.objects:
        coverage, (top, left) = object_coverage(obj, width, height)
        window = canvas[top : top + coverage.shape[0], left : left + coverage.shape[1]]
        colour = np.asarray(OBJECT_COLOURS[obj.colour], dtype=np.float32)
        window += coverage[:, :, None] * (colour - window)
    grain = pixel_noise(height, width, (scene.height, scene.width), scene.background.seed + 5)
    canvas += (grain * np.float32(scene.background.sensor_grain))[:, :, None]  # achromatic, like the texture
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# --- words and truth ----------------------------------------------------------------


def object_phrase(obj: SceneObject) -> str:
    """'a red triangle', 'an orange star'."""
    article = "an" if obj.colour[0] in "aeiou" else "a"
    return f"{article} {obj.colour} {obj.shape}"


def background_phrase(background: Background) -> str:
    """'a grey striped background' (also the prompt of a removal)."""
    return f"a {background.tint} {TEXTURES[background.texture]} background"


def scene_caption(scene: Scene) -> str:
    """'a red triangle and a blue circle on a grey striped background', objects left to right."""
    objects = sorted(scene.objects, key=lambda o: (o.x, o.y))
    if not objects:
        return background_phrase(scene.background)
    return " and ".join(object_phrase(o) for o in objects) + " on " + background_phrase(scene.background)


def object_truth(obj: SceneObject, width: int, height: int) -> dict:
    """The object as JSON-ready data, with its RGB, phrase and box in pixels of a width x height render."""
    record = dataclasses.asdict(obj)
    record.update(
        rgb=list(OBJECT_COLOURS[obj.colour]),
        phrase=object_phrase(obj),
        box=[round(v, 3) for v in object_box(obj, width, height)],
    )
    return record


def scene_truth(scene: Scene) -> dict:
    """Everything known about the scene, JSON-ready; boxes in full-resolution pixels."""
    background = dataclasses.asdict(scene.background)
    background.update(
        gradient=list(scene.background.gradient),
        rgb=list(BACKGROUND_TINTS[scene.background.tint]),
        adjective=TEXTURES[scene.background.texture],
    )
    return {
        "width": scene.width,
        "height": scene.height,
        "caption": scene_caption(scene),
        "background": background,
        "objects": [object_truth(obj, scene.width, scene.height) for obj in scene.objects],
    }


# --- random scenes ------------------------------------------------------------------


def random_background(rng: np.random.Generator, texture: str | None = None, tint: str | None = None) -> Background:
    """A background drawn from the fixed vocabulary; `texture`/`tint` pin those choices."""
    texture = texture or str(rng.choice(list(TEXTURES)))
    tint = tint or str(rng.choice(list(BACKGROUND_TINTS)))
    if texture not in TEXTURES or tint not in BACKGROUND_TINTS:
        raise ValueError(f"unknown texture {texture!r} or tint {tint!r}")
    period = int(rng.integers(6, 10)) if texture == "dots" else int(rng.integers(4, 8))  # dots sparser
    line_width = int(rng.integers(1, 3))
    sign = float(rng.choice([-1.0, 1.0]))
    contrast = float(rng.uniform(10, 16)) if texture == "grain" else sign * float(rng.uniform(30, 45))
    return Background(
        tint=tint,
        texture=texture,
        period=period,
        line_width=line_width,
        direction=int(rng.choice([-1, 1])),
        contrast=round(contrast, 3),
        gradient=(round(float(rng.uniform(-12, 12)), 3), round(float(rng.uniform(-12, 12)), 3)),
        sensor_grain=round(float(rng.uniform(1.5, 3.0)), 3),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def boxes_overlap(a: tuple[float, ...], b: tuple[float, ...], gap: float = 0.0) -> bool:
    """Whether two (left, top, right, bottom) boxes come closer than `gap`."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def random_object(
    rng: np.random.Generator,
    width: int,
    height: int,
    size_range: tuple[float, float],
    shape: str | None = None,
    colour: str | None = None,
) -> SceneObject:
    """A random shape and colour of a random size, fully inside the picture."""
    shape = shape or str(rng.choice(SHAPES))
    colour = colour or str(rng.choice(list(OBJECT_COLOURS)))
    size = float(rng.uniform(*size_range))
    half = size * min(width, height) / 2
    x = float(rng.uniform(half / width, 1 - half / width))
    y = float(rng.uniform(half / height, 1 - half / height))
    return SceneObject(shape=shape, colour=colour, x=round(x, 6), y=round(y, 6), size=round(size, 6))


def place_objects(
    rng: np.random.Generator,
    width: int,
    height: int,
    count: int,
    size_range: tuple[float, float] = (0.05, 0.3),
    avoid: tuple[tuple[float, float, float, float], ...] = (),
    attempts: int = 100,
) -> tuple[SceneObject, ...]:
    """Up to `count` random objects whose boxes keep a gap from each other and from `avoid`.

    Boxes are in pixels of a width x height render. Gives up on an object after
    `attempts` draws, so a crowded picture gets fewer objects, never overlapping ones.
    """
    gap = max(2.0, 0.02 * min(width, height))
    taken = list(avoid)
    placed = []
    for _ in range(count):
        for _ in range(attempts):
            candidate = random_object(rng, width, height, size_range)
            box = object_box(candidate, width, height)
            if not any(boxes_overlap(box, other, gap) for other in taken):
                placed.append(candidate)
                taken.append(box)
                break
    return tuple(placed)


def random_scene(
    seed: int,
    width: int = 1024,
    height: int = 1024,
    max_objects: int = 3,
    size_range: tuple[float, float] = (0.05, 0.3),
    texture: str | None = None,
    tint: str | None = None,
) -> Scene:
    """A scene drawn from `seed` alone: 1..max_objects non-overlapping objects on a background."""
    rng = np.random.default_rng(seed)
    background = random_background(rng, texture=texture, tint=tint)
    count = int(rng.integers(1, max_objects + 1))
    return Scene(width, height, background, place_objects(rng, width, height, count, size_range))


def with_object(scene: Scene, obj: SceneObject) -> Scene:
    """The scene with `obj` added on top."""
    return dataclasses.replace(scene, objects=scene.objects + (obj,))


def without_object(scene: Scene, index: int) -> Scene:
    """The scene with its index-th object taken out."""
    return dataclasses.replace(scene, objects=scene.objects[:index] + scene.objects[index + 1 :])
