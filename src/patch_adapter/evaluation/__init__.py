"""Evaluation with known truth: procedural scenes, inpainting tasks, a detector and metrics.

Everything here is pure numpy and needs no model or downloaded weights:

- `scenes`: resolution-independent scene descriptions (flat-coloured shapes on textured
  backgrounds whose fine detail exists only at full resolution), their renders,
  captions and JSON truth.
- `tasks`: insert/remove tasks built from scenes (image, mask, prompt, truth image).
- `detector`: a deterministic reader of the colour and shape inside a mask.
- `metrics`: PSNR/SSIM in a mask, seam strength, sharpness ratio, change outside the mask.
- `scoring`: all of the above for one task and one result, as a flat record.
"""

from .detector import detect_object
from .metrics import outside_change, psnr_in_mask, seam_strength, sharpness_ratio, ssim_in_mask, tile_seam_strength
from .scenes import (
    BACKGROUND_TINTS,
    OBJECT_COLOURS,
    SHAPES,
    TEXTURES,
    VOCABULARY,
    Background,
    Scene,
    SceneObject,
    random_scene,
    render_scene,
    scene_caption,
    scene_truth,
)
from .scoring import score_result
from .tasks import MASK_KINDS, PLACEMENTS, TASK_KINDS, Task, make_task

__all__ = [
    "BACKGROUND_TINTS",
    "OBJECT_COLOURS",
    "SHAPES",
    "TEXTURES",
    "VOCABULARY",
    "Background",
    "Scene",
    "SceneObject",
    "random_scene",
    "render_scene",
    "scene_caption",
    "scene_truth",
    "MASK_KINDS",
    "PLACEMENTS",
    "TASK_KINDS",
    "Task",
    "make_task",
    "detect_object",
    "outside_change",
    "psnr_in_mask",
    "seam_strength",
    "sharpness_ratio",
    "ssim_in_mask",
    "tile_seam_strength",
    "score_result",
]
