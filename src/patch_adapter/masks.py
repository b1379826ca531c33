"""Mask helpers: the one place that says how a mask is boxed, grown, reduced, resized and feathered.

Inference, training, evaluation and the web app all ask these questions; answering them
once keeps "masked" meaning the same thing everywhere (docs/method.md). Masks are (H, W)
bool arrays, True = fill; the tensor helper takes (B, 1, H, W) float masks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]
"""(top, left, bottom, right), bottom and right exclusive."""


def mask_bbox(mask: np.ndarray) -> Box | None:
    """The bounding box of the set pixels, or None for an empty mask.

    Why a box: most work (resizing, dilation, metrics) only needs the mask's box, so a
    small mask on a 16K picture stays cheap.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def grow_box(box: Box, reach: int, shape: tuple[int, int]) -> Box:
    """`box` widened by `reach` px on every side, clipped to a picture of `shape` (height, width)."""
    top, left, bottom, right = box
    height, width = shape
    return max(0, top - reach), max(0, left - reach), min(height, bottom + reach), min(width, right + reach)


def _dilate_rows(mask: np.ndarray, radius: int) -> np.ndarray:
    """1-D dilation along axis 1 by counting set pixels in each window (cumulative sums: O(N))."""
    height, width = mask.shape
    csum = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=csum[:, 1:])
    idx = np.arange(width)
    hi = np.minimum(idx + radius + 1, width)
    lo = np.maximum(idx - radius, 0)
    return (csum[:, hi] - csum[:, lo]) > 0


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a bool mask by `radius` px with a square (Chebyshev) structuring element.

    Separable and linear in the pixel count, whatever the radius, so growing a 4K mask by
    64 px costs as much as by 1 px. Nothing beyond the picture's edge counts as set.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask
    return _dilate_rows(_dilate_rows(mask, radius).T, radius).T


def latent_mask(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """Reduce a pixel mask to a grid of factor x factor cells: a cell is set if any of its pixels is.

    The latent grid's rule (a latent under any masked pixel is regenerated, so no masked
    pixel is left to the original), also the web page's coarse mask grid. Partial cells at
    the right and bottom edge count like full ones.
    """
    mask = np.asarray(mask, dtype=bool)
    if factor == 1:
        return mask
    height, width = mask.shape
    grid_h, grid_w = -(-height // factor), -(-width // factor)
    padded = np.zeros((grid_h * factor, grid_w * factor), dtype=bool)
    padded[:height, :width] = mask
    return padded.reshape(grid_h, factor, grid_w, factor).any(axis=(1, 3))


def latent_mask_tensor(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """`latent_mask` for a (B, 1, H, W) float tensor (1 = fill): max pooling, partial edge cells included."""
    return F.max_pool2d(mask, factor, ceil_mode=True)


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
    rs = np.clip(r0[rows] - top, 0, sub.shape[0])
    re = np.clip(r1[rows] - top, 0, sub.shape[0])
    cs = np.clip(c0[cols] - left, 0, sub.shape[1])
    ce = np.clip(c1[cols] - left, 0, sub.shape[1])
    counts = csum[re][:, ce] - csum[rs][:, ce] - csum[re][:, cs] + csum[rs][:, cs]
    result[np.ix_(rows, cols)] = counts > 0
    return result


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


def feather_alpha_at(mask: np.ndarray, box: Box, feather: int) -> np.ndarray:
    """`feather_alpha` of the full-image `mask`, evaluated in `box` (top, left, bottom, right) only.

    The box is widened by 2 x feather for the computation, so a box cut tight around
    the mask still sees the unmasked pixels beyond it; the image border is no edge.
    """
    top, left, bottom, right = box
    wide_top, wide_left, wide_bottom, wide_right = grow_box(box, 2 * feather, mask.shape)
    alpha = feather_alpha(mask[wide_top:wide_bottom, wide_left:wide_right], feather)
    return alpha[top - wide_top : bottom - wide_top, left - wide_left : right - wide_left]
