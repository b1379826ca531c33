"""Tile planning, fusion windows, mask resizing and compositing: pure functions, no model."""

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patch_adapter.compositing import composite
from patch_adapter.masks import feather_alpha, latent_mask, resize_mask_any
from patch_adapter.planning import make_plan, native_dims
from patch_adapter.resampling import sample_region
from patch_adapter.settings import InpaintSettings
from patch_adapter.tiling import TileFusion, plan_tiles, tile_starts, tile_window, tiles_touching


@pytest.mark.parametrize("length, tile, overlap", [(16, 16, 4), (17, 16, 4), (100, 16, 4), (129, 128, 32), (5, 16, 4)])
def test_tiles_cover_every_position_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, dtype=int)
    for s in starts:
        covered[s : s + tile] += 1
    assert covered.min() >= 1 and starts[0] == 0 and min(length, starts[-1] + tile) == length
    for a, b in pairwise(starts):
        assert a + tile - b >= overlap  # neighbours overlap by at least `overlap`


def test_tile_starts_refuses_overlap_not_below_tile():
    with pytest.raises(ValueError, match="tile > overlap"):
        tile_starts(100, 16, 16)


def test_only_tiles_touching_the_mask_are_kept():
    mask = np.zeros((64, 96), dtype=bool)
    mask[20:22, 50:53] = True
    tiles = tiles_touching(plan_tiles(mask.shape, 16, 4), mask)
    assert tiles
    for t in plan_tiles(mask.shape, 16, 4):
        assert (t in tiles) == bool(mask[t.slices].any())


def test_windows_are_positive_and_fusion_is_a_weighted_average():
    canvas = (40, 56)
    tiles = plan_tiles(canvas, 16, 6)
    windows = [tile_window(t, canvas, 6) for t in tiles]
    fusion = TileFusion((1, 2, *canvas), windows, tiles)
    assert fusion.covered.all()
    # a constant prediction everywhere fuses to that constant (weights normalised)
    fused = fusion.fuse([torch.full((1, 2, t.height, t.width), 3.0) for t in tiles])
    torch.testing.assert_close(fused, torch.full((1, 2, *canvas), 3.0))
    # tiles that each predict a smooth function of position reproduce it
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(56.0), indexing="ij")
    field = (ys * 0.3 + xs * 0.1)[None, None].expand(1, 2, -1, -1)
    fused = fusion.fuse([field[(..., *t.slices)] for t in tiles])
    torch.testing.assert_close(fused, field)
    # window edges on the canvas border keep full weight, inner edges ramp
    first = windows[0]
    assert first[0, 0] == 1 and first[-1, -1] < 0.5


@pytest.mark.parametrize("size", [(37, 53), (8, 8), (128, 64)])
def test_mask_resize_loses_no_masked_pixel(size):
    rng = np.random.default_rng(0)
    mask = rng.random((301, 457)) > 0.997  # isolated single pixels
    small = resize_mask_any(mask, size)
    area = F.interpolate(torch.from_numpy(mask.astype(np.float64))[None, None], size=size, mode="area")[0, 0]
    expected = (area > 0).numpy()
    assert np.array_equal(small, expected)


def test_latent_mask_counts_partial_latents():
    mask = np.zeros((17, 9), dtype=bool)
    mask[16, 8] = True
    lat = latent_mask(mask, 8)
    assert lat.shape == (3, 2) and lat[2, 1] and lat.sum() == 1


def test_sample_region_equals_full_upsample_then_crop():
    low = torch.rand(1, 3, 12, 17)
    full = F.interpolate(low, size=(97, 131), mode="bicubic", align_corners=False).clamp(0, 1)
    box = (10, 20, 60, 131)
    region = sample_region(low, (97, 131), box)
    expected = full[0, :, 10:60, 20:131].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(region, expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_composite_changes_nothing_outside_the_mask(dtype):
    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    original = rng.integers(0, top + 1, size=(50, 70, 3)).astype(dtype)
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:25, 3:37] = True
    fill = rng.random((30, 40, 3)).astype(np.float32)
    alpha = feather_alpha(mask, 4)
    out = composite(original, fill, mask, alpha, offset=(10, 20))
    outside = np.ones((50, 70), dtype=bool)
    outside[10:40, 20:60] = ~mask
    assert np.array_equal(out[outside], original[outside])
    assert not np.array_equal(out[10:40, 20:60][mask], original[10:40, 20:60][mask])
    assert np.all(alpha[~mask] == 0) and alpha[mask].max() == 1.0 and alpha[mask].min() < 0.5
    assert original.base is None or not np.shares_memory(out, original)


PLAN_SETTINGS = InpaintSettings(num_inference_steps=20, tile_size=128, tile_overlap=32, crop_margin=16)


def plan_for(size, mask_box, method="patch-adapter", native=128):
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    top, left, bottom, right = mask_box
    mask[top:bottom, left:right] = True
    return make_plan(PLAN_SETTINGS.replace(method=method), (width, height), mask, native)


@pytest.mark.parametrize("method", ["patch-adapter", "tiled", "two-stage"])
def test_unet_evaluations_do_not_grow_with_image_size(method):
    counts = {
        side: plan_for((side, side), (300, 200, 420, 370), method).unet_evaluations
        for side in (1024, 2048, 4096, 8192, 16384)
    }
    assert len(set(counts.values())) == 1, counts
    # ... but they do grow with the mask
    assert plan_for((4096, 4096), (300, 200, 1300, 1370), method).unet_evaluations > counts[4096]


def test_small_images_run_one_whole_image_pass():
    plan = plan_for((128, 96), (10, 10, 50, 50))
    assert plan.stage1_size == (128, 96) and not plan.tiles and plan.stage1_steps == 19
    plan = plan_for((121, 131), (10, 10, 50, 50))  # odd size below native: padded to the latent grid
    assert plan.stage1_size == (128, 136) and not plan.tiles
    plan = plan_for((130, 127), (10, 10, 50, 50))  # just above native pixel count: two stages
    assert plan.stage1_size == (128, 128) and plan.tiles


def test_stage1_size_keeps_aspect_at_the_native_pixel_count():
    for width, height in ((4001, 2999), (8192, 5464), (3840, 2160), (1000, 4000)):
        w, h = native_dims(width, height, 1024)
        assert w % 8 == 0 and h % 8 == 0
        assert abs(w * h / 1024**2 - 1) < 0.03
        assert abs((w / h) / (width / height) - 1) < 0.03


def test_empty_mask_plans_no_work():
    plan = plan_for((512, 512), (0, 0, 0, 0))
    assert plan.empty_mask and plan.unet_forwards == 0 and "unchanged" in plan.describe()


def test_tiles_far_apart_form_separate_groups():
    from patch_adapter.tiling import group_tiles, overlaps

    mask = np.zeros((200, 300), dtype=bool)
    mask[10:14, 10:14] = True
    mask[180:190, 280:290] = True
    mask[100:102, 20:120] = True  # a line touching several tiles in a row
    tiles = tiles_touching(plan_tiles(mask.shape, 16, 4), mask)
    groups = group_tiles(tiles)

    def key(t):
        return t.top, t.left

    assert sorted((t for g in groups for t in g), key=key) == sorted(tiles, key=key)
    assert len(groups) == 3
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            assert not any(overlaps(s, t) for s in a for t in b)


def test_plan_regions_follow_the_masks_not_the_box_around_them():
    mask = np.zeros((4096, 4096), dtype=bool)
    mask[100:200, 100:200] = True
    mask[3900:4000, 3900:4000] = True
    plan = make_plan(PLAN_SETTINGS, (4096, 4096), mask, 128)
    area = sum(r.height * r.width for r in plan.regions)  # latents encoded and decoded
    assert len(plan.regions) == 2 and area < 0.02 * 512 * 512
    assert "patch region" in plan.describe()


@pytest.mark.parametrize("factor", [8, 4])
def test_patches_are_planned_on_the_vaes_latent_grid_and_cover_the_mask(factor):
    """The tiny world's f4 VAE has 4 px per latent: tiles planned on SDXL's 8 px grid would cover the wrong area."""
    mask = np.zeros((512, 640), dtype=bool)
    mask[300:460, 420:600] = True
    plan = make_plan(PLAN_SETTINGS, (640, 512), mask, 128, latent_factor=factor)
    covered = np.zeros_like(mask)
    for t in plan.tiles:
        assert (t.height * factor, t.width * factor) == (128, 128)  # tile_size px, whatever the factor
        covered[t.top * factor : (t.top + t.height) * factor, t.left * factor : (t.left + t.width) * factor] = True
    assert covered[mask].all() and covered.mean() < 0.5
    assert plan.latent_factor == factor and f"top={plan.tiles[0].top * factor} " in plan.describe()
    with pytest.raises(ValueError, match="must divide 8"):
        make_plan(PLAN_SETTINGS, (640, 512), mask, 128, latent_factor=16)


def test_feather_in_a_tight_box_equals_feather_of_the_whole_mask():
    from patch_adapter.masks import feather_alpha_at

    mask = np.zeros((120, 160), dtype=bool)
    mask[30:70, 40:100] = True
    mask[0:20, 150:160] = True  # touching the image border: no ramp there
    whole = feather_alpha(mask, 5)
    for box in ((30, 40, 70, 100), (0, 150, 20, 160), (25, 35, 75, 105)):
        top, left, bottom, right = box
        np.testing.assert_array_equal(feather_alpha_at(mask, box, 5), whole[top:bottom, left:right])
    assert whole[30, 60] < 0.5 and whole[50, 70] == 1.0 and whole[0, 159] > 0.8
