"""Masks and compositing (pure functions over arrays and tensors).

The one promise this module keeps for the whole package: pixels outside the mask
are returned unchanged, to the bit. `composite` copies the original and writes only
where the mask is set.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the set pixels, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0]: rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _coverage_bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input ranges [start, end) that area interpolation averages for each output cell."""
    i = np.arange(out)
    return (i * length) // out, -((-(i + 1) * length) // out)


def resize_mask_any(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to (height, width) so that no masked pixel is lost.

    docs/method.md stage 1: area interpolation, then any coverage > 0 counts as masked.
    Works on the mask's bounding box only, so a small mask on a 16K image is cheap.
    """
    height, width = mask.shape
    out_h, out_w = size
    result = np.zeros((out_h, out_w), dtype=bool)
    box = mask_bbox(mask)
    if box is None:
        return result
    top, left, bottom, right = box
    r0, r1 = _coverage_bins(height, out_h)
    c0, c1 = _coverage_bins(width, out_w)
    rows = np.flatnonzero((r1 > top) & (r0 < bottom))
    cols = np.flatnonzero((c1 > left) & (c0 < right))
    # cumulative sums over the box make each cell's count O(1)
    sub = mask[top:bottom, left:right].astype(np.int32)
    csum = np.zeros((sub.shape[0] + 1, sub.shape[1] + 1), dtype=np.int64)
    csum[1:, 1:] = sub.cumsum(0).cumsum(1)
    rs = np.clip(r0[rows] - top, 0, sub.shape[0]); re = np.clip(r1[rows] - top, 0, sub.shape[0])
    cs = np.clip(c0[cols] - left, 0, sub.shape[1]); ce = np.clip(c1[cols] - left, 0, sub.shape[1])
    counts = (csum[re][:, ce] - csum[rs][:, ce] - csum[re][:, cs] + csum[rs][:, cs])
    result[np.ix_(rows, cols)] = counts > 0
    return result


def latent_mask(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """A latent is masked if any of its factor x factor pixels is (edges padded)."""
    height, width = mask.shape
    lat_h, lat_w = -(-height // factor), -(-width // factor)
    padded = np.zeros((lat_h * factor, lat_w * factor), dtype=bool)
    padded[:height, :width] = mask
    return padded.reshape(lat_h, factor, lat_w, factor).any(axis=(1, 3))


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a bool mask by `radius` pixels (square structuring element)."""
    if radius <= 0:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0).numpy()


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weights in [0, 1] that are 0 outside the mask and ramp up inside it.

    Feathering happens inside the mask only: the border of the fill fades into the
    original, and nothing outside the mask changes.
    """
    if feather <= 0:
        return mask.astype(np.float32)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    # distance-like ramp: erode by feather, then box-blur back out by feather
    eroded = -F.max_pool2d(-t, 2 * feather + 1, stride=1, padding=feather)
    blurred = F.avg_pool2d(eroded, 2 * feather + 1, stride=1, padding=feather, count_include_pad=False)
    alpha = blurred[0, 0].numpy()
    return np.where(mask, alpha, 0.0).astype(np.float32)


def feather_alpha_at(mask: np.ndarray, box: tuple[int, int, int, int], feather: int) -> np.ndarray:
    """`feather_alpha` of the full-image `mask`, evaluated in `box` (top, left, bottom, right) only.

    The box is widened by 2 x feather for the computation, so a box cut tight around
    the mask still sees the unmasked pixels beyond it; the image border is no edge.
    """
    top, left, bottom, right = box
    height, width = mask.shape
    t, l = max(0, top - 2 * feather), max(0, left - 2 * feather)
    b, r = min(height, bottom + 2 * feather), min(width, right + 2 * feather)
    alpha = feather_alpha(mask[t:b, l:r], feather)
    return alpha[top - t: bottom - t, left - l: right - l]


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 -> float32 in [0, 1]."""
    return pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)


def from_unit_float(x: np.ndarray, dtype) -> np.ndarray:
    """float in [0, 1] -> uint8/uint16 (round half to even, clipped)."""
    top = np.iinfo(dtype).max
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * top), 0, top).astype(dtype)


def with_opaque_alpha(fill: np.ndarray, channels: int) -> np.ndarray:
    """`fill` (h, w, 3) with an opaque alpha channel appended when the image has one (channels 4).

    The alpha rule: outside the mask alpha is the input's, bit for bit; inside it the fill is
    opaque (blended like the colour where feathered). Keeping a transparent alpha there would
    hide the fill, and when the mask *is* the alpha (transparent = fill) nothing would show.
    """
    if channels == fill.shape[2]:
        return fill
    return np.concatenate([fill, np.ones_like(fill[..., :1])], axis=2)


def composite(original: np.ndarray, fill: np.ndarray, mask: np.ndarray, alpha: np.ndarray | None = None,
              offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Write `fill` into a copy of `original` inside `mask`; everything else is untouched.

    original: (H, W, C) uint8/uint16. fill: (h, w, C) float in [0, 1], placed at
    `offset` (top, left); mask/alpha: (h, w) for that same window. Returns a new array.
    """
    return composite_into(original.copy(), fill, mask, alpha, offset)


def composite_into(out: np.ndarray, fill: np.ndarray, mask: np.ndarray, alpha: np.ndarray | None = None,
                   offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """`composite` in place: several fills into one copy of a large image."""
    top, left = offset
    h, w = mask.shape
    window = out[top: top + h, left: left + w]
    if alpha is None:
        alpha = mask.astype(np.float32)
    blended = alpha[..., None] * fill + (1 - alpha[..., None]) * to_unit_float(window)
    window[mask] = from_unit_float(blended, out.dtype)[mask]
    return out
