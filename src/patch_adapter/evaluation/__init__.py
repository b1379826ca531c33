"""Evaluation with known truth: inpainting tasks, a detector and metrics.

Everything here is pure numpy (and OpenCV's connected components) and needs no model
or downloaded weights. The scenes come from the tiny world's one generator
(`patch_adapter.tiny_world.scenes`, re-exported here):

- `tasks`: insert/remove tasks built from scenes (image, mask, prompt, truth image).
- `detector`: a deterministic reader of the colour and shape inside a mask, and of
  how many separate objects are drawn there (the structure check).
- `metrics`: PSNR/SSIM in a mask, seam strength, sharpness ratio, change outside the mask.
- `scoring`: all of the above for one task and one result, as a flat record.
"""

from ..tiny_world.scenes import (
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
from .detector import count_objects, detect_object
from .metrics import outside_change, psnr_in_mask, seam_strength, sharpness_ratio, ssim_in_mask, tile_seam_strength
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
    "count_objects",
    "detect_object",
    "outside_change",
    "psnr_in_mask",
    "seam_strength",
    "sharpness_ratio",
    "ssim_in_mask",
    "tile_seam_strength",
    "score_result",
]
