"""All metrics for one task and one result, as one flat record (a row of the quality benchmark).

Seam strength and sharpness are reported for the result and for the truth on the
same mask: the truth's values are what a perfect fill gets (an inserted flat object
is less detailed than the textured ring around it, so its sharpness is below 1 by
design), so compare the result with them, not with 1.0 alone.
"""

from __future__ import annotations

import numpy as np

from .detector import count_objects, detect_object
from .metrics import outside_change, psnr_in_mask, seam_strength, sharpness_ratio, ssim_in_mask, tile_seam_strength
from .tasks import Task


def prompt_followed(task: Task, detected: tuple[str | None, str | None]) -> bool:
    """Insert: the target's colour and shape are read in the mask. Remove: no object is read there."""
    if task.kind == "insert":
        return detected == (task.target.colour, task.target.shape)
    return detected[0] is None


def score_result(
    task: Task, result: np.ndarray, tile_rows: tuple[int, ...] = (), tile_cols: tuple[int, ...] = ()
) -> dict:
    """Fidelity, seams, sharpness, prompt accuracy and outside change of `result` on `task`.

    tile_rows/tile_cols: pixel rows/columns where the method's tiles start or end
    (stage-2 patch borders); without them the tile-seam fields are None.
    """
    if result.shape != task.image.shape:
        raise ValueError(f"result shape {result.shape} differs from the task's {task.image.shape}")
    detected = detect_object(result, task.mask)
    changed = outside_change(result, task.image, task.mask)
    tiles = bool(tile_rows) or bool(tile_cols)
    return {
        "psnr": psnr_in_mask(result, task.truth, task.mask),
        "ssim": ssim_in_mask(result, task.truth, task.mask),
        "seam": seam_strength(result, task.mask),
        "seam_truth": seam_strength(task.truth, task.mask),
        "tile_seam": tile_seam_strength(result, tile_rows, tile_cols, task.mask) if tiles else None,
        "tile_seam_truth": tile_seam_strength(task.truth, tile_rows, tile_cols, task.mask) if tiles else None,
        "sharpness": sharpness_ratio(result, task.mask),
        "sharpness_truth": sharpness_ratio(task.truth, task.mask),
        "detected_colour": detected[0],
        "detected_shape": detected[1],
        "prompt_followed": prompt_followed(task, detected),
        "objects": count_objects(result, task.mask),
        "objects_truth": count_objects(task.truth, task.mask),
        "outside_changed_pixels": changed.pixels,
        "outside_max_abs": changed.max_abs,
    }
