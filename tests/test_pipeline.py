"""The two-stage pipeline and its baselines on the tiny backbone."""

import numpy as np
import pytest
import torch

from conftest import box_mask, random_image, seeded
from patch_adapter import PatchAdapterPipeline
from patch_adapter.adapters import adapter_processors
from patch_adapter.backbone import BackboneLoadError, check_inpainting_backbone, load_backbone
from patch_adapter.image_io import ImageInputError, MaskSizeError
from patch_adapter.planning import METHODS

FAST = dict(num_inference_steps=2, strength=1.0, refine_steps=2, guidance_scale=1.0)


def two_masks(height, width):
    """A fill inside the picture and one at its bottom-right border."""
    mask = box_mask(height, width, height // 2 - 60, width // 3, height // 2 + 37, width // 3 + 101)
    mask[height - 23 :, width - 45 :] = True
    return mask


@pytest.fixture(scope="module")
def big_images():
    return {size: random_image(*size, seed=sum(size)) for size in ((4096, 4096), (2999, 4001))}


@pytest.mark.parametrize("size", [(4096, 4096), (2999, 4001)], ids=["4096x4096", "4001x2999"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "direct"])
def test_outside_the_mask_is_bit_identical_at_4k(pipe, big_images, size, method):
    image = big_images[size]
    mask = two_masks(*size)
    result = pipe(prompt="a red ball", image=image, mask_image=mask, method=method, generator=seeded(0), **FAST)
    out = result.arrays[0]
    assert out.shape == image.shape and out.dtype == image.dtype
    assert np.array_equal(out[~mask], image[~mask])
    assert np.abs(out[mask].astype(int) - image[mask].astype(int)).mean() > 10  # the fill was generated


@pytest.mark.slow
@pytest.mark.parametrize("size", [(4096, 4096), (2999, 4001)], ids=["4096x4096", "4001x2999"])
def test_direct_outside_the_mask_is_bit_identical_at_4k(pipe, big_images, size):
    """The direct baseline runs the UNet on the whole 4K latent: one step costs 2-4 minutes on a CPU.

    Both sizes are slow-marked (`make test-all`): at 4096x4096 alone it took 11 minutes of
    one worker once batch, web and input tests joined the suite; the direct baseline's
    bit-exactness stays in `make test` at a small odd size (test_every_method_at_an_odd_size),
    and every other method runs at 4K in the test above.
    """
    image, mask = big_images[size], two_masks(*size)
    out = pipe(
        prompt="a red ball",
        image=image,
        mask_image=mask,
        method="direct",
        generator=seeded(0),
        num_inference_steps=1,
        strength=1.0,
        guidance_scale=1.0,
    ).arrays[0]
    assert np.array_equal(out[~mask], image[~mask])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_at_an_odd_size(pipe, method):
    image = random_image(301, 457, seed=3)
    mask = two_masks(301, 457)
    result = pipe(prompt="a cat", image=image, mask_image=mask, method=method, generator=seeded(1), **FAST)
    out = result.arrays[0]
    assert np.array_equal(out[~mask], image[~mask])
    assert np.abs(out[mask].astype(int) - image[mask].astype(int)).mean() > 10


def test_untrained_dca_with_rpa_off_is_the_two_stage_baseline(pipe):
    """The only difference between patch-adapter and two-stage is the adapters."""
    image, mask = random_image(300, 420, seed=4), two_masks(300, 420)
    kwargs = dict(prompt="a dog", image=image, mask_image=mask, num_inference_steps=3, refine_steps=3)
    ours = pipe(method="patch-adapter", rpa_scale=0.0, generator=seeded(2), **kwargs).arrays[0]
    two_stage = pipe(method="two-stage", generator=seeded(2), **kwargs).arrays[0]
    assert np.array_equal(ours, two_stage)
    with_rpa = pipe(method="patch-adapter", rpa_scale=1.0, generator=seeded(2), **kwargs).arrays[0]
    assert np.abs(with_rpa[mask].astype(int) - ours[mask].astype(int)).max() > 0


def test_trained_adapter_weights_change_the_result(pipe):
    image, mask = random_image(300, 420, seed=5), two_masks(300, 420)
    kwargs = dict(prompt="a dog", image=image, mask_image=mask, **FAST)
    before = pipe(generator=seeded(3), **kwargs).arrays[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for proc in adapter_processors(pipe.unet, ["dca"]).values():
            proc.to_v_ctx.weight.copy_(torch.randn(proc.to_v_ctx.weight.shape, generator=gen) * 0.1)
    after = pipe(generator=seeded(3), **kwargs).arrays[0]
    assert not np.array_equal(before, after)
    off = pipe(generator=seeded(3), dca_scale=0.0, **kwargs).arrays[0]
    assert np.array_equal(before, off)


def test_the_dca_acts_in_stage_one_only(pipe, monkeypatch):
    """Stage 2's patches run without the DCA: in them it halved the fills' sharpness (docs/method.md)."""
    from patch_adapter.adapters.dual_context import DualContextAttnProcessor

    events = []  # "dca" or "none" per cross-attention call, ("step", stage) after each scheduler step
    call = DualContextAttnProcessor.__call__

    def recording(self, attn, hidden_states, *args, dca_mask=None, dca_scale=1.0, **kwargs):
        if not hidden_states.is_meta:  # the memory estimate's traced calls are not run
            events.append("dca" if dca_mask is not None and dca_scale != 0 else "none")
        return call(self, attn, hidden_states, *args, dca_mask=dca_mask, dca_scale=dca_scale, **kwargs)

    def step_end(p, step, t, kwargs):
        events.append(("step", kwargs["stage"]))
        return {}

    monkeypatch.setattr(DualContextAttnProcessor, "__call__", recording)
    image, mask = random_image(300, 420, seed=5), two_masks(300, 420)
    out = pipe(prompt="a dog", image=image, mask_image=mask, generator=seeded(3), callback_on_step_end=step_end, **FAST)
    calls_by_stage = {1: set(), 2: set()}
    pending = []
    for event in events:
        if isinstance(event, tuple):
            calls_by_stage[event[1]].update(pending)
            pending = []
        else:
            pending.append(event)
    assert out.plan.stage2_steps > 0 and not pending
    assert calls_by_stage == {1: {"dca"}, 2: {"none"}}


def test_same_seed_same_result_and_several_images_differ(pipe):
    image, mask = random_image(200, 260, seed=6), two_masks(200, 260)
    kwargs = dict(prompt="a bench", image=image, mask_image=mask, **FAST)
    first = pipe(generator=seeded(7), **kwargs).arrays[0]
    again = pipe(generator=seeded(7), **kwargs).arrays[0]
    assert np.array_equal(first, again)
    several = pipe(generator=seeded(7), num_images_per_prompt=2, **kwargs)
    assert len(several.images) == 2 and not np.array_equal(several.arrays[0], several.arrays[1])


def test_images_at_or_below_native_size_run_stage_one_only(pipe):
    image = random_image(96, 120, seed=8)
    mask = box_mask(96, 120, 10, 10, 60, 70)
    result = pipe(prompt="a ball", image=image, mask_image=mask, **FAST)
    assert not result.plan.tiles and result.plan.stage1_size == (120, 96)
    assert np.array_equal(result.arrays[0][~mask], image[~mask])


def test_empty_mask_returns_the_image_unchanged_without_running(pipe, monkeypatch):
    image = random_image(300, 300, seed=9)

    def no_unet(*args, **kwargs):
        raise AssertionError("the UNet ran for an empty mask")

    monkeypatch.setattr(pipe.unet, "forward", no_unet)
    result = pipe(prompt="x", image=image, mask_image=np.zeros((300, 300), dtype=bool))
    assert np.array_equal(result.arrays[0], image) and result.plan.unet_forwards == 0


def test_sixteen_bit_input_stays_sixteen_bit(pipe):
    image = random_image(200, 300, seed=10, dtype=np.uint16)
    mask = two_masks(200, 300)
    out = pipe(prompt="x", image=image, mask_image=mask, generator=seeded(0), **FAST).arrays[0]
    assert out.dtype == np.uint16 and np.array_equal(out[~mask], image[~mask])
    assert len(np.unique(out[mask] % 257)) > 1  # real 16-bit values, not 8-bit ones scaled up


def test_mask_from_alpha_and_dilation_keep_outside_pixels(pipe):
    rgb = random_image(200, 300, seed=11)
    alpha = np.full((200, 300), 255, dtype=np.uint8)
    alpha[50:120, 80:200] = 0  # transparent = fill
    rgba = np.dstack([rgb, alpha])
    result = pipe(
        prompt="x", image=rgba, mask_image=None, mask_dilation=24, mask_feather=6, generator=seeded(0), **FAST
    )
    out = result.arrays[0]
    assert result.images[0].mode == "RGBA" and np.array_equal(np.asarray(result.images[0]), out)
    mask = alpha == 0
    assert out.shape == (200, 300, 4)
    assert np.array_equal(out[~mask], rgba[~mask])  # alpha included
    assert np.abs(out[mask][:, :3].astype(int) - rgb[mask].astype(int)).mean() > 10
    assert (out[mask][:, 3] > 0).all()  # the fill shows: opaque, blended where feathered


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="magic"), "unknown method 'magic'"),
        (dict(strength=0.0), "strength must be in"),
        (dict(refine_strength=1.5), "refine_strength must be in"),
        (dict(num_inference_steps=1, strength=0.5), "leaves no denoising step"),
        (dict(tile_size=100), "multiple of 8"),
        (dict(tile_size=64, tile_overlap=64), "must be smaller than tile_size"),
        (dict(mask_feather=-1), "mask_feather must be at least 0"),
        (dict(mask_feather=20), "erases the whole fill"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(dca_scale=float("nan")), "dca_scale must be a finite number"),
        (dict(rpa_scale=float("nan")), "rpa_scale must be a finite number"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be a whole number"),
        (dict(prompt=3), "prompt must be a string"),
        (dict(num_images_per_prompt=0), "at least 1"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(pipe, kwargs, message):
    image, mask = random_image(200, 200), box_mask(200, 200, 10, 10, 50, 50)
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "x", "image": image, "mask_image": mask, **kwargs})


def test_mask_of_another_size_names_both_sizes(pipe):
    with pytest.raises(MaskSizeError, match="mask is 200x100 but the image is 300x200"):
        pipe(prompt="x", image=random_image(200, 300), mask_image=np.zeros((100, 200), dtype=bool))
    with pytest.raises(ImageInputError, match="no alpha channel"):
        pipe(prompt="x", image=random_image(200, 300))


def test_plan_mode_counts_without_running(pipe):
    image = random_image(1024, 2048)
    mask = box_mask(1024, 2048, 100, 100, 400, 500)
    plan = pipe.plan(image, mask, num_inference_steps=20, refine_steps=10, refine_strength=0.5)
    n = len(plan.tiles)
    assert n > 1 and plan.stage1_steps == 19 and plan.stage2_steps == 5
    assert plan.unet_forwards == 19 + n * 5 + n  # stage 1, patches, one reference pass per patch
    assert f"patches: {n} of 128 px" in plan.describe()


def test_diffusers_folder_round_trip_without_adapters(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    from safetensors.torch import load_file

    saved = load_file(str(next((tmp_path / "model" / "unet").glob("*.safetensors"))))
    assert not any(".processor." in key for key in saved)  # adapters go to their own file
    pipe.check_adapters()  # and are still in place after saving
    loaded = PatchAdapterPipeline.from_pretrained(str(tmp_path / "model"), device="cpu")
    loaded.set_progress_bar_config(disable=True)
    loaded.set_scheduler("euler")
    image, mask = random_image(200, 260, seed=12), two_masks(200, 260)
    a = pipe(prompt="x", image=image, mask_image=mask, generator=seeded(0), **FAST).arrays[0]
    b = loaded(prompt="x", image=image, mask_image=mask, generator=seeded(0), **FAST).arrays[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same weights; float kernels may differ by 1/255


def test_backbone_sources_fail_with_what_to_do(tmp_path):
    with pytest.raises(BackboneLoadError, match="hf download someone/missing-model"):
        load_backbone("someone/missing-model", local_files_only=True)
    with pytest.raises(BackboneLoadError, match="no model_index.json"):
        load_backbone(str(tmp_path))
    with pytest.raises(BackboneLoadError, match="does not exist"):
        load_backbone(str(tmp_path / "sdxl.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BackboneLoadError, match="single-file checkpoint"):
        load_backbone(str(tmp_path / "broken.safetensors"), local_files_only=True)
    with pytest.raises(BackboneLoadError, match="neither 'tiny'"):
        load_backbone("not a model")


def test_text_to_image_unet_is_refused():
    components = load_backbone("tiny")
    components["unet"].register_to_config(in_channels=4)
    with pytest.raises(BackboneLoadError, match="4 input channels"):
        check_inpainting_backbone(components, "sdxl-base")


def test_the_inpainting_input_follows_the_vaes_latent_channels():
    """2 x latent channels + 1: 9 for SDXL's VAE, 33 for a 16-channel one; a UNet and VAE that disagree are refused."""
    components = load_backbone("tiny")
    components["vae"].register_to_config(latent_channels=16)
    components["unet"].register_to_config(in_channels=33, out_channels=16)
    assert check_inpainting_backbone(components, "16 channels") is components
    components["unet"].register_to_config(in_channels=9, out_channels=4)
    with pytest.raises(BackboneLoadError, match="predicts 4 channels but a VAE with 16"):
        check_inpainting_backbone(components, "mixed")


@pytest.mark.parametrize("method", ["patch-adapter", "tiled"])
def test_batched_patches_agree_with_one_at_a_time(pipe, method):
    image, mask = random_image(300, 420, seed=13), two_masks(300, 420)
    kwargs = dict(prompt="a dog", image=image, mask_image=mask, method=method, num_inference_steps=3, refine_steps=3)
    with torch.no_grad():
        for proc in adapter_processors(pipe.unet).values():  # trained-like adapters, so batching is exercised
            for p in proc.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    single = pipe(patch_batch_size=1, generator=seeded(4), **kwargs)
    batched = pipe(patch_batch_size=3, generator=seeded(4), **kwargs)
    assert len(single.plan.tiles) > 3
    diff = np.abs(single.arrays[0].astype(int) - batched.arrays[0].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05
