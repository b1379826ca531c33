"""The random training masks: every kind, their promises, reproducibility and the mix."""

from collections import Counter

import numpy as np
import pytest

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
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].mean() > 0.3
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
