"""Inpainting tasks with known answers, built from procedural scenes.

A task is a pair of scenes that differ by one object, the target:
- insert: the image lacks the target, the prompt names it ("a red triangle"), the
  truth is the scene with it;
- remove: the image shows the target, the prompt describes the background
  ("a grey striped background"), the truth is the scene without it.
The same seed (with the same mask kind and placement) gives the same pair of scenes
for both kinds, so insertion and removal can be compared case by case.

The mask always covers every pixel where the two scenes differ and never touches
another object: other objects are placed outside a reserved box around the target,
which holds the whole mask. Masks come in three kinds (the target's outline grown
by a margin, a box, brush strokes through the target) and three placements: free,
at an image border (the mask reaches the edge), large (the mask is bigger than one
native-size patch of the backbone in both directions: a whole object no patch sees
at once, or a large removal across textured background), and small (the target is
0.15-0.35 of a native patch: a small mask whose detail exists only at full resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ..masks import mask_bbox
from ..tiny_world.scenes import (
    Scene,
    SceneObject,
    background_phrase,
    object_box,
    object_phrase,
    object_signed_distance,
    object_truth,
    place_objects,
    random_background,
    random_object,
    render_scene,
    scene_truth,
    segment_distance,
)

TASK_KINDS: tuple[str, ...] = ("insert", "remove")
MASK_KINDS: tuple[str, ...] = ("object", "box", "brush")
PLACEMENTS: tuple[str, ...] = ("free", "border", "large", "small")

TARGET_SIZES = (0.08, 0.3)  # free and border targets: side as a share of the shorter image side
OTHER_SIZES = (0.05, 0.25)  # the other objects of the scene
LARGE_MARGIN = 1.15  # a large target's side is at least this many native patches
SMALL_SIZES = (0.15, 0.35)  # a small target's side in native patches: its mask fits one patch with room


@dataclass(frozen=True, eq=False)
class Task:
    """One inpainting case: what the method gets (image, mask, prompt) and what it should give (truth)."""

    kind: str  # "insert" or "remove"
    mask_kind: str  # "object", "box" or "brush"
    placement: str  # "free", "border" or "large"
    seed: int
    native: int  # the backbone's native patch side the task was sized for, pixels
    image: np.ndarray  # (H, W, 3) uint8, the input picture
    mask: np.ndarray  # (H, W) bool, True = fill
    prompt: str
    truth: np.ndarray  # (H, W, 3) uint8, the ideal result (equal to image outside the mask)
    target: SceneObject  # the object inserted or removed
    scene: Scene  # what `image` shows
    truth_scene: Scene  # what `truth` shows


def task_record(task: Task) -> dict:
    """The task without its arrays, JSON-ready: settings, prompt, mask box and both scenes' truth."""
    top, left, bottom, right = mask_bbox(task.mask)
    return {
        "kind": task.kind,
        "mask_kind": task.mask_kind,
        "placement": task.placement,
        "seed": task.seed,
        "native": task.native,
        "prompt": task.prompt,
        "caption": scene_truth(task.scene)["caption"],
        "target": object_truth(task.target, task.scene.width, task.scene.height),
        "mask_box": [left, top, right, bottom],
        "mask_area": int(task.mask.sum()),
        "scene": scene_truth(task.scene),
        "truth_scene": scene_truth(task.truth_scene),
    }


def mask_margin(obj: SceneObject, width: int, height: int) -> float:
    """How far (pixels) a mask reaches beyond the target's outline: 8% of its side, at least 3."""
    return max(3.0, 0.08 * obj.size * min(width, height))


def reserved_box(obj: SceneObject, width: int, height: int) -> tuple[float, float, float, float]:
    """The box (left, top, right, bottom) that holds any mask of the target and no other object."""
    left, top, right, bottom = object_box(obj, width, height)
    reach = 4 * mask_margin(obj, width, height)
    return (
        max(0.0, left - reach),
        max(0.0, top - reach),
        min(float(width), right + reach),
        min(float(height), bottom + reach),
    )


def target_object(rng: np.random.Generator, width: int, height: int, native: int, placement: str) -> SceneObject:
    """The object a task inserts or removes, placed as `placement` asks."""
    side = min(width, height)
    if placement == "large":
        smallest = LARGE_MARGIN * native / side
        if smallest > 0.8:
            raise ValueError(f"a target larger than a {native}-pixel patch does not fit in {width}x{height}")
        return random_object(rng, width, height, (smallest, min(0.8, 1.3 * smallest)))
    if placement == "small":
        return random_object(rng, width, height, tuple(share * native / side for share in SMALL_SIZES))
    obj = random_object(rng, width, height, TARGET_SIZES)
    if placement == "free":
        return obj
    if placement != "border":
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    half = obj.size * side / 2
    edge = int(rng.integers(0, 4))  # flush with the left, right, top or bottom edge
    x = {0: half / width, 1: 1 - half / width}.get(edge, obj.x)
    y = {2: half / height, 3: 1 - half / height}.get(edge, obj.y)
    return SceneObject(obj.shape, obj.colour, x, y, obj.size)


def _window(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer (top, left, bottom, right) pixels of a float box, clipped to the picture."""
    left, top, right, bottom = box
    return (
        max(0, int(np.floor(top))),
        max(0, int(np.floor(left))),
        min(height, int(np.ceil(bottom))),
        min(width, int(np.ceil(right))),
    )


def outline_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """(H, W) bool: the target's outline grown by `mask_margin` pixels."""
    margin = mask_margin(obj, width, height)
    distance, (top, left) = object_signed_distance(obj, width, height, margin=margin)
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + distance.shape[0], left : left + distance.shape[1]] = distance < margin
    return mask


def box_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """(H, W) bool: the target's box grown by twice `mask_margin`, out to whole pixels."""
    reach = 2 * mask_margin(obj, width, height)
    left, top, right, bottom = object_box(obj, width, height)
    y0, x0, y1, x1 = _window((left - reach, top - reach, right + reach, bottom + reach), width, height)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def brush_mask(rng: np.random.Generator, obj: SceneObject, width: int, height: int) -> np.ndarray:
    """(H, W) bool: the grown outline plus 1-3 thick strokes that start on the target.

    Strokes are polylines of round brushes (8-18% of the target's side in radius) that
    wander inside the reserved box and are cut off at its edge.
    """
    mask = outline_mask(obj, width, height)
    side = obj.size * min(width, height)
    left, top, right, bottom = object_box(obj, width, height)
    box = reserved_box(obj, width, height)
    y0, x0, y1, x1 = _window(box, width, height)
    xs = (np.arange(x0, x1) + 0.5).astype(np.float32)[None, :]
    ys = (np.arange(y0, y1) + 0.5).astype(np.float32)[:, None]
    strokes = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        radius = float(rng.uniform(0.08, 0.18)) * side
        points = [(float(rng.uniform(left, right)), float(rng.uniform(top, bottom)))]
        for _ in range(int(rng.integers(1, 4))):
            points.append((float(rng.uniform(box[0], box[2])), float(rng.uniform(box[1], box[3]))))
        for a, b in pairwise(points):
            strokes |= segment_distance(xs, ys, a, b) < radius
    mask[y0:y1, x0:x1] |= strokes
    return mask


def target_mask(rng: np.random.Generator, obj: SceneObject, width: int, height: int, mask_kind: str) -> np.ndarray:
    """The task's mask of the given kind around the target."""
    if mask_kind == "object":
        return outline_mask(obj, width, height)
    if mask_kind == "box":
        return box_mask(obj, width, height)
    if mask_kind == "brush":
        return brush_mask(rng, obj, width, height)
    raise ValueError(f"unknown mask kind {mask_kind!r}; expected one of {MASK_KINDS}")


def make_task(
    kind: str,
    seed: int,
    width: int,
    height: int,
    native: int = 128,
    mask_kind: str = "object",
    placement: str = "free",
    max_objects: int = 3,
) -> Task:
    """A seeded insert or remove task at width x height (the scene's full resolution).

    `native` is the backbone's patch side in pixels (128 for the tiny backbone, 1024 for
    SDXL); it matters for placement "large", whose mask exceeds one patch both ways.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    rng = np.random.default_rng(seed)
    # 1. The scene both images share: background, target, and other objects kept clear of the target.
    background = random_background(rng)
    target = target_object(rng, width, height, native, placement)
    count = int(rng.integers(1, max_objects + 1))
    others = place_objects(rng, width, height, count, OTHER_SIZES, avoid=(reserved_box(target, width, height),))
    with_target = Scene(width, height, background, others + (target,))
    without_target = Scene(width, height, background, others)
    # 2. The mask around the target.
    mask = target_mask(rng, target, width, height, mask_kind)
    # 3. Input, prompt and truth by kind.
    if kind == "insert":
        scene, truth_scene, prompt = without_target, with_target, object_phrase(target)
    else:
        scene, truth_scene, prompt = with_target, without_target, background_phrase(background)
    return Task(
        kind=kind,
        mask_kind=mask_kind,
        placement=placement,
        seed=seed,
        native=native,
        image=render_scene(scene),
        mask=mask,
        prompt=prompt,
        truth=render_scene(truth_scene),
        target=target,
        scene=scene,
        truth_scene=truth_scene,
    )
