"""The call contract of a diffusers drop-in: every stock argument, batches, callbacks, outputs.

In the spirit of diffusers' `test_pipelines_common.py` and the SDXL-inpainting fast tests,
on the tiny backbone, at a size where both stages run (160 px > the 128 px native size).
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline

from conftest import box_mask, random_image, seeded
from patch_adapter import PatchAdapterPipeline
from patch_adapter.pipeline import DIFFUSERS_KNOB_DEFAULTS
from patch_adapter.settings import InpaintSettings

FAST = dict(num_inference_steps=2, strength=1.0, refine_steps=2)
SIZE = 160


def inputs(seed=0, size=SIZE):
    return random_image(size, size, seed=seed), box_mask(size, size, 40, 50, 120, 130)


def outside_equal(result, image, mask):
    return np.array_equal(result[~mask], image[~mask])


def test_every_stock_argument_is_accepted():
    ours = inspect.signature(PatchAdapterPipeline.__call__).parameters
    stock = inspect.signature(StableDiffusionXLInpaintPipeline.__call__).parameters
    missing = [name for name in stock if name not in ours and name not in ("self", "kwargs")]
    assert not missing
    # in the stock order, so positional calls mean the same
    names = [n for n in ours if n in stock]
    assert names == [n for n in stock if n in ours]
    # the arguments that are also settings default to the settings' defaults, as the stock ones do
    for name, default in DIFFUSERS_KNOB_DEFAULTS.items():
        assert ours[name].default == stock[name].default == default, name


def test_unknown_keywords_are_refused(pipe):
    image, mask = inputs()
    with pytest.raises(TypeError, match="callback_steps"):
        pipe(prompt="x", image=image, mask_image=mask, callback_steps=1, **FAST)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_a_list_of_prompts_gives_one_result_each_equal_to_single_calls(pipe, guidance_scale):
    image, mask = inputs()
    kwargs = dict(image=image, mask_image=mask, guidance_scale=guidance_scale, **FAST)
    batch = pipe(prompt=["a red star", "a blue circle"], generator=[seeded(1), seeded(2)], **kwargs).arrays
    single = [
        pipe(prompt="a red star", generator=seeded(1), **kwargs).arrays[0],
        pipe(prompt="a blue circle", generator=seeded(2), **kwargs).arrays[0],
    ]
    assert len(batch) == 2
    for got, want in zip(batch, single, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert outside_equal(got, image, mask)
    assert not np.array_equal(batch[0], batch[1])  # the second prompt did not replace the first


def test_lists_of_images_and_masks_and_per_image_generators(pipe):
    (a, mask_a), (b, _) = inputs(1), inputs(2)
    mask_b = box_mask(SIZE, SIZE, 0, 0, 50, 60)
    out = pipe(
        prompt=["x", "y"],
        image=[a, b],
        mask_image=[mask_a, mask_b],
        num_images_per_prompt=2,
        generator=[seeded(i) for i in range(4)],
        guidance_scale=1.0,
        **FAST,
    )
    assert len(out.arrays) == 4 and len(out.plans) == 2
    assert outside_equal(out.arrays[0], a, mask_a) and outside_equal(out.arrays[1], a, mask_a)
    assert outside_equal(out.arrays[2], b, mask_b) and outside_equal(out.arrays[3], b, mask_b)
    assert not np.array_equal(out.arrays[0], out.arrays[1])  # each image its own generator
    with pytest.raises(ValueError, match="generators"):
        pipe(prompt=["x", "y"], image=a, mask_image=mask_a, generator=[seeded(0)] * 3, **FAST)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(prompt=["x", "y", "z"], image=[a, b], mask_image=mask_a, **FAST)


def test_tensors_and_float_arrays_are_taken_and_kept_exactly_outside_the_mask(pipe):
    image, mask = inputs(3)
    floats = image.astype(np.float32) / 255
    tensor = torch.from_numpy(floats).permute(2, 0, 1)
    mask_tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    from_uint8 = pipe(prompt="x", image=image, mask_image=mask, generator=seeded(0), guidance_scale=1.0, **FAST)
    signed = tensor[None] * 2 - 1  # diffusers' [-1, 1] convention, as a batch of one
    for source, exact in ((floats, True), (tensor, True), (signed, False)):
        out = pipe(
            prompt="x",
            image=source,
            mask_image=mask_tensor,
            generator=seeded(0),
            guidance_scale=1.0,
            output_type="np",
            **FAST,
        )
        result = out.arrays[0]
        assert result.dtype == np.float32
        if exact:  # the caller's own floats, to the bit
            assert np.array_equal(result[~mask], floats[~mask])
        else:  # what [-1, 1] maps back to
            assert np.abs(result[~mask] - floats[~mask]).max() < 1e-6
        # the fill is the one the 8-bit input gets, to float rounding
        assert np.abs(result[mask] - from_uint8.arrays[0][mask] / 255).max() < 2 / 255
        assert out.images.shape == (1, SIZE, SIZE, 3)


def test_output_types(pipe):
    image, mask = inputs()
    kwargs = dict(prompt="x", image=[image, image], mask_image=mask, guidance_scale=1.0, **FAST)
    as_np = pipe(output_type="np", generator=seeded(0), **kwargs).images
    as_pt = pipe(output_type="pt", generator=seeded(0), **kwargs).images
    as_pil = pipe(generator=seeded(0), **kwargs).images
    assert as_np.shape == (2, SIZE, SIZE, 3) and as_np.dtype == np.float32
    assert tuple(as_pt.shape) == (2, 3, SIZE, SIZE)
    assert np.array_equal(as_pt.permute(0, 2, 3, 1).numpy(), as_np)
    assert np.array_equal(np.asarray(as_pil[0]), np.rint(as_np[0] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="latent"):
        pipe(output_type="latent", **kwargs)
    (images,) = pipe(return_dict=False, **kwargs)
    assert len(images) == 2


def test_prompt_embeddings_give_the_prompts_result(pipe):
    image, mask = inputs()
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        "a red star", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="blur"
    )
    kwargs = dict(image=image, mask_image=mask, guidance_scale=5.0, **FAST)
    by_text = pipe(prompt="a red star", negative_prompt="blur", generator=seeded(4), **kwargs).arrays[0]
    by_embeds = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=neg,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=neg_pooled,
        generator=seeded(4),
        **kwargs,
    ).arrays[0]
    assert np.array_equal(by_text, by_embeds)
    with pytest.raises(ValueError, match="prompt or prompt_embeds"):
        pipe(prompt="x", prompt_embeds=embeds, pooled_prompt_embeds=pooled, **kwargs)


def test_prompt_2_reaches_the_second_encoder(pipe):
    image, mask = inputs()
    kwargs = dict(image=image, mask_image=mask, guidance_scale=1.0, **FAST)
    same = pipe(prompt="a red star", prompt_2="a red star", generator=seeded(0), **kwargs).arrays[0]
    plain = pipe(prompt="a red star", generator=seeded(0), **kwargs).arrays[0]
    other = pipe(prompt="a red star", prompt_2="a blue circle", generator=seeded(0), **kwargs).arrays[0]
    assert np.array_equal(same, plain) and not np.array_equal(other, plain)


def test_callback_on_step_end_is_called_in_every_stage_and_can_change_latents(pipe):
    image, mask = inputs()
    seen = []

    def callback(p, step, t, kwargs):
        assert p is pipe and step < p.num_timesteps
        seen.append(
            (
                kwargs["stage"],
                kwargs["patch_group"],
                kwargs["image_index"],
                step,
                tuple(kwargs["latents"].shape),
                kwargs["mask"].shape[1],
            )
        )
        return {"latents": kwargs["latents"]}

    out = pipe(
        prompt="x",
        image=image,
        mask_image=mask,
        generator=seeded(0),
        guidance_scale=1.0,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "mask"],
        **FAST,
    )
    plan = out.plan
    stage1 = [s for s in seen if s[0] == 1]
    stage2 = [s for s in seen if s[0] == 2]
    assert len(stage1) == plan.stage1_steps and all(s[1] is None for s in stage1)
    assert len(stage2) == plan.stage2_steps * len(plan.groups) and {s[1] for s in stage2} == set(
        range(len(plan.groups))
    )

    def zero(p, step, t, kwargs):  # a callback that changes the latents changes the result
        return {"latents": torch.zeros_like(kwargs["latents"])} if kwargs["stage"] == 2 else {}

    changed = pipe(
        prompt="x",
        image=image,
        mask_image=mask,
        generator=seeded(0),
        guidance_scale=1.0,
        callback_on_step_end=zero,
        **FAST,
    ).arrays[0]
    assert not np.array_equal(changed, out.arrays[0]) and outside_equal(changed, image, mask)

    def swap_embeds(p, step, t, kwargs):
        return {"prompt_embeds": kwargs["prompt_embeds"] * 0}

    with pytest.raises(ValueError, match="only 'latents'"):
        pipe(
            prompt="x",
            image=image,
            mask_image=mask,
            callback_on_step_end=swap_embeds,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
            **FAST,
        )
    with pytest.raises(ValueError, match="not available"):
        pipe(
            prompt="x",
            image=image,
            mask_image=mask,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["add_neg_time_ids"],
            **FAST,
        )


def test_a_callback_can_interrupt(pipe):
    image, mask = inputs()
    calls = []

    def stop(p, step, t, kwargs):
        calls.append(kwargs["stage"])
        p._interrupt = True
        return {}

    out = pipe(
        prompt="x",
        image=image,
        mask_image=mask,
        generator=seeded(0),
        guidance_scale=1.0,
        callback_on_step_end=stop,
        num_inference_steps=4,
        strength=1.0,
        refine_steps=4,
    )
    assert calls == [1] and pipe.interrupt  # stopped after the first step, before stage 2
    assert outside_equal(out.arrays[0], image, mask) and not np.array_equal(out.arrays[0][mask], image[mask])
    again = pipe(prompt="x", image=image, mask_image=mask, generator=seeded(0), guidance_scale=1.0, **FAST)
    assert not pipe.interrupt and pipe.num_timesteps > 0 and outside_equal(again.arrays[0], image, mask)


def test_arguments_without_a_meaning_here_are_refused_with_the_reason(pipe):
    image, mask = inputs()
    kwargs = dict(prompt="x", image=image, mask_image=mask, **FAST)
    cases = [
        (dict(masked_image_latents=torch.zeros(1, 4, 20, 20)), "each stage encodes"),
        (dict(denoising_end=0.8), "ensemble"),
        (dict(height=SIZE * 2), "own resolution"),
        (dict(padding_mask_crop=16), "method='crop'"),
        (dict(cross_attention_kwargs={"dca_scale": 0.5}), "own per-call inputs"),
        (dict(latents=torch.zeros(1, 4, 3, 3)), "latents must have shape"),
        (dict(timesteps=[999, 500], sigmas=[1.0, 0.5]), "not both"),
    ]
    for extra, reason in cases:
        with pytest.raises(ValueError, match=reason):
            pipe(**kwargs, **extra)
    assert pipe(**kwargs, height=SIZE, width=SIZE, generator=seeded(0)).arrays  # the image's own size is fine


def test_padding_mask_crop_is_the_crop_methods_margin(pipe):
    image, mask = random_image(320, 320, seed=5), box_mask(320, 320, 200, 200, 240, 250)
    kwargs = dict(prompt="x", image=image, mask_image=mask, method="crop", guidance_scale=1.0, **FAST)
    a = pipe(padding_mask_crop=24, generator=seeded(0), **kwargs)
    b = pipe(crop_margin=24, generator=seeded(0), **kwargs)
    assert np.array_equal(a.arrays[0], b.arrays[0]) and a.plan.settings.crop_margin == 24


def test_latents_are_the_whole_image_pass_start_noise(pipe):
    image, mask = inputs()
    kwargs = dict(prompt="x", image=image, mask_image=mask, guidance_scale=1.0, **FAST)
    width, height = pipe.plan(image, mask, **FAST).stage1_size
    factor, channels = pipe.vae_scale_factor, pipe.unet.config.out_channels
    noise = torch.randn(1, channels, height // factor, width // factor, generator=seeded(9))
    a = pipe(latents=noise, generator=seeded(1), **kwargs).arrays[0]
    b = pipe(latents=noise, generator=seeded(1), **kwargs).arrays[0]
    c = pipe(latents=noise * 0.5, generator=seeded(1), **kwargs).arrays[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_guidance_rescale_eta_micro_conditioning_and_clip_skip_reach_the_run(pipe):
    image, mask = inputs()
    kwargs = dict(prompt="a red star", image=image, mask_image=mask, guidance_scale=5.0, **FAST)
    base = pipe(generator=seeded(0), **kwargs).arrays[0]
    for extra in (
        dict(guidance_rescale=0.7),
        dict(original_size=(1024, 1024)),
        dict(crops_coords_top_left=(64, 0)),
        dict(clip_skip=1),
    ):
        changed = pipe(generator=seeded(0), **kwargs, **extra).arrays[0]
        assert not np.array_equal(changed, base), extra
        assert outside_equal(changed, image, mask)
    pipe.set_scheduler("ddim")
    a = pipe(generator=seeded(0), eta=0.0, **kwargs).arrays[0]
    b = pipe(generator=seeded(0), eta=1.0, **kwargs).arrays[0]
    assert not np.array_equal(a, b)


def test_custom_timesteps_drive_the_whole_image_pass(pipe):
    image, mask = inputs()
    kwargs = dict(prompt="x", image=image, mask_image=mask, guidance_scale=1.0, strength=1.0, refine_steps=2)
    seen = []
    pipe(
        generator=seeded(0),
        timesteps=[999, 600, 300],
        callback_on_step_end=lambda p, i, t, k: seen.append((k["stage"], int(t))) or {},
        **kwargs,
    )
    assert [t for stage, t in seen if stage == 1] == [999, 600, 300]


def test_settings_object_and_keywords_are_one_thing(pipe):
    image, mask = inputs()
    settings = InpaintSettings(
        num_inference_steps=2, strength=1.0, refine_steps=2, guidance_scale=1.0, rpa_scale=0.5, mask_dilation=4
    )
    a = pipe(prompt="x", image=image, mask_image=mask, settings=settings, generator=seeded(0))
    b = pipe(
        prompt="x",
        image=image,
        mask_image=mask,
        generator=seeded(0),
        num_inference_steps=2,
        strength=1.0,
        refine_steps=2,
        guidance_scale=1.0,
        rpa_scale=0.5,
        mask_dilation=4,
    )
    assert np.array_equal(a.arrays[0], b.arrays[0])
    assert a.plan.settings == settings.resolved(pipe.native_size) == pipe.plan(image, mask, settings).settings
    with pytest.raises(ValueError, match="not both"):
        pipe(prompt="x", image=image, mask_image=mask, settings=settings, rpa_scale=1.0)
    with pytest.raises(ValueError, match="tile_size"):
        InpaintSettings(tile_size=100)
    with pytest.raises(ValueError, match="method"):
        InpaintSettings(method="magic")
    with pytest.raises(AttributeError):
        settings.method = "tiled"  # frozen


def test_ip_adapter_images_condition_every_stage(tmp_path):
    from test_adapter_guard import make_ip_adapter

    pipe = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(tmp_path, **make_ip_adapter(tmp_path, pipe.unet))
    image, mask = inputs()
    picture = random_image(32, 32, seed=8)
    kwargs = dict(prompt="x", image=image, mask_image=mask, ip_adapter_image=picture, guidance_scale=5.0, **FAST)
    seen = []
    pipe.set_ip_adapter_scale(1.0)
    a = pipe(
        generator=seeded(0), callback_on_step_end=lambda p, i, t, k: seen.append(k["stage"]) or {}, **kwargs
    ).arrays[0]
    pipe.set_ip_adapter_scale(0.0)
    b = pipe(generator=seeded(0), **kwargs).arrays[0]
    assert {1, 2} <= set(seen)
    assert not np.array_equal(a, b) and outside_equal(a, image, mask)
    pipe.unload_ip_adapter()
    c = pipe(prompt="x", image=image, mask_image=mask, generator=seeded(0), guidance_scale=5.0, **FAST).arrays[0]
    assert np.abs(c.astype(int) - b.astype(int)).max() <= 1  # scale 0 is no IP-Adapter


def test_lora_scale_reaches_the_unet_beside_the_adapters():
    import peft  # in the test extra: this test must not skip

    pipe = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image, mask = inputs()
    kwargs = dict(prompt="x", image=image, mask_image=mask, guidance_scale=1.0, **FAST)
    plain = pipe(generator=seeded(0), **kwargs).arrays[0]
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    pipe.check_adapters()  # a LoRA does not replace Patch-Adapter's processors
    off = pipe(generator=seeded(0), cross_attention_kwargs={"scale": 0.0}, **kwargs).arrays[0]
    on = pipe(generator=seeded(0), cross_attention_kwargs={"scale": 1.0}, **kwargs).arrays[0]
    assert np.abs(off.astype(int) - plain.astype(int)).max() <= 1
    assert not np.array_equal(on, off)


def test_a_guidance_distilled_unet_gets_its_timestep_condition():
    from diffusers import UNet2DConditionModel

    tiny = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    config = dict(tiny.unet.config) | {"time_cond_proj_dim": 32}
    unet = UNet2DConditionModel.from_config(config)
    pipe = PatchAdapterPipeline(**(tiny.components | {"unet": unet}))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    unet.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw.get("timestep_cond")) if args[0].device.type != "meta" else None,
        with_kwargs=True,
    )  # not the estimate
    image, mask = inputs()
    pipe(prompt="x", image=image, mask_image=mask, generator=seeded(0), guidance_scale=3.0, **FAST)
    assert seen and all(c is not None and c.shape[-1] == 32 for c in seen)


def test_pipeline_state_attributes_like_diffusers(pipe):
    image, mask = inputs()
    out = pipe(prompt="x", image=image, mask_image=mask, generator=seeded(0), guidance_scale=6.0, clip_skip=1, **FAST)
    assert pipe.guidance_scale == 6.0 and pipe.clip_skip == 1 and pipe.do_classifier_free_guidance
    assert pipe.num_timesteps == out.plan.stage2_steps  # the last stage's, as in diffusers' single loop
    assert pipe.interrupt is False and pipe.cross_attention_kwargs is None


def test_a_text_to_image_unet_is_refused_before_any_work():
    from diffusers import UNet2DConditionModel

    from patch_adapter.backbone import BackboneLoadError

    tiny = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    unet = UNet2DConditionModel.from_config(dict(tiny.unet.config) | {"in_channels": 4})
    pipe = PatchAdapterPipeline(**(tiny.components | {"unet": unet}))  # diffusers' tools may still build it
    image, mask = inputs()
    with pytest.raises(BackboneLoadError, match="4 input channels"):
        pipe(prompt="x", image=image, mask_image=mask, **FAST)
