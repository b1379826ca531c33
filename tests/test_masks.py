"""Masks: the package's helpers (patch_adapter.masks) and the random training masks."""

from collections import Counter

import numpy as np
import pytest
import torch

from patch_adapter.masks import (
    dilate_mask,
    feather_alpha,
    feather_alpha_at,
    grow_box,
    latent_mask,
    latent_mask_tensor,
    mask_bbox,
    resize_mask_any,
)
from patch_adapter.training.config import MASK_KINDS, TrainConfig
from patch_adapter.training.masks import border, boxes, brush_strokes, large_area, object_mask, random_mask

SIZES = [(128, 128), (96, 160), (160, 96), (17, 9)]


def only(kind):
    return {k: float(k == kind) for k in MASK_KINDS}


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_each_kind_is_produced_and_leaves_context(kind):
    for seed in range(50):
        for height, width in SIZES:
            mask, drawn = random_mask(np.random.default_rng(seed), height, width, only(kind))
            assert drawn == kind
            assert mask.shape == (height, width) and mask.dtype == bool
            assert mask.any() and not mask.all()  # something to fill, something to fill it from


def test_large_masks_cover_more_than_half():
    coverage = [large_area(np.random.default_rng(seed), h, w).mean() for seed in range(400) for h, w in SIZES]
    assert min(coverage) > 0.5
    assert max(coverage) < 1.0


def test_border_masks_touch_the_border_and_keep_the_centre():
    for seed in range(200):
        mask = border(np.random.default_rng(seed), 64, 96)
        assert mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
        assert not mask[32, 48]


def test_kinds_differ_in_shape():
    """Brush strokes are thin, boxes are rectangles: the generators are not one function."""
    rng = np.random.default_rng(0)
    box = boxes(rng, 128, 128)
    rows, cols = np.nonzero(box)
    assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].mean() > 0.3
    strokes = brush_strokes(np.random.default_rng(1), 128, 128)
    assert 0 < strokes.mean() < 0.5


def test_same_seed_same_mask_other_seed_other_mask():
    for kind in MASK_KINDS:
        a, _ = random_mask(np.random.default_rng([7, 1]), 96, 128, only(kind))
        b, _ = random_mask(np.random.default_rng([7, 1]), 96, 128, only(kind))
        c, _ = random_mask(np.random.default_rng([7, 2]), 96, 128, only(kind))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_mix_weights_are_respected():
    mix = {"brush": 0.5, "box": 0.3, "large": 0.0, "border": 0.2, "object": 0.0}
    rng = np.random.default_rng(0)
    counts = Counter(random_mask(rng, 32, 32, mix)[1] for _ in range(2000))
    assert set(counts) == {"brush", "box", "border"}  # zero weight: never drawn
    for kind in counts:
        assert abs(counts[kind] / 2000 - mix[kind]) < 0.04, counts


def test_object_masks_come_from_the_dataset_when_given():
    obj = np.zeros((64, 64), dtype=bool)
    obj[10:20, 30:50] = True
    for seed in range(20):
        mask = object_mask(np.random.default_rng(seed), 64, 64, [obj])
        assert mask[obj].all()  # the object, perhaps dilated a little
        assert mask.sum() <= (obj.shape[0] * obj.shape[1]) // 4


def test_unknown_mask_kind_in_the_mix_is_an_error():
    with pytest.raises(ValueError, match="blob"):
        TrainConfig(mask_mix={"blob": 1.0})
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(mask_mix={"box": 0.0})


# --------------------------------------------------------------------------- patch_adapter.masks
# The package's mask helpers, each against a brute-force reference.


def brute_dilate(mask, radius):
    """Every pixel within Chebyshev distance `radius` of a set pixel (nothing beyond the edge)."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    for r, c in zip(*np.nonzero(mask), strict=True):
        out[max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1] = True
    assert out.shape == (height, width)
    return out


def test_bbox_of_empty_full_and_edge_masks():
    empty = np.zeros((7, 9), dtype=bool)
    assert mask_bbox(empty) is None
    assert mask_bbox(np.ones((7, 9), dtype=bool)) == (0, 0, 7, 9)
    corner = empty.copy()
    corner[6, 8] = True  # the last pixel: bottom and right are exclusive
    assert mask_bbox(corner) == (6, 8, 7, 9)
    edges = empty.copy()
    edges[0, 4] = edges[3, 0] = True
    assert mask_bbox(edges) == (0, 0, 4, 5)


def test_bbox_matches_the_set_pixels():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) > 0.9
        rows, cols = np.nonzero(mask)
        expected = None if rows.size == 0 else (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
        assert mask_bbox(mask) == expected


def test_grow_box_clips_to_the_picture():
    assert grow_box((2, 3, 5, 6), 4, (8, 7)) == (0, 0, 8, 7)
    assert grow_box((2, 3, 5, 6), 1, (8, 7)) == (1, 2, 6, 7)


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 40])
def test_dilation_equals_brute_force(radius):
    rng = np.random.default_rng(radius)
    for shape in [(1, 1), (1, 13), (17, 9), (32, 45)]:
        mask = rng.random(shape) > 0.93
        mask[0, -1] = True  # a corner pixel: the edge must not wrap or pad with set pixels
        np.testing.assert_array_equal(dilate_mask(mask, radius), brute_dilate(mask, radius))


def test_dilation_of_an_empty_mask_is_empty():
    assert not dilate_mask(np.zeros((10, 12), dtype=bool), 3).any()


def brute_latent(mask, factor):
    height, width = mask.shape
    return np.array(
        [
            [
                mask[r * factor : (r + 1) * factor, c * factor : (c + 1) * factor].any()
                for c in range(-(-width // factor))
            ]
            for r in range(-(-height // factor))
        ]
    )


@pytest.mark.parametrize("factor", [1, 2, 8])
def test_latent_grid_any_coverage(factor):
    rng = np.random.default_rng(factor)
    for shape in [(8, 8), (17, 9), (33, 70)]:
        mask = rng.random(shape) > 0.97
        expected = brute_latent(mask, factor)
        np.testing.assert_array_equal(latent_mask(mask, factor), expected)
        tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
        np.testing.assert_array_equal(latent_mask_tensor(tensor, factor)[0, 0].numpy() > 0, expected)


def test_one_masked_pixel_marks_exactly_its_latent():
    mask = np.zeros((64, 64), dtype=bool)
    mask[17, 40] = True
    grid = latent_mask(mask, 8)
    assert grid.sum() == 1 and grid[2, 5]


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (40, 23), (100, 90)])
def test_resize_keeps_every_masked_pixel(size):
    rng = np.random.default_rng(sum(size))
    height, width = 48, 36
    mask = rng.random((height, width)) > 0.98
    out = resize_mask_any(mask, size)
    assert out.shape == size
    out_h, out_w = size
    for r, c in zip(*np.nonzero(mask), strict=True):
        # the output cells whose area-interpolation footprint holds pixel (r, c)
        rows = [i for i in range(out_h) if (i * height) // out_h <= r < -((-(i + 1) * height) // out_h)]
        cols = [j for j in range(out_w) if (j * width) // out_w <= c < -((-(j + 1) * width) // out_w)]
        assert rows and cols
        assert out[np.ix_(rows, cols)].all()
    assert not resize_mask_any(np.zeros((height, width), dtype=bool), size).any()


def test_resize_marks_only_cells_that_cover_a_masked_pixel():
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:12, 30] = True
    out = resize_mask_any(mask, (10, 10))  # 4x4 px a cell
    assert out.sum() == 1 and out[2, 7]


def test_feather_stays_inside_the_mask():
    mask = np.zeros((40, 50), dtype=bool)
    mask[8:30, 10:45] = True
    alpha = feather_alpha(mask, 4)
    assert (alpha[~mask] == 0).all()
    assert alpha.max() == pytest.approx(1.0) and (alpha[mask] > 0).all()
    box = mask_bbox(mask)
    np.testing.assert_allclose(feather_alpha_at(mask, box, 4), alpha[box[0] : box[2], box[1] : box[3]], atol=1e-6)
