"""Procedural scenes, tasks and the detector: known truth that the quality benchmark can trust."""

import json

import numpy as np
import pytest

from patch_adapter.evaluation.detector import count_objects, detect_object, shape_scores
from patch_adapter.evaluation.metrics import laplacian
from patch_adapter.evaluation.tasks import MASK_KINDS, PLACEMENTS, make_task, task_record
from patch_adapter.tiny_world.scenes import (
    BACKGROUND_TINTS,
    OBJECT_COLOURS,
    SHAPES,
    TEXTURES,
    VOCABULARY,
    Scene,
    SceneObject,
    diagonal_line_coverage,
    object_box,
    object_coverage,
    random_background,
    random_object,
    random_scene,
    render_scene,
    scene_caption,
    scene_truth,
)


def block_mean(image, factor):
    """Area downscale by an integer factor."""
    h, w = image.shape[:2]
    return image.reshape(h // factor, factor, w // factor, factor, -1).mean(axis=(1, 3), dtype=np.float32)


def chroma_length(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return np.linalg.norm(rgb - rgb.mean(axis=-1, keepdims=True), axis=-1)


# --- vocabulary ----------------------------------------------------------------------


def test_vocabulary_is_small_fixed_and_separable():
    assert len(SHAPES) >= 5 and len(OBJECT_COLOURS) >= 6
    assert len(VOCABULARY) == len(set(VOCABULARY)) and list(VOCABULARY) == sorted(VOCABULARY)
    # backgrounds are weakly coloured, objects strongly: what the detector relies on
    assert max(chroma_length(list(BACKGROUND_TINTS.values()))) < 30
    assert min(chroma_length(list(OBJECT_COLOURS.values()))) > 90


def test_captions_and_prompts_use_only_the_vocabulary():
    words = set()
    for seed in range(40):
        scene = random_scene(seed, 256, 256, max_objects=4)
        words |= set(scene_caption(scene).split())
        task = make_task(("insert", "remove")[seed % 2], seed, 256, 256, mask_kind=MASK_KINDS[seed % 3])
        words |= set(task.prompt.split())
    assert words <= set(VOCABULARY)
    assert scene_caption(Scene(64, 64, random_background(np.random.default_rng(0)), ())).endswith("background")


def test_caption_grammar():
    rng = np.random.default_rng(0)
    background = random_background(rng, texture="stripes", tint="grey")
    a = random_object(rng, 512, 512, (0.1, 0.1), shape="triangle", colour="red")
    b = random_object(rng, 512, 512, (0.1, 0.1), shape="star", colour="orange")
    a, b = (a, b) if a.x < b.x else (b, a)
    caption = scene_caption(Scene(512, 512, background, (b, a)))  # listed left to right, whatever the order
    assert (
        caption == f"{'a red triangle' if a.shape == 'triangle' else 'an orange star'} and "
        f"{'an orange star' if b.shape == 'star' else 'a red triangle'} on a grey striped background"
    )


# --- rendering -----------------------------------------------------------------------


def test_same_seed_same_scene_same_pixels():
    a, b = random_scene(7, 320, 240), random_scene(7, 320, 240)
    assert a == b
    assert np.array_equal(render_scene(a), render_scene(b))
    assert not np.array_equal(render_scene(a), render_scene(random_scene(8, 320, 240)))
    t1, t2 = make_task("remove", 3, 256, 256, mask_kind="brush"), make_task("remove", 3, 256, 256, mask_kind="brush")
    for name in ("image", "mask", "truth"):
        assert np.array_equal(getattr(t1, name), getattr(t2, name))
    assert t1.prompt == t2.prompt and t1.scene == t2.scene


def test_scene_truth_is_json_and_matches_the_scene():
    scene = random_scene(11, 640, 480, max_objects=4)
    truth = json.loads(json.dumps(scene_truth(scene)))
    assert truth["caption"] == scene_caption(scene)
    assert (truth["width"], truth["height"]) == (640, 480)
    assert truth["background"]["texture"] in TEXTURES and truth["background"]["tint"] in BACKGROUND_TINTS
    image = render_scene(scene)
    for record, obj in zip(truth["objects"], scene.objects, strict=True):
        assert record["shape"] == obj.shape and record["rgb"] == list(OBJECT_COLOURS[obj.colour])
        left, top, right, bottom = (int(round(v)) for v in record["box"])
        assert 0 <= left < right <= 640 and 0 <= top < bottom <= 480
        centre = image[(top + bottom) // 2, (left + right) // 2].astype(int)
        if obj.shape not in ("star",):  # the centre of every other shape is solid colour
            assert np.abs(centre - OBJECT_COLOURS[obj.colour]).max() < 12


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("scale", [(1.0, 1.0), (4.0, 4.0), (2.5, 1.7), (0.5, 0.5)])
def test_line_texture_is_the_exact_area_average_of_the_full_resolution_lines(direction, scale):
    """Parity with brute-force supersampling of the pixel footprints."""
    period, width, phase, offset = 5.0, 2.0, 3.0, 50.0
    rows, cols = np.arange(5.0)[:, None], np.arange(6.0)[None, :]
    exact = diagonal_line_coverage(rows, cols, scale, period, width, phase, direction, offset)
    fractions = (np.arange(64) + 0.5) / 64
    for r in range(5):
        for c in range(6):
            x = (c + fractions[None, :]) * scale[0]
            y = (r + fractions[:, None]) * scale[1]
            sampled = (((x + direction * y - phase + offset) % period) < width).mean()
            assert exact[r, c] == pytest.approx(sampled, abs=0.02)


@pytest.mark.parametrize("texture", list(TEXTURES))
def test_fine_texture_is_only_visible_at_full_resolution(texture):
    scene = random_scene(5, 512, 512, texture=texture)
    scene = Scene(512, 512, scene.background, ())
    full = render_scene(scene).astype(np.float64)
    fine = (laplacian(full)[8:-8, 8:-8] ** 2).mean()
    assert fine > 100  # 1-2 px detail with tens of grey levels of contrast
    round_trip = np.repeat(np.repeat(block_mean(full, 4), 4, axis=0), 4, axis=1)
    left = (laplacian(round_trip)[8:-8, 8:-8] ** 2).mean()
    assert left < 0.1 * fine, (texture, left / fine)


def test_renders_at_another_aspect_keep_the_tint():
    scene = random_scene(9, 512, 512, texture="grid")
    bare = Scene(512, 512, scene.background, ())
    odd = render_scene(bare, 300, 200)
    assert odd.shape == (200, 300, 3)
    assert np.abs(odd.mean(axis=(0, 1)) - render_scene(bare).mean(axis=(0, 1))).max() < 1.5


def test_renders_at_any_size_agree_after_downscaling():
    scene = random_scene(2, 4096, 4096, max_objects=4, size_range=(0.1, 0.3))
    full = render_scene(scene)
    assert full.shape == (4096, 4096, 3) and full.dtype == np.uint8
    native = render_scene(scene, 1024, 1024)
    difference = np.abs(block_mean(full, 4) - native)
    assert difference.mean() < 4
    assert np.abs(block_mean(block_mean(full, 4), 8) - block_mean(native, 8)).mean() < 1.0


# --- detector ------------------------------------------------------------------------


def test_detector_accuracy_on_clean_renders():
    """At least 98% of 300 cases: task truths with every mask kind, and small objects at 512x512."""
    right, cases = 0, 0
    for seed in range(150):
        width, height = [(512, 512), (384, 512), (512, 320)][seed % 3]
        task = make_task(
            "insert", seed, width, height, mask_kind=MASK_KINDS[seed % 3], placement=("free", "border")[(seed // 3) % 2]
        )
        right += detect_object(task.truth, task.mask) == (task.target.colour, task.target.shape)
        cases += 1
    for seed in range(150):  # small objects: 15 to 50 px at 512x512, in a loose box
        rng = np.random.default_rng(10_000 + seed)
        obj = random_object(rng, 512, 512, (0.03, 0.1))
        image = render_scene(Scene(512, 512, random_background(rng), (obj,)))
        left, top, right_edge, bottom = object_box(obj, 512, 512)
        mask = np.zeros((512, 512), dtype=bool)
        mask[max(0, int(top) - 6) : int(bottom) + 7, max(0, int(left) - 6) : int(right_edge) + 7] = True
        right += detect_object(image, mask) == (obj.colour, obj.shape)
        cases += 1
    assert cases == 300
    assert right / cases >= 0.98, right / cases


def test_detector_sees_no_object_on_bare_background():
    for seed in range(30):
        task = make_task("remove", seed, 384, 384, mask_kind=MASK_KINDS[seed % 3])
        assert detect_object(task.truth, task.mask) == (None, None)
        assert detect_object(task.image, task.mask) == (task.target.colour, task.target.shape)


def test_detector_is_not_fooled_by_a_wrong_shape():
    """The right template wins clearly on a clean object; a blob of another shape loses."""
    for shape in SHAPES:
        rng = np.random.default_rng(1)
        obj = random_object(rng, 256, 256, (0.3, 0.3), shape=shape, colour="blue")
        coverage, _ = object_coverage(obj, 256, 256)
        scores = shape_scores(coverage)
        best, runner_up = sorted(scores.values())[-1], sorted(scores.values())[-2]
        assert max(scores, key=scores.get) == shape and best > 0.9 and runner_up < 0.85


# --- tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_remove_truth_is_the_scene_without_the_target(mask_kind):
    for seed in range(6):
        task = make_task("remove", seed, 320, 256, mask_kind=mask_kind, placement=PLACEMENTS[seed % 3])
        assert task.prompt.endswith("background") and task.target in task.scene.objects
        assert task.target not in task.truth_scene.objects
        assert len(task.truth_scene.objects) == len(task.scene.objects) - 1
        assert np.array_equal(task.truth, render_scene(task.truth_scene))
        assert np.array_equal(task.truth[~task.mask], task.image[~task.mask])  # the mask holds the whole change
        coverage, (top, left) = object_coverage(task.target, 320, 256)
        window = task.mask[top : top + coverage.shape[0], left : left + coverage.shape[1]]
        assert window[coverage > 0].all()


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_insert_mask_leaves_other_objects_alone(mask_kind):
    for seed in range(8):
        task = make_task("insert", seed, 384, 384, mask_kind=mask_kind, placement=PLACEMENTS[seed % 3])
        assert task.prompt.split()[-2:] == [task.target.colour, task.target.shape]
        assert task.scene.objects == task.truth_scene.objects[:-1] and task.truth_scene.objects[-1] == task.target
        for other in task.scene.objects:
            coverage, (top, left) = object_coverage(other, 384, 384)
            window = task.mask[top : top + coverage.shape[0], left : left + coverage.shape[1]]
            assert not window[coverage > 0].any()
        assert np.array_equal(task.truth[~task.mask], task.image[~task.mask])
        assert not np.array_equal(task.truth[task.mask], task.image[task.mask])


def test_insert_and_remove_share_their_scenes():
    insert, remove = make_task("insert", 21, 256, 256), make_task("remove", 21, 256, 256)
    assert insert.scene == remove.truth_scene and insert.truth_scene == remove.scene
    assert np.array_equal(insert.image, remove.truth) and np.array_equal(insert.mask, remove.mask)


def test_border_masks_reach_the_edge():
    for seed in range(12):
        task = make_task("remove", seed, 320, 320, mask_kind=MASK_KINDS[seed % 3], placement="border")
        mask = task.mask
        assert mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()


@pytest.mark.parametrize("native,size", [(128, 512), (1024, 2048)])
def test_large_masks_exceed_a_native_patch(native, size):
    for seed in range(2 if size > 1024 else 6):
        task = make_task("remove", seed, size, size, native=native, mask_kind=MASK_KINDS[seed % 3], placement="large")
        rows, cols = np.flatnonzero(task.mask.any(axis=1)), np.flatnonzero(task.mask.any(axis=0))
        assert rows[-1] - rows[0] + 1 > native and cols[-1] - cols[0] + 1 > native
        assert np.array_equal(task.truth[~task.mask], task.image[~task.mask])


@pytest.mark.parametrize("size", [512, 1024])
def test_small_masks_fit_inside_one_native_patch(size):
    for seed in range(6):
        task = make_task("insert", seed, size, size, native=128, mask_kind=MASK_KINDS[seed % 3], placement="small")
        rows, cols = np.flatnonzero(task.mask.any(axis=1)), np.flatnonzero(task.mask.any(axis=0))
        assert rows[-1] - rows[0] + 1 < 128 and cols[-1] - cols[0] + 1 < 128
        assert 0.15 * 128 - 1 <= task.target.size * size <= 0.35 * 128 + 1


def test_object_count_is_one_for_insert_truths_and_zero_for_removals():
    for seed in range(16):
        placement = PLACEMENTS[seed % len(PLACEMENTS)]
        for kind, want in (("insert", 1), ("remove", 0)):
            task = make_task(kind, seed, 512, 512, mask_kind=MASK_KINDS[seed % 3], placement=placement)
            assert count_objects(task.truth, task.mask) == want, (seed, kind, placement)
            assert count_objects(task.image, task.mask) == 1 - want


def test_object_count_sees_duplicates_and_broken_objects_and_ignores_specks():
    background = random_scene(3, 256, 256, max_objects=1).background
    star = SceneObject("star", "red", 0.3, 0.5, 0.25)
    twins = Scene(256, 256, background, (star, SceneObject("star", "red", 0.7, 0.5, 0.25)))
    mask = np.ones((256, 256), dtype=bool)
    assert count_objects(render_scene(Scene(256, 256, background, (star,))), mask) == 1
    assert count_objects(render_scene(twins), mask) == 2
    broken = render_scene(Scene(256, 256, background, (SceneObject("square", "blue", 0.5, 0.5, 0.4),)))
    bare = render_scene(Scene(256, 256, background))
    broken[:, 126:131] = bare[:, 126:131]  # a background gap through the middle: two pieces
    assert count_objects(broken, mask) == 2
    speckled = render_scene(Scene(256, 256, background, (star,)))
    speckled[10:12, 10:12] = (215, 40, 40)  # a 4-pixel speck is not an object
    assert count_objects(speckled, mask) == 1
    assert count_objects(bare, mask) == 0


def test_task_arguments_are_checked():
    with pytest.raises(ValueError):
        make_task("paint", 0, 128, 128)
    with pytest.raises(ValueError):
        make_task("insert", 0, 128, 128, mask_kind="lasso")
    with pytest.raises(ValueError):
        make_task("insert", 0, 128, 128, placement="corner")
    with pytest.raises(ValueError):
        make_task("insert", 0, 256, 256, native=1024, placement="large")  # no patch-sized object fits


def test_task_record_is_json():
    task = make_task("insert", 4, 256, 192, mask_kind="box")
    record = json.loads(json.dumps(task_record(task)))
    assert record["prompt"] == task.prompt and record["mask_area"] == int(task.mask.sum())
    assert record["target"]["shape"] == task.target.shape
    assert record["truth_scene"]["caption"] != record["scene"]["caption"]
