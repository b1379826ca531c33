"""Training views of procedural scenes, for the tiny backbone and its adapters.

A general backbone has seen whole pictures and close-ups. So does the tiny one: a
view is a native-size window of a scene rendered at a random scale between "the
whole scene squeezed into the window" (texture averaged away) and "full resolution"
(1-2 px texture crisp). Each view comes with an inpainting lesson of the kinds the
benchmark asks for:

- insert: a mask around a visible object, its phrase as the prompt ("a red star");
- remove: the same mask, the background phrase as the prompt, and the picture
  without that object as the target;
- repaint: a random training mask, the caption of what is visible as the prompt.

`export_scene_folder` writes full-resolution scenes with captions and object masks
as an imagefolder, the data the adapter trainers (`patch-adapter train`) read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..evaluation.tasks import MASK_KINDS, object_signed_distance, target_mask
from ..masks import mask_bbox
from ..training.masks import random_mask
from .scenes import (
    Scene,
    SceneObject,
    background_phrase,
    boxes_overlap,
    object_box,
    object_phrase,
    random_scene,
    render_scene,
    scene_caption,
    without_object,
)

VIEWS_VERSION = 3
"""Bumped whenever what a seed draws changes, so cached views of an older version are not reused."""

LESSONS = {"insert": 0.45, "remove": 0.35, "repaint": 0.2}
"""Share of each inpainting lesson among views that show an object (others repaint)."""

LARGEST_SCENE = 8
"""Scenes are up to this many native sides across, so views reach 8x zoom."""

FOCUS_SHARE = 0.75
"""Share of views centred near an object."""

FOCUS_SIZES = (0.1, 0.85)
"""Side of the focused object in a view, share of the view (log-uniform): shapes must be learnt where
they can be seen, from 13 px (2 latent cells, where every shape is a blob) to most of the view."""


@dataclasses.dataclass
class View:
    """One training example: target picture, mask (True = fill) and prompt."""

    pixels: np.ndarray  # (n, n, 3) uint8: what the fill should look like
    mask: np.ndarray  # (n, n) bool
    prompt: str
    lesson: str  # a LESSONS name


def view_window(rng: np.random.Generator, scene: Scene, native: int) -> tuple[int, int, int]:
    """(render side, top, left): the scale a square scene is seen at, and the native-size window.

    Most windows are centred near an object, seen at a size drawn log-uniform from
    FOCUS_SIZES (as the lessons need a readable one); the others at a scale
    log-uniform between the whole scene and full resolution. Never beyond full
    resolution, so a scene's texture is at most as fine as its own.
    """
    full = scene.width
    render = float(np.exp(rng.uniform(np.log(native), np.log(full))))
    focused = bool(scene.objects) and rng.random() < FOCUS_SHARE  # a crowded draw can place no object
    focus = scene.objects[int(rng.integers(0, len(scene.objects)))] if focused else None
    if focus is not None:
        render = float(np.exp(rng.uniform(*np.log(FOCUS_SIZES)))) * native / focus.size
    render = int(round(max(native, min(full, render))))
    if focus is None:
        top, left = (int(v) for v in rng.integers(0, render - native + 1, size=2))
        return render, top, left
    at = rng.uniform(0.25, 0.75, size=2) * native
    top = int(np.clip(round(focus.y * render - at[0]), 0, render - native))
    left = int(np.clip(round(focus.x * render - at[1]), 0, render - native))
    return render, top, left


def object_in_window(obj: SceneObject, render: int, top: int, left: int, native: int) -> SceneObject:
    """The object in the coordinates of a native-size window of a render-size square render."""
    return SceneObject(
        obj.shape,
        obj.colour,
        x=(obj.x * render - left) / native,
        y=(obj.y * render - top) / native,
        size=obj.size * render / native,
    )


def visible(obj: SceneObject) -> bool:
    """Centre inside the window (in window coordinates), and the object smaller than the window."""
    return 0.1 < obj.x < 0.9 and 0.1 < obj.y < 0.9 and obj.size <= 0.9


def scene_view(seed: int, native: int = 128) -> View:
    """The view and lesson drawn from `seed` alone."""
    rng = np.random.default_rng(seed)
    full = native * int(rng.integers(1, LARGEST_SCENE + 1))
    scene = random_scene(int(rng.integers(0, 2**31 - 1)), full, full, max_objects=3)
    render, top, left = view_window(rng, scene, native)

    def window(s: Scene) -> np.ndarray:
        return render_scene(s, render, render)[top : top + native, left : left + native]

    local = [object_in_window(o, render, top, left, native) for o in scene.objects]
    shown = [i for i, o in enumerate(local) if visible(o)]
    lesson = str(rng.choice(list(LESSONS), p=list(LESSONS.values()))) if shown else "repaint"
    if lesson == "repaint":
        pixels = window(scene)
        mask, _ = random_mask(rng, native, native)
        inside = [o for o in local if -0.1 < o.x < 1.1 and -0.1 < o.y < 1.1]
        caption = scene_caption(dataclasses.replace(scene, objects=tuple(inside)))
        return View(pixels, mask, caption, lesson)
    index = int(rng.choice(shown))
    mask = target_mask(rng, local[index], native, native, str(rng.choice(MASK_KINDS)))
    # other objects the mask reaches are left out of the scene: the lesson is about one object
    top_m, left_m, bottom_m, right_m = mask_bbox(mask)
    reached = {
        i
        for i, o in enumerate(local)
        if i != index and boxes_overlap(object_box(o, native, native), (left_m, top_m, right_m, bottom_m), gap=1.0)
    }
    scene = dataclasses.replace(scene, objects=tuple(o for i, o in enumerate(scene.objects) if i not in reached))
    index -= sum(i < index for i in reached)
    if lesson == "insert":
        return View(window(scene), mask, object_phrase(scene.objects[index]), lesson)
    return View(window(without_object(scene, index)), mask, background_phrase(scene.background), lesson)


def export_scene_folder(folder: Path, count: int, sizes: tuple[int, ...], seed: int = 0) -> Path:
    """`count` square scenes, sides cycling through `sizes`, as an imagefolder.

    PNGs at full resolution, one mask PNG per object, metadata.jsonl with captions.
    """
    from PIL import Image

    folder = Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        scene = random_scene(seed + i, size, size, max_objects=3)
        name = f"scene_{i:05d}.png"
        Image.fromarray(render_scene(scene)).save(folder / name)
        masks = []
        for k, obj in enumerate(scene.objects):
            distance, (y0, x0) = object_signed_distance(obj, size, size, margin=2.0)
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[y0 : y0 + distance.shape[0], x0 : x0 + distance.shape[1]] = (distance < 2.0) * 255
            mask_name = f"masks/scene_{i:05d}_{k}.png"
            Image.fromarray(mask).save(folder / mask_name)
            masks.append(mask_name)
        lines.append(json.dumps({"file_name": name, "text": scene_caption(scene), "mask_file_name": masks}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
