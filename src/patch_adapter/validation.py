"""Inpaint settings checked before any model loads: one clear message per problem.

A setting that is not finite, out of range, or that defeats itself (a feather that erases
the whole fill) would otherwise run for minutes and return a wrong picture with success.
The pipeline's ``__call__`` and the ``inpaint`` command use these; :func:`validate_inpaint_args`
is the one entry point for an argparse namespace, for every command that inpaints.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable

import numpy as np

from .image_io import LoadedImage, check_output_path

# pixels per latent in every SDXL-family VAE; pixel sizes are multiples of it (a VAE factor divides it)
LATENT_FACTOR = 8
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts as an unsigned seed


class SettingsError(ValueError):
    """A setting that cannot give a right result; the message names it and the fix."""


def check_integer(name: str, value, minimum: int, optional: bool = False) -> None:
    """A count (steps, pixels, images): a whole number, not a float that happens to round."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingsError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")


def check_real(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """A finite number in [low, high] ((low, high] with low_open): NaN and inf never pass."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {value}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        if math.isinf(high):
            allowed = f"{'above' if low_open else 'at least'} {low}"
        else:
            allowed = f"in {'(' if low_open else '['}{low}, {high}]"
        raise SettingsError(f"{name} must be {allowed}, got {value}")


def check_inpaint_numbers(
    *,
    num_inference_steps,
    refine_steps=None,
    guidance_scale=7.5,
    strength=0.9999,
    refine_strength=0.6,
    dca_scale=1.0,
    rpa_scale=1.0,
    mask_threshold=0.5,
    mask_dilation=0,
    mask_feather=0,
    num_images_per_prompt=1,
    patch_batch_size=None,
    tile_size=None,
    tile_overlap=None,
    crop_margin=None,
) -> None:
    """Types and ranges of the pipeline's numeric settings (names as in ``__call__``)."""
    check_integer("num_inference_steps", num_inference_steps, 1)
    check_integer("refine_steps", refine_steps, 1, optional=True)
    check_integer("num_images_per_prompt", num_images_per_prompt, 1)
    check_integer("patch_batch_size", patch_batch_size, 1, optional=True)  # None: what fits in memory
    check_integer("mask_dilation", mask_dilation, 0)
    check_integer("mask_feather", mask_feather, 0)
    check_integer("tile_size", tile_size, 1, optional=True)
    check_integer("tile_overlap", tile_overlap, 0, optional=True)
    check_integer("crop_margin", crop_margin, 0, optional=True)
    check_real("guidance_scale", guidance_scale, 0.0)
    check_real("strength", strength, 0.0, 1.0, low_open=True)
    check_real("refine_strength", refine_strength, 0.0, 1.0, low_open=True)
    check_real("dca_scale", dca_scale, 0.0)
    check_real("rpa_scale", rpa_scale, 0.0)
    check_real("mask_threshold", mask_threshold, 0.0, 1.0)


def check_prompt(prompt, name: str = "prompt") -> str:
    """None means no prompt (""), like the CLI's default; anything but text is refused."""
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise SettingsError(f"{name} must be a string (or None), got {type(prompt).__name__}")
    return prompt


def check_seed(seed) -> None:
    check_integer("seed", seed, SEED_RANGE[0])
    if seed > SEED_RANGE[1]:
        raise SettingsError(f"seed must be at most 2**64 - 1 = {SEED_RANGE[1]}, got {seed}")


def check_feather(mask: np.ndarray, feather: int) -> None:
    """Refuse a feather that leaves no pixel of the fill: the result would be the input.

    The feather ramp starts ``feather`` px inside the mask's edge, so a feather of half the
    mask's narrowest width or more erases the fill entirely.
    """
    from .masks import feather_alpha_at, mask_bbox

    box = mask_bbox(mask)
    if feather <= 0 or box is None:
        return
    top, left, bottom, right = box
    inside = mask[top:bottom, left:right]
    erased = int(np.count_nonzero(inside & (feather_alpha_at(mask, box, feather) <= 0)))
    if erased == 0:
        return
    masked = int(np.count_nonzero(inside))
    if erased == masked:
        raise SettingsError(
            f"mask_feather {feather} px erases the whole fill: the mask ({right - left}x"
            f"{bottom - top} px at its widest) is nowhere wider than 2 x {feather} px; use a "
            "feather smaller than half the mask's narrowest width"
        )
    warnings.warn(
        f"mask_feather {feather} px leaves {erased:,} of {masked:,} masked pixels unchanged "
        f"(the parts of the mask narrower than 2 x {feather} px); lower it to fill them",
        stacklevel=2,
    )


def check_device(device) -> None:
    """A device that exists here: otherwise torch fails deep inside, after the inputs load."""
    import torch

    if device is None or str(device) == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingsError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(
                f"device {device!r} asked for, but this PyTorch sees no CUDA GPU (no driver, or a "
                "CPU-only build); use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s), numbered from 0"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SettingsError(f"device {device!r} asked for, but MPS is not available; use cpu")


def validate_inpaint_args(args, loaded: LoadedImage, mask: np.ndarray, outputs: Iterable, settings) -> None:
    """Every check of an inpaint command line, before the model loads (exit code 2 on failure).

    ``args`` is the ``inpaint`` namespace (or one with the same names; ``mask``,
    ``allow_lossy`` and ``overwrite_input`` may be absent), ``settings`` the InpaintSettings
    made from it (checked when made), ``outputs`` the files that will be written; the
    inputs are protected unless ``--overwrite-input``.
    """
    mask_path = getattr(args, "mask", None)
    check_prompt(args.prompt, "--prompt")
    check_seed(args.seed)
    check_integer("--num-images", args.num_images, 1)
    check_feather(mask, settings.mask_feather)
    check_device(args.device)
    inputs = [args.image] + ([mask_path] if mask_path else [])
    protect = [] if getattr(args, "overwrite_input", False) else inputs
    for path in outputs:
        check_output_path(
            path,
            loaded.size,
            loaded.bit_depth,
            loaded.alpha is not None,
            allow_lossy=getattr(args, "allow_lossy", False),
            protect=protect,
        )
