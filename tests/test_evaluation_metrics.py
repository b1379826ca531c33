"""Quality metrics: each checked against its definition and against a case whose answer is known."""

import dataclasses
from itertools import pairwise

import numpy as np
import pytest

from patch_adapter.evaluation.metrics import (
    block_differences,
    box_count,
    gaussian_filter,
    gaussian_kernel,
    outside_change,
    psnr_in_mask,
    seam_strength,
    sharpness_ratio,
    ssim_in_mask,
    ssim_map,
    tile_seam_strength,
)
from patch_adapter.evaluation.scoring import score_result
from patch_adapter.evaluation.tasks import MASK_KINDS, make_task
from patch_adapter.masks import dilate_mask
from patch_adapter.tiny_world.scenes import render_scene


@pytest.fixture(scope="module")
def removals():
    """Remove tasks over all textures and mask kinds; their truth is an untouched picture."""
    return [make_task("remove", seed, 384, 384, mask_kind=MASK_KINDS[seed % 3]) for seed in range(9)]


def fill(image, mask, content):
    """`content` inside the mask, `image` outside, as uint8."""
    return np.where(mask[:, :, None], np.clip(np.rint(content), 0, 255), image).astype(np.uint8)


def noisy(image, sigma, seed=0):
    return image.astype(np.float64) + np.random.default_rng(seed).normal(0, sigma, image.shape)


# --- PSNR / SSIM ---------------------------------------------------------------------


def test_identity_gives_infinite_psnr_and_unit_ssim(removals):
    task = removals[0]
    assert psnr_in_mask(task.truth, task.truth, task.mask) == float("inf")
    assert ssim_in_mask(task.truth, task.truth, task.mask) == 1.0


def test_psnr_of_a_constant_error():
    truth = np.full((32, 32, 3), 100, dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 4:30] = True
    result = truth.copy()
    result[mask] += 5
    result[~mask] = 0  # outside the mask does not count
    assert psnr_in_mask(result, truth, mask) == pytest.approx(10 * np.log10(255**2 / 25))


@pytest.mark.parametrize("index", [1, 4])
def test_psnr_and_ssim_fall_as_noise_grows(removals, index):
    task = removals[index]
    psnrs, ssims = [], []
    for sigma in (2, 5, 10, 20, 40):
        result = fill(task.truth, task.mask, noisy(task.truth, sigma))
        psnrs.append(psnr_in_mask(result, task.truth, task.mask))
        ssims.append(ssim_in_mask(result, task.truth, task.mask))
    assert all(a > b for a, b in pairwise(psnrs)), psnrs
    assert all(a > b for a, b in pairwise(ssims)), ssims
    assert 0 < ssims[-1] < 0.5 < ssims[0] < 1


def test_ssim_map_matches_the_definition_pixel_by_pixel():
    """Parity with a direct evaluation of Wang et al.'s formula under an explicit 11x11 gaussian window."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (40, 40))
    y = np.clip(x + rng.normal(0, 25, x.shape), 0, 255)
    values = ssim_map(x, y)
    taps = gaussian_kernel(1.5, 5)
    window = np.outer(taps, taps)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    for r, c in [(5, 5), (20, 17), (34, 30)]:
        a, b = x[r - 5 : r + 6, c - 5 : c + 6], y[r - 5 : r + 6, c - 5 : c + 6]
        mu_a, mu_b = (window * a).sum(), (window * b).sum()
        var_a, var_b = (window * (a - mu_a) ** 2).sum(), (window * (b - mu_b) ** 2).sum()
        cov = (window * (a - mu_a) * (b - mu_b)).sum()
        expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        assert values[r, c] == pytest.approx(expected, rel=1e-9)


def test_gaussian_filter_keeps_constants_and_mass():
    kernel = gaussian_kernel(1.5, 5)
    assert kernel.sum() == pytest.approx(1.0) and len(kernel) == 11
    assert np.allclose(gaussian_filter(np.full((20, 30), 7.0), kernel), 7.0)


def test_ssim_ignores_pixels_beyond_the_window(removals):
    task = removals[2]
    result = fill(task.truth, task.mask, noisy(task.truth, 10))
    far = ~dilate_mask(task.mask, 6)
    changed = result.copy()
    changed[far] = 255 - changed[far]
    assert ssim_in_mask(changed, task.truth, task.mask) == ssim_in_mask(result, task.truth, task.mask)
    assert psnr_in_mask(changed, task.truth, task.mask) == psnr_in_mask(result, task.truth, task.mask)


# --- sharpness -----------------------------------------------------------------------


def test_sharpness_is_one_for_an_untouched_picture(removals):
    for task in removals:
        assert 0.85 < sharpness_ratio(task.truth, task.mask) < 1.15


def test_sharpness_drops_for_a_blurred_fill_and_rises_for_a_noisy_one(removals):
    for task in removals:
        blurred = fill(task.truth, task.mask, gaussian_filter(task.truth.astype(np.float64), gaussian_kernel(1.0, 3)))
        assert sharpness_ratio(blurred, task.mask) < 0.3
        assert sharpness_ratio(fill(task.truth, task.mask, noisy(task.truth, 12)), task.mask) > 1.15


# --- seams ---------------------------------------------------------------------------


def test_block_differences_at_scale_one_are_neighbour_differences():
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3)).astype(np.uint8)
    across_x, across_y = block_differences(image, scale=1)
    assert np.allclose(across_x, np.abs(np.diff(image.astype(float), axis=1)).mean(axis=-1))
    assert np.allclose(across_y, np.abs(np.diff(image.astype(float), axis=0)).mean(axis=-1))


def test_block_differences_see_a_step_at_any_scale():
    image = np.zeros((30, 30, 3))
    image[:, 15:] = 30
    for scale in (1, 2, 3, 5):
        across_x, across_y = block_differences(image, scale)
        assert across_x[:, 14] == pytest.approx(30) and np.abs(across_y).max() == 0
        assert across_x[:, 14 - scale].max() == 0 and across_x[:, 14 + scale].max() == 0


def test_box_count_and_dilate_match_brute_force():
    binary = np.random.default_rng(1).random((19, 13)) > 0.8
    for radius in (1, 2, 4):
        padded = np.pad(binary, radius)
        expected = np.array(
            [[padded[r : r + 2 * radius + 1, c : c + 2 * radius + 1].sum() for c in range(13)] for r in range(19)]
        )
        assert np.array_equal(box_count(binary, radius), expected)
        assert np.array_equal(dilate_mask(binary, radius), expected > 0)


def test_seam_is_natural_for_an_untouched_picture(removals):
    for task in removals:
        assert 0.7 < seam_strength(task.truth, task.mask) < 1.3


def test_seam_is_strong_for_a_pasted_offset_patch(removals):
    for task in removals:
        brighter = fill(task.truth, task.mask, task.truth.astype(np.float64) + 25)
        assert seam_strength(brighter, task.mask) > 2.5
        # a patch from another place of another picture, both shifted and re-toned
        elsewhere = np.roll(task.truth.astype(np.float64), (37, 51), axis=(0, 1))[:, :, ::-1] * 0.85
        assert seam_strength(fill(task.truth, task.mask, elsewhere), task.mask) > 2.5


def test_tile_seams_natural_when_untouched_strong_when_tiles_disagree(removals):
    """On bare backgrounds (a tile border along an object's edge is an edge, not a seam)."""
    borders = (96, 192, 288)
    region = np.zeros((384, 384), dtype=bool)
    region[20:-20, 20:-20] = True  # a large fill, with a ring of untouched picture around it
    tiles = np.indices((384, 384)) // 96
    checker = np.where((tiles[0] + tiles[1]) % 2 == 0, 12.0, -12.0)[:, :, None]
    for task in removals:
        bare = render_scene(dataclasses.replace(task.scene, objects=()))
        assert 0.8 < tile_seam_strength(bare, borders, borders) < 1.25
        assert 0.8 < tile_seam_strength(bare, borders, borders, region) < 1.25
        toned = fill(bare, region, bare.astype(np.float64) + checker)
        assert tile_seam_strength(toned, borders, borders, region) > 2.5
        assert seam_strength(toned, region) < tile_seam_strength(toned, borders, borders, region)


def test_tile_seams_only_count_inside_the_mask():
    image = np.random.default_rng(0).integers(100, 140, (64, 64, 3)).astype(np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:30, 10:30] = True
    assert np.isnan(tile_seam_strength(image, (40,), (40,), mask))  # borders miss the mask
    stepped = image.copy()
    stepped[:, 20:] += 30
    assert tile_seam_strength(stepped, (), (20,), mask) > 3
    assert np.isnan(seam_strength(image, np.zeros((64, 64), dtype=bool)))


# --- outside the mask ----------------------------------------------------------------


def test_outside_change_is_exact():
    original = np.random.default_rng(0).integers(0, 256, (50, 60, 3)).astype(np.uint8)
    mask = np.zeros((50, 60), dtype=bool)
    mask[10:20, 10:40] = True
    result = original.copy()
    result[mask] = 0
    assert outside_change(result, original, mask) == (0, 0.0)
    result[0, 0, 1] ^= 1
    result[49, 59] = original[49, 59].astype(int) - np.array([0, 0, 3]) % 256
    changed = outside_change(result, original, mask)
    assert changed.pixels == 2 and changed.max_abs == max(
        1.0, float(np.abs(result[49, 59].astype(int) - original[49, 59].astype(int)).max())
    )
    assert outside_change(original.astype(np.float32) / 255, original.astype(np.float32) / 255, mask) == (0, 0.0)
    with pytest.raises(ValueError):
        outside_change(result[:, :-1], original, mask)


def test_uint8_wraparound_does_not_hide_changes():
    original = np.zeros((4, 4, 3), dtype=np.uint8)
    result = original.copy()
    result[0, 0, 0] = 255  # 0 - 255 would wrap to 1 in uint8
    assert outside_change(result, original, np.zeros((4, 4), dtype=bool)) == (1, 255.0)


# --- the whole record ----------------------------------------------------------------


def test_score_of_the_truth_is_perfect_and_of_the_input_is_not():
    for kind in ("insert", "remove"):
        task = make_task(kind, 5, 384, 384, mask_kind="box")
        perfect = score_result(task, task.truth, tile_rows=(128, 256), tile_cols=(128, 256))
        assert perfect["psnr"] == float("inf") and perfect["ssim"] == 1.0
        assert perfect["prompt_followed"] and perfect["outside_changed_pixels"] == 0
        assert perfect["seam"] == perfect["seam_truth"] and perfect["sharpness"] == perfect["sharpness_truth"]
        unchanged = score_result(task, task.image)
        assert not unchanged["prompt_followed"] and unchanged["psnr"] < 30 and unchanged["tile_seam"] is None
        spoiled = task.truth.copy()
        spoiled[~task.mask] //= 2
        assert score_result(task, spoiled)["outside_changed_pixels"] > 0
