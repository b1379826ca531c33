"""With adapters off and an image at the native size, we are diffusers' SDXL inpainting."""

import numpy as np
import PIL.Image
import pytest
from diffusers import StableDiffusionXLInpaintPipeline

from conftest import box_mask, random_image, seeded


def smooth_image(size, seed=0):
    """A picture with structure (not noise), so the comparison means something."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(small).resize((size, size), PIL.Image.BICUBIC))


@pytest.mark.parametrize("mask_box, scheduler", [((40, 24, 100, 90), "euler"), ((13, 7, 77, 121), "ddim")])
def test_native_size_equals_diffusers(pipe, mask_box, scheduler):
    pipe.set_scheduler(scheduler)
    size = pipe.native_size
    image = smooth_image(size)
    mask = box_mask(size, size, *mask_box)
    reference = StableDiffusionXLInpaintPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        add_watermarker=False,
    )
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red ball", num_inference_steps=6, guidance_scale=5.0)
    theirs = np.asarray(
        reference(
            image=PIL.Image.fromarray(image),
            mask_image=PIL.Image.fromarray(mask.astype(np.uint8) * 255),
            generator=seeded(3),
            **kwargs,
        ).images[0]
    )
    ours = pipe(image=image, mask_image=mask, generator=seeded(3), dca_scale=0.0, rpa_scale=0.0, **kwargs).arrays[0]
    diff = np.abs(ours.astype(int) - theirs.astype(int))[mask]
    assert diff.max() <= 2, f"max abs difference {diff.max()}/255 inside the mask"
    assert np.array_equal(ours[~mask], image[~mask])
    # the fill really is generated (the comparison is not between two copies of the input)
    assert np.abs(ours[mask].astype(int) - image[mask].astype(int)).mean() > 5


def test_untrained_dca_changes_nothing_at_native_size(pipe):
    size = pipe.native_size
    image = random_image(size, size, seed=1)
    mask = box_mask(size, size, 30, 30, 90, 100)
    kwargs = dict(prompt="a blue box", image=image, mask_image=mask, num_inference_steps=4)
    off = pipe(generator=seeded(0), dca_scale=0.0, **kwargs).arrays[0]
    on = pipe(generator=seeded(0), dca_scale=1.0, **kwargs).arrays[0]
    assert np.array_equal(off, on)
