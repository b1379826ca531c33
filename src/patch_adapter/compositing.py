"""Compositing a fill into the picture (pure functions over arrays).

The one promise this module keeps for the whole package: pixels outside the mask
are returned unchanged, to the bit. `composite` copies the original and writes only
where the mask is set. The masks themselves (boxes, dilation, feathering) are
`masks.py`'s; the conversions between integer and float pixels are `image_io`'s.
"""

from __future__ import annotations

import numpy as np

from .image_io import from_float, to_float


def with_opaque_alpha(fill: np.ndarray, channels: int) -> np.ndarray:
    """`fill` (h, w, 3) with an opaque alpha channel appended when the image has one (channels 4).

    The alpha rule: outside the mask alpha is the input's, bit for bit; inside it the fill is
    opaque (blended like the colour where feathered). Keeping a transparent alpha there would
    hide the fill, and when the mask *is* the alpha (transparent = fill) nothing would show.
    """
    if channels == fill.shape[2]:
        return fill
    return np.concatenate([fill, np.ones_like(fill[..., :1])], axis=2)


def composite(
    original: np.ndarray,
    fill: np.ndarray,
    mask: np.ndarray,
    alpha: np.ndarray | None = None,
    offset: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Write `fill` into a copy of `original` inside `mask`; everything else is untouched.

    original: (H, W, C) uint8/uint16. fill: (h, w, C) float in [0, 1], placed at
    `offset` (top, left); mask/alpha: (h, w) for that same window. Returns a new array.
    """
    return composite_into(original.copy(), fill, mask, alpha, offset)


def composite_into(
    out: np.ndarray,
    fill: np.ndarray,
    mask: np.ndarray,
    alpha: np.ndarray | None = None,
    offset: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """`composite` in place: several fills into one copy of a large image."""
    top, left = offset
    h, w = mask.shape
    window = out[top : top + h, left : left + w]
    if alpha is None:
        alpha = mask.astype(np.float32)
    blended = alpha[..., None] * fill + (1 - alpha[..., None]) * to_float(window)
    window[mask] = from_float(blended, out.dtype)[mask]
    return out
