"""Quality metrics that need no model: fidelity, seams, sharpness, and what changed outside.

All take (H, W, 3) arrays (uint8, or float in the units of `data_range`) and an
(H, W) bool mask (True = filled). Definitions, so numbers can be compared:

- `psnr_in_mask`, `ssim_in_mask`: against a truth image, over the masked pixels only.
  SSIM is Wang et al. (2004): 11x11 gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  computed per channel on the mask's bounding box (plus the window's reach) and
  averaged over masked pixels and channels.
- `seam_strength`, `tile_seam_strength`: for every 4-neighbour pair straddling the
  boundary, the change across it at a scale of 3 px (|mean of a 5x3 block on one side
  - mean of the block on the other side|, channel mean), divided by the mean of the
  same quantity over same-direction pairs in a ring around the fill (outside the mask,
  8 to 64 px from it; strong edges such as object outlines left out, a floor of 0.25
  grey levels), then averaged over the boundary. 1.0: the boundary changes as much as
  the untouched picture around it does, i.e. it is invisible; 2-3 and up: a visible
  step. The block means let a steady step (tone or colour) stand out of 1-px grain; a
  fill whose fine texture is merely shifted reads as ~1 (its sharpness and SSIM tell
  that story). A tile border that runs along an object's edge counts that edge, so
  compare with the value the truth image gets on the same borders.
- `sharpness_ratio`: mean squared Laplacian of the grey image inside the mask
  (pixels whose 3x3 neighbourhood is all masked) over the same in a ring around it
  (unmasked pixels within `ring` pixels, 3x3 neighbourhood all unmasked). 1.0: the
  fill is as detailed as its surroundings; a blur by sigma ~1 px gives well below 0.5.
- `outside_change`: how many pixels outside the mask differ at all, and by how much.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..masks import dilate_mask, grow_box, mask_bbox


def _as_float(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def mask_window(mask: np.ndarray, reach: int = 0) -> tuple[slice, slice] | None:
    """Slices of the mask's bounding box grown by `reach` (clipped to the picture); None if empty."""
    box = mask_bbox(mask)
    if box is None:
        return None
    top, left, bottom, right = grow_box(box, reach, mask.shape)
    return slice(top, bottom), slice(left, right)


# --- fidelity ------------------------------------------------------------------------


def psnr_in_mask(result: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB over the masked pixels (all channels); inf where they are identical."""
    if not mask.any():
        raise ValueError("empty mask")
    error = _as_float(result)[mask] - _as_float(truth)[mask]
    mse = float(np.mean(error * error))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range * data_range / mse))


def gaussian_kernel(sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Normalised 1-D gaussian taps, 2 * radius + 1 long (SSIM's 11-tap window by default)."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def gaussian_filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable filtering of (H, W, ...) along H and W, edges mirrored (reflect, like scipy's)."""
    radius = len(kernel) // 2
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode="symmetric")
    height, width = image.shape[:2]
    rows = sum(w * padded[i : i + height] for i, w in enumerate(kernel))
    return sum(w * rows[:, i : i + width] for i, w in enumerate(kernel))


def ssim_radius(sigma: float) -> int:
    """Half-width of the SSIM window: 5 (11 taps) at the standard sigma 1.5."""
    return int(3.5 * sigma + 0.5)


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel, per-channel SSIM of two float images (Wang et al. 2004, gaussian window)."""
    kernel = gaussian_kernel(sigma, radius=ssim_radius(sigma))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = gaussian_filter(x, kernel), gaussian_filter(y, kernel)
    var_x = gaussian_filter(x * x, kernel) - mu_x * mu_x
    var_y = gaussian_filter(y * y, kernel) - mu_y * mu_y
    cov = gaussian_filter(x * y, kernel) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def ssim_in_mask(
    result: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float = 255.0, sigma: float = 1.5
) -> float:
    """Mean SSIM over the masked pixels and channels; 1.0 for identical pixels.

    Computed on the mask's bounding box grown by the window's reach, so the windows of
    masked pixels near the box edge see real neighbours, not mirrored ones.
    """
    window = mask_window(mask, reach=ssim_radius(sigma))
    if window is None:
        raise ValueError("empty mask")
    x, y = _as_float(result[window]), _as_float(truth[window])
    if np.array_equal(x, y):
        return 1.0
    values = ssim_map(x, y, data_range, sigma)
    return float(values[mask[window]].mean())


# --- seams ---------------------------------------------------------------------------


def box_sums(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sums over every height x width window of a 2-D array, indexed by the window's top-left corner."""
    table = np.zeros((array.shape[0] + 1, array.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = array.cumsum(axis=0).cumsum(axis=1)
    return table[height:, width:] - table[:-height, width:] - table[height:, :-width] + table[:-height, :-width]


def block_differences(image: np.ndarray, scale: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Change across every neighbour pair, seen at `scale` pixels: ((H, W-1), (H-1, W)).

    For the pair (x, x+1) of a row: |mean of the block on the left - mean of the block
    on the right|, each block `scale` pixels deep and 2 * scale - 1 long, centred on the
    pair's row; likewise for vertical pairs. Averaged over channels; the picture's edge
    pixels repeat beyond it. scale = 1 is the plain neighbour difference. Averaging
    along and across the line lets a steady step (a seam) stand out of pixel noise.
    """
    k = scale
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    across_x = np.zeros((height, width - 1))
    across_y = np.zeros((height - 1, width))
    for c in range(channels):
        padded = np.pad(pixels[:, :, c], k, mode="edge")
        tall = box_sums(padded, 2 * k - 1, k) / (k * (2 * k - 1))  # block at rows i.., cols j..
        across_x += np.abs(tall[1 : height + 1, 1:width] - tall[1 : height + 1, k + 1 : k + width])
        wide = box_sums(padded, k, 2 * k - 1) / (k * (2 * k - 1))
        across_y += np.abs(wide[1:height, 1 : width + 1] - wide[k + 1 : k + height, 1 : width + 1])
    return across_x / channels, across_y / channels


def mask_border_pairs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour pairs with one pixel in and one out of the mask: ((H, W-1), (H-1, W)) bool."""
    return mask[:, 1:] != mask[:, :-1], mask[1:, :] != mask[:-1, :]


def tile_border_pairs(
    shape: tuple[int, int],
    rows: tuple[int, ...] | list[int],
    cols: tuple[int, ...] | list[int],
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour pairs straddling tile borders, restricted to pairs with both pixels in `mask` if given.

    A border at row r lies between pixel rows r - 1 and r (a tile starting or ending
    there); likewise for columns. Borders at 0 or at the picture's edge are ignored.
    """
    height, width = shape
    across_x = np.zeros((height, width - 1), dtype=bool)
    across_y = np.zeros((height - 1, width), dtype=bool)
    for c in cols:
        if 0 < c < width:
            across_x[:, c - 1] = True
    for r in rows:
        if 0 < r < height:
            across_y[r - 1, :] = True
    if mask is not None:
        across_x &= mask[:, 1:] & mask[:, :-1]
        across_y &= mask[1:, :] & mask[:-1, :]
    return across_x, across_y


def box_count(binary: np.ndarray, radius: int) -> np.ndarray:
    """Number of set pixels in the (2 * radius + 1)^2 square around each pixel (zeros beyond the edge)."""
    size = 2 * radius + 1
    return box_sums(np.pad(binary.astype(np.float64), radius), size, size)


def pair_pixels(across_x: np.ndarray, across_y: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels that belong to any of the given pairs."""
    pixels = np.zeros((across_x.shape[0], across_y.shape[1]), dtype=bool)
    pixels[:, 1:] |= across_x
    pixels[:, :-1] |= across_x
    pixels[1:, :] |= across_y
    pixels[:-1, :] |= across_y
    return pixels


FLOOR = 0.25  # grey levels (of 255): the least natural change a seam is compared with, so flat pictures work
EDGE_FACTOR = 4.0  # reference changes above this many times their 90th percentile are edges, not texture


def natural_change(changes: np.ndarray, floor: float) -> float:
    """Mean of the reference changes, strong edges (> EDGE_FACTOR x 90th percentile) left out.

    An object edge near the fill would otherwise raise the reference and make the fill's
    border look calmer than it is; texture, heavy-tailed or not, stays in.
    """
    if changes.size == 0:
        return floor
    typical = changes[changes <= EDGE_FACTOR * np.quantile(changes, 0.9)]
    return max(float(typical.mean()) if typical.size else 0.0, floor)


def boundary_strength(
    image: np.ndarray,
    across_x: np.ndarray,
    across_y: np.ndarray,
    reference: np.ndarray,
    scale: int = 3,
    floor: float = FLOOR,
) -> float:
    """Mean over boundary pairs of their change / the natural change of reference pairs of the same direction.

    Changes are `block_differences` at `scale`. `reference` is an (H, W) bool map of
    pixels whose pairs (both pixels in it) show the picture's natural changes (see
    `natural_change`); `floor` keeps a flat reference from dividing by ~0. NaN without
    boundary pairs.
    """
    diff_x, diff_y = block_differences(image, scale)
    ref_x, ref_y = reference[:, 1:] & reference[:, :-1], reference[1:, :] & reference[:-1, :]
    total, count = 0.0, 0
    for diff, boundary, ref in ((diff_x, across_x, ref_x), (diff_y, across_y, ref_y)):
        if boundary.any():
            natural = natural_change(diff[ref] if ref.any() else diff.ravel(), floor)
            total += float(diff[boundary].sum()) / natural
            count += int(boundary.sum())
    return total / count if count else float("nan")


def seam_strength(
    image: np.ndarray, mask: np.ndarray, scale: int = 3, margin: int = 8, context: int = 64, data_range: float = 255.0
) -> float:
    """Strength of the mask's border in `image`: 1.0 = as strong as the picture's natural changes nearby.

    Reference: pairs in the ring outside the mask from `margin` to `context` pixels
    away (only that window is read, so a small mask on a huge picture is cheap).
    NaN for an empty or full mask (no border).
    """
    window = mask_window(mask, reach=context + scale + 1)
    if window is None:
        return float("nan")
    inside = mask[window]
    across_x, across_y = mask_border_pairs(inside)
    reference = dilate_mask(inside, context) & ~dilate_mask(inside, margin)
    return boundary_strength(image[window], across_x, across_y, reference, scale, floor=FLOOR * data_range / 255.0)


def tile_seam_strength(
    image: np.ndarray,
    rows: tuple[int, ...] | list[int],
    cols: tuple[int, ...] | list[int],
    mask: np.ndarray | None = None,
    scale: int = 3,
    margin: int = 8,
    context: int = 64,
    data_range: float = 255.0,
) -> float:
    """Strength of tile borders (pixel rows/columns where tiles start or end) inside the fill.

    With a mask, only border pairs with both pixels masked count, and the reference is
    the ring around the mask of `seam_strength`; without one, the whole picture more
    than `margin` pixels from a border. NaN where no border crosses the mask.
    """
    across_x, across_y = tile_border_pairs(image.shape[:2], rows, cols, mask)
    if mask is None:
        reference = ~dilate_mask(pair_pixels(across_x, across_y), margin)
        return boundary_strength(image, across_x, across_y, reference, scale, floor=FLOOR * data_range / 255.0)
    window = mask_window(mask, reach=context + scale + 1)
    if window is None:
        return float("nan")
    inside = mask[window]
    reference = dilate_mask(inside, context) & ~dilate_mask(inside, margin)
    return boundary_strength(
        image[window],
        across_x[window[0], window[1].start : window[1].stop - 1],
        across_y[window[0].start : window[0].stop - 1, window[1]],
        reference,
        scale,
        floor=FLOOR * data_range / 255.0,
    )


# --- sharpness -----------------------------------------------------------------------


def laplacian(image: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of the grey (channel-mean) image; (H, W) with zeros on the outer frame."""
    grey = _as_float(image)
    if grey.ndim == 3:
        grey = grey.mean(axis=-1)
    out = np.zeros_like(grey)
    out[1:-1, 1:-1] = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return out


def sharpness_ratio(image: np.ndarray, mask: np.ndarray, ring: int = 16) -> float:
    """High-frequency energy inside the mask over that in a `ring`-pixel band around it (1.0 = as sharp).

    Both regions leave out pixels whose Laplacian stencil straddles the mask border, so
    a seam does not count as detail. NaN where either region is empty; inf where the
    ring has no detail at all but the fill has.
    """
    window = mask_window(mask, reach=ring + 1)
    if window is None:
        raise ValueError("empty mask")
    inside = mask[window]
    energy = laplacian(image[window]) ** 2
    frame = np.zeros_like(inside)
    frame[1:-1, 1:-1] = True  # the Laplacian is only defined off the window's frame
    core = ~dilate_mask(~inside, 1) & frame
    band = dilate_mask(inside, ring) & ~dilate_mask(inside, 1) & frame
    if not core.any() or not band.any():
        return float("nan")
    fill, around = float(energy[core].mean()), float(energy[band].mean())
    if around == 0:
        return float("inf") if fill > 0 else 1.0
    return fill / around


# --- outside the mask ----------------------------------------------------------------


class OutsideChange(NamedTuple):
    """Pixels outside the mask that differ in any channel, and the largest absolute difference."""

    pixels: int
    max_abs: float


def outside_change(result: np.ndarray, original: np.ndarray, mask: np.ndarray) -> OutsideChange:
    """What changed where nothing may change (must be (0, 0.0) for a correct compositing)."""
    if result.shape != original.shape:
        raise ValueError(f"shapes differ: {result.shape} vs {original.shape}")
    changed = result != original
    if changed.ndim == 3:
        changed = changed.any(axis=-1)
    changed &= ~mask
    count = int(np.count_nonzero(changed))
    if count == 0:
        return OutsideChange(0, 0.0)
    a, b = result[changed], original[changed]
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        largest = np.abs(a.astype(np.int64) - b.astype(np.int64)).max()
    else:
        largest = np.abs(a.astype(np.float64) - b.astype(np.float64)).max()
    return OutsideChange(count, float(largest))
