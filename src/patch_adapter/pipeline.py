"""`PatchAdapterPipeline`: two-stage inpainting of images of any size.

A subclass of diffusers' `StableDiffusionXLInpaintPipeline`: it reuses diffusers'
prompt encoding, latent and mask preparation, schedulers and VAE, and adds

- stage 1: the whole image at the backbone's native pixel count, with the Dual
  Context Adapter (`_inpaint_whole`);
- stage 2: full-resolution patches around the mask, denoised in lock step and fused,
  each attending to its reference patch through the Reference Patch Adapter
  (`_refine_patches`);
- compositing that leaves every pixel outside the mask bit-identical;
- the baselines of docs/method.md by name (`method=`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    rescale_noise_cfg,
    retrieve_latents,
    retrieve_timesteps,
)
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .adapters import ReferenceBank, install_adapters
from .adapters.attention import repeat_to_batch
from .adapters.guard import AdapterGuardMixin
from .backbone import check_inpainting_backbone, native_size
from .compositing import composite_into, with_opaque_alpha
from .image_io import (
    LoadedImage,
    from_float,
    from_model_range,
    load_image,
    load_mask,
    loaded_from_pil,
    to_float,
    to_model_range,
)
from .loading import PatchAdapterLoadingMixin
from .masks import feather_alpha_at, latent_mask_tensor, mask_bbox, resize_mask_any
from .memory import available_memory, estimate_memory, stage2_settings
from .planning import InpaintPlan, generation_mask, make_plan, padded_dims
from .resampling import resize_image, sample_region
from .settings import BANK_PLACEMENTS, InpaintSettings
from .tiling import TileFusion, bounding_tile, tile_window
from .validation import LATENT_FACTOR, check_feather, check_integer, check_prompt

OUTPUT_TYPES = ("pil", "np", "pt")
ADAPTER_ATTENTION_KEYS = {"dca_mask", "dca_scale", "rpa_bank", "rpa_scale"}  # the adapters' per-call inputs
#: The settings that are also arguments of the stock pipeline, with their defaults (the same in both).
DIFFUSERS_KNOB_DEFAULTS = {
    field.name: field.default
    for field in dataclasses.fields(InpaintSettings)
    if field.name in ("num_inference_steps", "strength", "guidance_scale", "guidance_rescale", "eta")
}


@dataclass
class PatchAdapterPipelineOutput(BaseOutput):
    """`images`: one result per prompt and image, as `output_type` asks ("pil": PIL images, 8 bit,
    RGBA when the input has alpha; "np"/"pt": float in [0, 1], stacked when the sizes agree);
    `arrays`: the same in the input's bit depth, (H, W, 3) or (H, W, 4) with the input's alpha
    outside the mask; `plans`: the plan of each input (`plan`: the first)."""

    images: list | np.ndarray | torch.Tensor
    arrays: list = field(default_factory=list)
    plan: InpaintPlan | None = None
    plans: list = field(default_factory=list)


@dataclass
class Conditioning:
    """What every UNet call of one inpaint is conditioned on; negative half first when guided.

    embeds (g, 77, 2048) and pooled (g, 1280) with g = 2 under classifier-free guidance, else 1;
    image_embeds: IP-Adapter embeddings (one tensor per IP-Adapter, g rows), or None;
    timestep_cond: the guidance embedding of a guidance-distilled UNet, or None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor
    guidance_scale: float
    guidance_rescale: float = 0.0
    image_embeds: list | None = None
    timestep_cond: torch.Tensor | None = None
    micro: dict | None = None  # SDXL micro-conditioning of the whole-image pass (diffusers' names)

    @property
    def guided(self) -> bool:
        return self.embeds.shape[0] == 2

    def positive(self) -> "Conditioning":
        """The conditional half alone (reference patches are recorded with it)."""
        image_embeds = [e[-1:] for e in self.image_embeds] if self.image_embeds is not None else None
        return Conditioning(self.embeds[-1:], self.pooled[-1:], 1.0, 0.0, image_embeds, self.timestep_cond)


@dataclass(frozen=True)
class StepContext:
    """Where a denoising loop is, for `callback_on_step_end`: the stage (1: whole image, 2: patches),
    the patch group (stage 2), and which output image."""

    stage: int
    patch_group: int | None = None
    image_index: int = 0


def as_loaded_image(image) -> LoadedImage:
    """A path, PIL image, array or tensor as a LoadedImage.

    A PIL image follows the rules of a file (EXIF orientation applied, 16-bit grey kept).
    A uint8/uint16 (H, W, 3|4) array is taken as it is, its 4th channel as alpha. Float
    arrays (H, W, 3|4) in [0, 1] and tensors (3|4, H, W) (as diffusers takes them: [0, 1],
    or [-1, 1] when any value is negative) stay float32, so the result is bit-identical to
    them outside the mask.
    """
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return load_image(image)
    if isinstance(image, PIL.Image.Image):
        return loaded_from_pil(image)
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[0] not in (3, 4) or not image.is_floating_point():
            raise ValueError(
                f"an image tensor must be float (3, H, W) or (4, H, W), got {tuple(image.shape)} "
                f"{image.dtype}; pass a batch as a list or a (N, C, H, W) tensor"
            )
        pixels = image.detach().float().cpu()
        if pixels.min() < 0:
            pixels = from_model_range(pixels)  # diffusers' [-1, 1] convention
        image = pixels.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        floating = np.issubdtype(image.dtype, np.floating)
        if (
            (image.dtype not in (np.uint8, np.uint16) and not floating)
            or image.ndim != 3
            or image.shape[2] not in (3, 4)
        ):
            raise ValueError(
                f"an image array must be (H, W, 3) or (H, W, 4), uint8, uint16 or float in [0, 1]; "
                f"got {image.shape} {image.dtype}"
            )
        if floating:
            image = image.astype(np.float32)
            if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise ValueError(
                    "a float image must hold finite values in [0, 1] (diffusers' convention); "
                    f"got values in [{np.nanmin(image)}, {np.nanmax(image)}]"
                )
        alpha = image[..., 3].copy() if image.shape[2] == 4 else None
        return LoadedImage(
            pixels=np.ascontiguousarray(image[..., :3]), alpha=alpha, path=None, format=None, icc_profile=None
        )
    raise TypeError(f"image must be a path, a PIL image, a numpy array or a torch tensor, not {type(image).__name__}")


def as_list(value, name: str) -> list:
    """Inputs as a list: a list as it is, a (N, ...) batch array or tensor split, anything else alone."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} is an empty list")
        return list(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4 and value.shape[0] > 1:
        return list(value)
    return [value]


def as_mask_source(mask):
    """A mask tensor or array with leading unit dimensions ((1, H, W), (1, 1, H, W)) as (H, W)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        while mask.ndim > 2 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
    return mask


def model_input(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (1, 3, H, W) in [-1, 1], as diffusers' image processor gives the VAE."""
    return to_model_range(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None])


def pad_to_multiple(pixels: np.ndarray, mask: np.ndarray, height: int, width: int):
    """Pad (edge-replicate) pixels and (with False) the mask to height x width."""
    h, w = mask.shape
    if (h, w) == (height, width):
        return pixels, mask
    pixels = np.pad(pixels, ((0, height - h), (0, width - w), (0, 0)), mode="edge")
    mask = np.pad(mask, ((0, height - h), (0, width - w)))
    return pixels, mask


class PatchAdapterPipeline(PatchAdapterLoadingMixin, AdapterGuardMixin, StableDiffusionXLInpaintPipeline):
    """Text-guided inpainting of images of any size with Patch-Adapter (ICCV 2025)."""

    #: What `callback_on_step_end_tensor_inputs` may name: the tensors every stage's loop has.
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "add_text_embeds",
        "add_time_ids",
        "mask",
        "masked_image_latents",
    ]

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            requires_aesthetics_score=requires_aesthetics_score,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        install_adapters(self.unet)
        self.record_adapters()  # the pipeline's own reference to the adapters (adapters/guard.py)
        self.backbone_name = None

    @property
    def native_size(self) -> int:
        return native_size(self.unet, self.vae_scale_factor)

    # ------------------------------------------------------------------ settings and planning

    def settings_from(self, settings: InpaintSettings | None = None, **knobs) -> InpaintSettings:
        """The call's settings: `settings`, or one made from the keyword knobs (not both).

        Knobs left at their defaults (None, or diffusers' defaults for the arguments the
        stock pipeline shares) do not count as given.
        """
        given = {name: value for name, value in knobs.items() if value is not None}
        for name, default in DIFFUSERS_KNOB_DEFAULTS.items():
            if name in given and given[name] == default:
                del given[name]
        if settings is None:
            return InpaintSettings(**given)
        if not isinstance(settings, InpaintSettings):
            raise TypeError(f"settings must be an InpaintSettings, not {type(settings).__name__}")
        if given:
            raise ValueError(
                f"give either settings= or the keywords {', '.join(sorted(given))}, not both "
                "(settings.replace(...) makes a changed copy)"
            )
        return settings

    def plan(self, image, mask_image=None, settings: InpaintSettings | None = None, **knobs) -> InpaintPlan:
        """The plan of an inpaint (tiles, sizes, UNet evaluations, memory estimate) without running it.

        `knobs`: the settings as keywords (InpaintSettings' names), instead of `settings`.
        """
        settings = self.settings_from(settings, **knobs)
        loaded = as_loaded_image(image)
        mask = load_mask(as_mask_source(mask_image), loaded, threshold=settings.mask_threshold)
        return self._plan(settings, loaded, mask)

    def _plan(self, settings: InpaintSettings, loaded: LoadedImage, mask: np.ndarray) -> InpaintPlan:
        if settings.reference_banks == "host" and self._execution_device.type == "cpu":
            raise ValueError(
                "reference_banks='host' is for accelerators; on the CPU the host is the device "
                "(use 'recompute' to bound memory)"
            )
        plan = make_plan(settings, loaded.size, mask, self.native_size, self.vae_scale_factor)
        plan.stage2 = choose_stage2_memory(self, plan, self._execution_device)
        return plan

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        *,
        settings: InpaintSettings | None = None,
        method: str | None = None,
        refine_steps: int | None = None,
        refine_strength: float | None = None,
        dca_scale: float | None = None,
        rpa_scale: float | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        mask_dilation: int | None = None,
        mask_feather: int | None = None,
        mask_threshold: float | None = None,
        crop_margin: int | None = None,
        reference_timestep: int | None = None,
        patch_batch_size: int | None = None,
        max_memory: int | None = None,
        reference_banks: str | None = None,
        **kwargs,
    ):
        """Inpaint `image` inside `mask_image` (white = fill; None: the image's alpha).

        Every argument of diffusers' `StableDiffusionXLInpaintPipeline.__call__` is taken,
        with its meaning where it has one in a two-stage run (see `docs/method.md`, "the
        diffusers contract"): num_inference_steps, strength, timesteps and sigmas drive
        the whole-image pass (stage 1, and the direct/crop/resize baselines, and the
        tiled baseline's patches); original_size, crops_coords_top_left, target_size and
        aesthetic scores condition that pass; callback_on_step_end is called in every
        stage, its `callback_kwargs` naming `stage`, `patch_group` and `image_index`.
        Those without a meaning here raise a ValueError that says why.

        Patch-Adapter's own settings come as `settings=InpaintSettings(...)` or as their
        keywords (method, refine_steps, refine_strength, dca_scale, rpa_scale, tile_size,
        tile_overlap, mask_dilation, mask_feather, mask_threshold, crop_margin,
        reference_timestep, patch_batch_size, max_memory, reference_banks; see
        `InpaintSettings`). Pixels outside the mask are never changed.
        """
        # 1. Check inputs: settings, the arguments without a meaning here, the adapters
        if kwargs:
            raise TypeError(f"PatchAdapterPipeline.__call__ got unexpected keyword arguments: {', '.join(kwargs)}")
        settings = self.settings_from(
            settings,
            method=method,
            num_inference_steps=num_inference_steps,
            strength=strength,
            refine_steps=refine_steps,
            refine_strength=refine_strength,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            dca_scale=dca_scale,
            rpa_scale=rpa_scale,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            mask_dilation=mask_dilation,
            mask_feather=mask_feather,
            mask_threshold=mask_threshold,
            crop_margin=crop_margin,
            reference_timestep=reference_timestep,
            patch_batch_size=patch_batch_size,
            max_memory=max_memory,
            reference_banks=reference_banks,
        )
        settings = self.check_diffusers_arguments(
            settings,
            masked_image_latents=masked_image_latents,
            padding_mask_crop=padding_mask_crop,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            output_type=output_type,
            cross_attention_kwargs=cross_attention_kwargs,
            callback=callback_on_step_end,
            callback_inputs=callback_on_step_end_tensor_inputs,
            timesteps=timesteps,
            sigmas=sigmas,
        )
        settings = settings.resolved(self.native_size)  # the backbone's defaults, as the plan and metadata hold them
        check_integer("num_images_per_prompt", num_images_per_prompt, 1)
        # a text-to-image UNet would fail deep inside
        check_inpainting_backbone({"unet": self.unet, "vae": self.vae}, "this pipeline")
        self.check_adapters()
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 2. Inputs as a batch: prompts, images and masks, one plan per image
        prompts = self.batch_size(prompt, prompt_embeds)
        images, masks = as_list(image, "image"), as_list(mask_image, "mask_image")
        count = max(prompts, len(images), len(masks))  # one prompt, image or mask serves the whole batch
        images, masks = broadcast(images, count, "image"), broadcast(masks, count, "mask_image")
        if prompts not in (1, count):
            raise ValueError(f"{prompts} prompts for a batch of {count} images: give one prompt, or one per image")
        loaded = [as_loaded_image(item) for item in images]
        masks = [
            load_mask(as_mask_source(m), item, threshold=settings.mask_threshold)
            for m, item in zip(masks, loaded, strict=True)
        ]
        for item in loaded:
            check_output_size(item, height, width)
        for mask in masks:
            check_feather(mask, settings.mask_feather)
        plans = [self._plan(settings, item, mask) for item, mask in zip(loaded, masks, strict=True)]
        generators = per_image_generators(generator, count * num_images_per_prompt)
        start_latents = per_image_latents(
            latents, plans, num_images_per_prompt, self.vae.config.latent_channels, self.vae_scale_factor
        )

        # 3. Encode the prompts (and IP-Adapter images) once for every stage
        self._guidance_scale = settings.guidance_scale
        self._guidance_rescale = settings.guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_start = self._denoising_end = None
        self._interrupt = False
        self._num_timesteps = 0
        self._step_callback = (
            (callback_on_step_end, list(callback_on_step_end_tensor_inputs))
            if callback_on_step_end is not None
            else None
        )
        needs_text = any(not plan.empty_mask for plan in plans)
        conditionings = (
            self.encode_conditioning(
                prompts,
                settings,
                prompt=prompt,
                prompt_2=prompt_2,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds,
                cross_attention_kwargs=cross_attention_kwargs,
                clip_skip=clip_skip,
                micro=dict(
                    original_size=original_size,
                    crops_coords_top_left=crops_coords_top_left,
                    target_size=target_size,
                    negative_original_size=negative_original_size,
                    negative_crops_coords_top_left=negative_crops_coords_top_left,
                    negative_target_size=negative_target_size,
                    aesthetic_score=aesthetic_score,
                    negative_aesthetic_score=negative_aesthetic_score,
                ),
            )
            if needs_text
            else [None] * prompts
        )
        conditionings = conditionings * (count // prompts)  # a single prompt serves every image

        # 4. Run the method, once per prompt and requested image; composite inside the mask only
        arrays = []
        for index, (item, mask, plan, cond) in enumerate(zip(loaded, masks, plans, conditionings, strict=True)):
            for copy in range(num_images_per_prompt):
                number = index * num_images_per_prompt + copy
                result = item.channels.copy()  # colour, and alpha last when the image has it
                if not plan.empty_mask:
                    run = MethodRun(settings, plan, item, mask, cond, generators[number], start_latents[number], number)
                    for fill, box in self._run_method(run):
                        alpha = feather_alpha_at(mask, box, settings.mask_feather)
                        top, left, bottom, right = box
                        composite_into(
                            result,
                            with_opaque_alpha(fill, result.shape[2]),
                            mask[top:bottom, left:right],
                            alpha,
                            offset=(top, left),
                        )
                arrays.append(result)

        # 5. Offload and return, as `output_type` asks
        self.maybe_free_model_hooks()
        images = self.postprocess_results(arrays, output_type)
        if not return_dict:
            return (images,)
        return PatchAdapterPipelineOutput(images=images, arrays=arrays, plan=plans[0], plans=plans)

    def check_diffusers_arguments(
        self,
        settings,
        *,
        masked_image_latents,
        padding_mask_crop,
        denoising_start,
        denoising_end,
        output_type,
        cross_attention_kwargs,
        callback,
        callback_inputs,
        timesteps,
        sigmas,
    ) -> InpaintSettings:
        """Refuse, with the reason, the stock arguments that have no meaning in a two-stage run."""
        if masked_image_latents is not None:
            raise ValueError(
                "masked_image_latents has no meaning here: each stage encodes the masked image "
                "itself, at its own size (the whole image at native size, then each patch region); "
                "pass image and mask_image"
            )
        if denoising_start is not None or denoising_end is not None:
            raise ValueError(
                "denoising_start/denoising_end (an ensemble of expert denoisers) have no meaning "
                "here: each of Patch-Adapter's stages denoises to the end; run a refiner on the result"
            )
        if output_type not in OUTPUT_TYPES:
            if output_type == "latent":
                raise ValueError(
                    "output_type='latent' has no meaning here: the result is composited into the "
                    "full-resolution picture in pixel space (several regions, each decoded on its "
                    f"own); choose one of {', '.join(OUTPUT_TYPES)}"
                )
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if padding_mask_crop is not None:
            check_integer("padding_mask_crop", padding_mask_crop, 0)
            if settings.method != "crop":
                raise ValueError(
                    f"padding_mask_crop is diffusers' crop around the mask: method='crop' with "
                    f"crop_margin (this call's method is {settings.method!r}, which already works "
                    "only around the mask at full resolution); pass method='crop' with it"
                )
            if settings.crop_margin is not None and settings.crop_margin != padding_mask_crop:
                raise ValueError(
                    f"padding_mask_crop ({padding_mask_crop}) and crop_margin ({settings.crop_margin}) "
                    "are the same setting; give one"
                )
            settings = settings.replace(crop_margin=padding_mask_crop)
        if timesteps is not None and sigmas is not None:
            raise ValueError("give timesteps or sigmas, not both")
        if timesteps is not None or sigmas is not None:  # as diffusers: the schedule's length is the step count
            settings = settings.replace(num_inference_steps=len(timesteps if timesteps is not None else sigmas))
        own = set(cross_attention_kwargs or {}) & ADAPTER_ATTENTION_KEYS
        if own:
            raise ValueError(
                f"cross_attention_kwargs {sorted(own)} are Patch-Adapter's own per-call inputs; "
                "set dca_scale/rpa_scale instead"
            )
        if callback is not None and not callable(callback):
            raise ValueError("callback_on_step_end must be callable (pipe, step, timestep, callback_kwargs) -> dict")
        unknown = [name for name in callback_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{', '.join(self._callback_tensor_inputs)}"
            )
        self._custom_schedule = (timesteps, sigmas) if timesteps is not None or sigmas is not None else None
        return settings

    def batch_size(self, prompt, prompt_embeds) -> int:
        """How many prompts the call has: a list's length, else the embeddings' batch, else 1."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("prompt is an empty list")
            for item in prompt:
                check_prompt(item)
            return len(prompt)
        if prompt is not None:
            check_prompt(prompt)
            return 1
        if prompt_embeds is not None:
            return prompt_embeds.shape[0]
        return 1

    def postprocess_results(self, arrays, output_type):
        """The results as `output_type` asks: PIL images, or float in [0, 1] stacked when the sizes agree."""
        if output_type == "pil":
            return [
                PIL.Image.fromarray(a if a.dtype == np.uint8 else from_float(to_float(a), np.uint8)) for a in arrays
            ]
        floats = [to_float(a) for a in arrays]
        same = len({a.shape for a in floats}) == 1
        if output_type == "np":
            return np.stack(floats) if same else floats
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in floats]
        return torch.stack(tensors) if same else tensors

    def _run_method(self, run: "MethodRun"):
        """The fills of one output image: a list of (pixels (h, w, 3) in [0, 1], box (top, left, bottom, right))."""
        plan, settings, spec = run.plan, run.settings, run.settings.spec
        pixels = run.image.pixels
        height, width = run.mask.shape
        gen_mask = generation_mask(run.mask, settings.mask_dilation)
        dca_scale = settings.effective_dca_scale
        whole = StepContext(stage=1, image_index=run.index)

        if plan.stage1_size is not None and not plan.tiles:
            # a single whole-image pass: small images, direct, crop, resize
            top, left, bottom, right = plan.stage1_box
            size = plan.stage1_size
            box_pixels = pixels[top:bottom, left:right]
            box_mask = gen_mask[top:bottom, left:right]
            # only the mask's bounding box is returned: an 8K upscale is never held in float
            m_top, m_left, m_bottom, m_right = mask_bbox(box_mask)
            fill_box = (top + m_top, left + m_left, top + m_bottom, left + m_right)
            if size == padded_dims(right - left, bottom - top):
                fill = self._inpaint_padded(to_float(box_pixels), box_mask, run, dca_scale, whole)
                return [(fill[m_top:m_bottom, m_left:m_right], fill_box)]
            low = self._stage1_at(box_pixels, box_mask, size, run, dca_scale, whole)
            fill = sample_region(low, (bottom - top, right - left), (m_top, m_left, m_bottom, m_right))
            return [(fill, fill_box)]

        reference = None
        if plan.stage1_size is not None:
            # stage 1 at the native pixel count; its result is the reference of stage 2
            reference = self._stage1_at(pixels, gen_mask, plan.stage1_size, run, dca_scale, whole)
            if self.interrupt:  # stopped in stage 1: its result, upsampled, is the fill (as `resize`)
                top, left, bottom, right = mask_bbox(gen_mask)
                return [
                    (sample_region(reference, (height, width), (top, left, bottom, right)), (top, left, bottom, right))
                ]
        # stage 2 (or the tiled baseline): each group of overlapping patches on its own
        fills = []
        for number, group in enumerate(plan.groups):
            refine = functools.partial(
                self._refine_patches,
                group,
                plan.tile_overlap,
                pixels,
                gen_mask,
                reference,
                run,
                steps=settings.refine_steps if spec.reference else settings.num_inference_steps,
                strength=settings.refine_strength if spec.reference else settings.strength,
                rpa_scale=settings.effective_rpa_scale,
                context=StepContext(stage=2, patch_group=number, image_index=run.index),
            )
            fills.append(retry_out_of_memory(refine, plan.stage2, run.generator, self._execution_device))
        return fills

    # ------------------------------------------------------------------ conditioning

    def encode_conditioning(
        self,
        count: int,
        settings: InpaintSettings,
        *,
        prompt=None,
        prompt_2=None,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        cross_attention_kwargs=None,
        clip_skip=None,
        micro=None,
    ) -> list[Conditioning]:
        """One Conditioning per prompt (`count`), with diffusers' own prompt and IP-Adapter encoders.

        The keywords are `__call__`'s; micro: its SDXL micro-conditioning arguments.
        """
        device = self._execution_device
        guided = settings.guided
        if prompt is None and prompt_embeds is None:
            prompt = ""
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        if embeds.shape[0] != count:
            raise ValueError(f"the prompt embeddings hold {embeds.shape[0]} prompts, the call {count}")
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, 1, guided
            )
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # a guidance-distilled UNet (LCM)
            scale = torch.tensor(settings.guidance_scale - 1).repeat(1)
            timestep_cond = self.get_guidance_scale_embedding(
                scale, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=embeds.dtype)
        conditionings = []
        for i in range(count):
            rows = [neg_embeds[i : i + 1], embeds[i : i + 1]] if guided else [embeds[i : i + 1]]
            pooled_rows = [neg_pooled[i : i + 1], pooled[i : i + 1]] if guided else [pooled[i : i + 1]]
            ip_rows = None
            if image_embeds is not None:
                ip_rows = [
                    e if e.shape[0] == (2 if guided else 1) else image_rows(e, i, count, guided) for e in image_embeds
                ]
            conditionings.append(
                Conditioning(
                    torch.cat(rows),
                    torch.cat(pooled_rows),
                    settings.guidance_scale,
                    settings.guidance_rescale,
                    ip_rows,
                    timestep_cond,
                    micro,
                )
            )
        return conditionings

    def time_ids(self, height: int, width: int, text: Conditioning, whole_image: bool = False) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop top-left, target size (and aesthetic scores).

        A patch is conditioned as the uncropped native-size picture it is; the whole-image
        pass takes the call's original_size/crops_coords_top_left/target_size when given.
        """
        micro = text.micro if whole_image and text.micro else {}
        size = (height, width)
        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(text.pooled.shape[-1])
        )
        original = micro.get("original_size") or size
        target = micro.get("target_size") or size
        ids, neg_ids = self._get_add_time_ids(
            original,
            micro.get("crops_coords_top_left", (0, 0)),
            target,
            micro.get("aesthetic_score", 6.0),
            micro.get("negative_aesthetic_score", 2.5),
            micro.get("negative_original_size") or original,
            micro.get("negative_crops_coords_top_left", (0, 0)),
            micro.get("negative_target_size") or target,
            dtype=text.embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        ids = torch.cat([neg_ids, ids]) if text.guided else ids
        return ids.to(self._execution_device)

    def predict_noise(self, latents, t, mask, masked_latents, text, time_ids, attention_kwargs):
        """Guided noise prediction for a batch of latents already scaled by the scheduler.

        latents (k, 4, h, w); mask and masked latents with batch k or 1; text and
        time_ids with one row per guidance half, shared by the k items. The call's
        cross_attention_kwargs (a LoRA scale, say) reach the UNet beside the adapters' own.
        """
        batch = latents.shape[0]
        model_input = torch.cat([latents] * 2) if text.guided else latents
        full = model_input.shape[0]
        model_input = torch.cat(
            [model_input, repeat_to_batch(mask, full), repeat_to_batch(masked_latents, full)], dim=1
        )
        added = {
            "text_embeds": text.pooled.repeat_interleave(batch, dim=0),
            "time_ids": time_ids.repeat_interleave(batch, dim=0),
        }
        if text.image_embeds is not None:
            added["image_embeds"] = [e.repeat_interleave(batch, dim=0) for e in text.image_embeds]
        timestep_cond = text.timestep_cond.expand(full, -1) if text.timestep_cond is not None else None
        noise = self.unet(
            model_input,
            t,
            encoder_hidden_states=text.embeds.repeat_interleave(batch, dim=0),
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            cross_attention_kwargs={**(getattr(self, "_cross_attention_kwargs", None) or {}), **attention_kwargs},
            return_dict=False,
        )[0]
        if text.guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + text.guidance_scale * (cond - uncond)
            if text.guidance_rescale > 0:
                noise = rescale_noise_cfg(noise, cond, guidance_rescale=text.guidance_rescale)
        return noise

    def on_step_end(self, context: StepContext, step: int, t, latents, **tensors) -> torch.Tensor:
        """Call `callback_on_step_end` (if any) with the loop's tensors; returns the latents it gives back.

        Only the latents are taken back: a callback that returns another tensor changed is
        refused, rather than ignored.
        """
        if getattr(self, "_step_callback", None) is None:
            return latents
        callback, names = self._step_callback
        tensors = {"latents": latents, **tensors}
        given = {name: tensors.get(name) for name in names}
        given.update(stage=context.stage, patch_group=context.patch_group, image_index=context.image_index)
        returned = callback(self, step, t, given) or {}
        for name, value in returned.items():
            if name != "latents" and name in tensors and value is not tensors[name]:
                raise ValueError(
                    f"callback_on_step_end returned a new {name!r}; Patch-Adapter takes back only "
                    "'latents' (its stages share the conditioning)"
                )
        return returned.get("latents", latents)

    # ------------------------------------------------------------------ VAE

    @contextlib.contextmanager
    def _vae_for(self, latent_hw):
        """Upcast an fp16 VAE that overflows, and tile it for regions above native size."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        native = self.unet.config.sample_size
        tile = max(latent_hw) > native and not self.vae.use_tiling
        if upcast:
            self.vae.to(dtype=torch.float32)
        if tile:
            self.vae.enable_tiling()
        try:
            yield self.vae.dtype
        finally:
            if tile:
                self.vae.disable_tiling()
            if upcast:
                self.vae.to(dtype=torch.float16)

    def decode(self, latents) -> torch.Tensor:
        """Latents -> (B, 3, H, W) pixels in [0, 1] (float32)."""
        cfg = self.vae.config
        with self._vae_for(latents.shape[-2:]) as dtype:
            latents = latents.to(dtype)
            if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
                mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / cfg.scaling_factor + mean
            else:
                latents = latents / cfg.scaling_factor
            image = self.vae.decode(latents, return_dict=False)[0]
        return from_model_range(image.float())

    def encode(self, image) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latents, the distribution's mode (no noise)."""
        with self._vae_for((image.shape[-2] // self.vae_scale_factor, image.shape[-1] // self.vae_scale_factor)) as dt:
            latents = retrieve_latents(self.vae.encode(image.to(self._execution_device, dt)), sample_mode="argmax")
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    # ------------------------------------------------------------------ stage 1

    def _stage1_at(self, pixels, mask, size, run, dca_scale, context) -> torch.Tensor:
        """Inpaint `pixels` resized to `size`; returns (1, 3, h, w) in [0, 1].

        The mask is resized so that no masked pixel is lost (docs/method.md, stage 1).
        """
        width, height = size
        small = resize_image(pixels, (height, width))
        small_mask = resize_mask_any(mask, (height, width))
        return self._inpaint_whole(small, small_mask, run, dca_scale, context)

    def _inpaint_padded(self, pixels, mask, run, dca_scale, context) -> np.ndarray:
        """The whole image at its own size (padded to the latent grid); (h, w, 3) in [0, 1]."""
        h, w = mask.shape
        width, height = padded_dims(w, h)
        pixels, padded_mask = pad_to_multiple(pixels, mask, height, width)
        out = self._inpaint_whole(pixels, padded_mask, run, dca_scale, context)
        return out[0].permute(1, 2, 0).cpu().numpy()[:h, :w]

    def stage_timesteps(self, steps: int, strength: float, custom: bool = False):
        """The timesteps of a denoising loop, shortened by strength, as diffusers' inpainting makes them.

        custom: the call's `timesteps`/`sigmas` apply (the whole-image pass, the tiled baseline).
        """
        device = self._execution_device
        timesteps, sigmas = (
            self._custom_schedule if custom and getattr(self, "_custom_schedule", None) else (None, None)
        )
        given = timesteps is not None or sigmas is not None
        _, steps = retrieve_timesteps(self.scheduler, None if given else steps, device, timesteps, sigmas)
        timesteps, _ = self.get_timesteps(steps, strength, device)
        self._num_timesteps = len(timesteps)
        return timesteps

    def _inpaint_whole(self, pixels, mask, run, dca_scale, context) -> torch.Tensor:
        """One inpaint at the pixels' own size (multiples of 8), as diffusers' SDXL inpainting does it.

        With dca_scale 0 this is step for step `StableDiffusionXLInpaintPipeline.__call__`
        (same RNG order: image latents, noise, masked-image latents), which the tests
        check. Returns (1, 3, H, W) in [0, 1].
        """
        device = self._execution_device
        settings, text, generator = run.settings, run.conditioning, run.generator
        height, width = mask.shape
        dtype = text.embeds.dtype
        image = model_input(pixels).float()
        mask_t = torch.from_numpy(mask.astype(np.float32))[None, None]

        # timesteps, shortened by strength
        timesteps = self.stage_timesteps(settings.num_inference_steps, settings.strength, custom=True)
        masked_image = image * (mask_t < 0.5)
        latents, _ = self.prepare_latents(
            1,
            self.vae.config.latent_channels,
            height,
            width,
            dtype,
            device,
            generator,
            latents=run.latents,
            image=image,
            timestep=timesteps[:1],
            is_strength_max=settings.strength == 1.0,
            return_noise=True,
        )
        mask_latents, masked_latents = self.prepare_mask_latents(
            mask_t, masked_image, 1, height, width, dtype, device, generator, False
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, settings.eta)
        time_ids = self.time_ids(height, width, text, whole_image=True)
        attention_kwargs = {"dca_mask": mask_latents, "dca_scale": dca_scale}

        for i, t in enumerate(self.progress_bar(timesteps, desc=f"stage 1 ({width}x{height})")):
            if self.interrupt:
                continue
            model_latents = self.scheduler.scale_model_input(latents, t)
            noise = self.predict_noise(model_latents, t, mask_latents, masked_latents, text, time_ids, attention_kwargs)
            latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
            latents = self.on_step_end(
                context,
                i,
                t,
                latents,
                prompt_embeds=text.embeds,
                add_text_embeds=text.pooled,
                add_time_ids=time_ids,
                mask=mask_latents,
                masked_image_latents=masked_latents,
            )
        return self.decode(latents)

    # ------------------------------------------------------------------ stage 2

    def _refine_patches(
        self,
        tiles,
        overlap,
        pixels,
        gen_mask,
        reference,
        run,
        steps,
        strength,
        rpa_scale,
        context,
        stage2=None,
    ):
        """Denoise overlapping patches in lock step; returns (pixels (h, w, 3) in [0, 1], box).

        tiles: one group of the plan (canvas latent coordinates); box: the pixels the
        result covers (top, left, bottom, right). reference: the stage-1 result
        (1, 3, h, w), upsampled here to full size inside the mask; None for the tiled
        baseline, which starts from noise without one.
        """
        device = self._execution_device
        text, generator, settings = run.conditioning, run.generator, run.settings
        factor = self.vae_scale_factor
        height, width = gen_mask.shape
        region = bounding_tile(tiles)
        top, left = region.top * factor, region.left * factor
        bottom, right = top + region.height * factor, left + region.width * factor
        box = (top, left, min(bottom, height), min(width, right))

        # region pixels (padded to the latent grid), masked image, reference
        original = to_float(pixels[box[0] : box[2], box[1] : box[3]])
        region_mask = gen_mask[box[0] : box[2], box[1] : box[3]]
        original, region_mask = pad_to_multiple(original, region_mask, bottom - top, right - left)
        mask_t = torch.from_numpy(region_mask.astype(np.float32))[None, None]
        original_t = model_input(original)
        if reference is not None:
            upsampled = sample_region(reference, (height, width), (top, left, bottom, right))
            reference_t = torch.where(mask_t > 0, model_input(upsampled), original_t)
        else:
            reference_t = original_t
        base_latents = self.encode(reference_t)  # (1, 4, H/8, W/8)
        masked_latents = self.encode(original_t * (mask_t < 0.5))
        mask_latents = latent_mask_tensor(mask_t, factor).to(device, base_latents.dtype)  # any coverage
        del original, original_t, reference_t  # the region's pixels are not needed while denoising

        # start latents: the reference noised to `strength` (SDEdit), pure noise at 1.0
        timesteps = self.stage_timesteps(steps, strength, custom=reference is None)
        noise = randn_like_region(base_latents, generator)
        if strength >= 1.0:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(base_latents, noise, timesteps[:1])
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, settings.eta)

        # per-patch inputs: tiles in region coordinates, windows, reference banks
        canvas = (-(-height // factor), -(-width // factor))
        windows = [tile_window(t, canvas, overlap) for t in tiles]
        tiles = [t.shifted(-region.top, -region.left) for t in tiles]
        fusion = TileFusion(tuple(latents.shape), windows, tiles)
        # patches run `stage2.patch_batch_size` at a time (all tiles of a group have one size, see plan_tiles)
        stage2 = stage2 or Stage2Memory(1, "device")
        size = stage2.patch_batch_size
        batches = [tiles[i : i + size] for i in range(0, len(tiles), size)]

        def stacked(tensor, batch):  # (k, C, h, w): the batch's patches of a region tensor
            return torch.cat([tensor[(..., *tile.slices)] for tile in batch])

        references = ReferenceBanks(self, stage2.bank_placement, text, settings.reference_timestep)
        if rpa_scale != 0 and reference is not None:
            bar = self.progress_bar(total=len(tiles), desc="reference patches")  # counts patches, like stage 2
            for batch in batches:
                references.add(stacked(base_latents, batch))
                bar.update(len(batch))
            bar.close()
        time_ids = self.time_ids(tiles[0].height * factor, tiles[0].width * factor, text)

        # denoise all patches in lock step; fuse noise predictions, then one scheduler step
        bar = self.progress_bar(total=len(timesteps) * len(tiles), desc=f"stage 2 ({len(tiles)} patches)")
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            model_latents = self.scheduler.scale_model_input(latents, t)
            fused = fusion.start(device)
            for index, batch in enumerate(batches):
                # the DCA acts in stage 1 only: in the patches it halved the fills' sharpness (docs/method.md)
                attention_kwargs = {"rpa_bank": references.bank(index), "rpa_scale": rpa_scale}
                noise = self.predict_noise(
                    stacked(model_latents, batch),
                    t,
                    stacked(mask_latents, batch),
                    stacked(masked_latents, batch),
                    text,
                    time_ids,
                    attention_kwargs,
                )
                fused.add(batch, noise)
                bar.update(len(batch))
                bar.set_postfix_str(f"step {i + 1}/{len(timesteps)}")
            noise_pred = fused.result(latents.dtype)
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            latents = self.on_step_end(
                context,
                i,
                t,
                latents,
                prompt_embeds=text.embeds,
                add_text_embeds=text.pooled,
                add_time_ids=time_ids,
                mask=mask_latents,
                masked_image_latents=masked_latents,
            )
        bar.close()

        # latents no patch covered keep the reference; decode the region
        covered = fusion.covered.to(device)
        latents = torch.where(covered, latents, base_latents)
        fill = self.decode(latents)[0].permute(1, 2, 0).cpu().numpy()
        return fill[: box[2] - box[0], : box[3] - box[1]], box

    def record_reference(self, reference_latents, text, timestep: int) -> ReferenceBank:
        """The reference bank of a batch of clean reference patches, under the prompt (no guidance)."""
        positive = text.positive()
        batch = reference_latents.shape[0]
        h, w = reference_latents.shape[-2:]
        time_ids = self.time_ids(h * self.vae_scale_factor, w * self.vae_scale_factor, positive)
        added = {"text_embeds": positive.pooled.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}
        if positive.image_embeds is not None:
            added["image_embeds"] = [e.expand(batch, *e.shape[1:]) for e in positive.image_embeds]
        timestep_cond = positive.timestep_cond.expand(batch, -1) if positive.timestep_cond is not None else None
        return ReferenceBank.recorded(
            self.unet,
            reference_latents,
            timestep,
            positive.embeds.expand(batch, -1, -1),
            added,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=getattr(self, "_cross_attention_kwargs", None),
        )

    # ------------------------------------------------------------------ progress

    #: The class of every progress bar of a call. A tqdm subclass can watch a run (the web app
    #: streams stage, patch group and step from it) or stop it by raising from `update`/`__iter__`.
    progress_bar_class = tqdm

    def progress_bar(self, iterable=None, total=None, desc: str = ""):
        """diffusers' progress bar (its `set_progress_bar_config` applies), of `progress_bar_class`."""
        config = dict(getattr(self, "_progress_bar_config", {}))
        config.setdefault("leave", False)
        config.setdefault("desc", desc)
        return self.progress_bar_class(iterable, total=total, **config)


def choose_stage2_memory(backbone, plan, device) -> "Stage2Memory":
    """Stage2Memory for `plan` (by its settings) on `device` from the memory estimate (also set as plan.memory).

    `backbone` needs unet, vae, text encoders and vae_scale_factor (a pipeline, or models
    on the meta device for a plan made without loading weights).
    """
    settings = plan.settings
    device = torch.device(device)
    budget = settings.max_memory if settings.max_memory is not None else available_memory(device)
    if not plan.tiles:
        batch, placement = settings.patch_batch_size or 1, "device"
        estimate = estimate_memory(backbone, plan, batch, placement, device)
    elif settings.reference_banks == "auto":
        batch, placement, estimate = stage2_settings(backbone, plan, budget, settings.patch_batch_size, device)
    else:
        batch = min(settings.patch_batch_size or 1, max(len(g) for g in plan.groups))
        placement = settings.reference_banks
        estimate = estimate_memory(backbone, plan, batch, placement, device)
    plan.memory = estimate
    if estimate.peak > budget:
        warnings.warn(
            f"the inpaint is expected to need {estimate.peak / 2**20:,.0f} MiB on {device}, over the "
            f"{budget / 2**20:,.0f} MiB budget, even with the smallest stage-2 settings; it runs "
            "anyway (a smaller tile_size or cpu_offload needs less)",
            stacklevel=3,
        )
    return Stage2Memory(batch, placement)


@dataclass(frozen=True)
class Stage2Memory:
    """How stage 2 spends memory: patches per UNet call, and where reference banks live (BANK_PLACEMENTS)."""

    patch_batch_size: int
    bank_placement: str

    def smaller(self, device) -> "Stage2Memory | None":
        """The next settings to try after an out-of-memory error, or None at the smallest."""
        if self.patch_batch_size > 1:
            return Stage2Memory(self.patch_batch_size // 2, self.bank_placement)
        order = [p for p in BANK_PLACEMENTS if p != "host" or device.type != "cpu"]
        later = order[order.index(self.bank_placement) + 1 :]
        return Stage2Memory(1, later[0]) if later else None


class ReferenceBanks:
    """The reference banks of one patch group's batches, kept where `placement` says.

    "device": recorded once, kept on the device; "host": recorded once, kept on the host
    (pinned) and moved over for each UNet call; "recompute": only the reference latents
    are kept, and each call records its batch's bank again (the same tokens, since the
    reference does not change).
    """

    def __init__(self, pipe, placement: str, text, timestep: int):
        self.pipe, self.placement, self.text, self.timestep = pipe, placement, text, timestep
        self.items: list = []

    def add(self, reference_latents) -> None:
        if self.placement == "recompute":
            self.items.append(reference_latents)
            return
        bank = self.pipe.record_reference(reference_latents, self.text, self.timestep)
        if self.placement == "host":
            bank = bank.to("cpu", pin_memory=torch.cuda.is_available())
        self.items.append(bank)

    def bank(self, index: int) -> ReferenceBank | None:
        if not self.items:
            return None
        item = self.items[index]
        if self.placement == "recompute":
            return self.pipe.record_reference(item, self.text, self.timestep)
        if self.placement == "host":
            return item.to(self.pipe._execution_device, non_blocking=True)
        return item


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU and MPS allocators' own words for it."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def retry_out_of_memory(refine, stage2: Stage2Memory, generator, device):
    """refine(stage2=...), with smaller settings after an out-of-memory error (said once).

    The random state is put back before each retry, so the result is the one the
    smaller settings give from the start.
    """
    state = generator.get_state() if generator is not None else torch.random.get_rng_state()
    said = False
    while True:
        try:
            return refine(stage2=stage2)
        except Exception as error:
            smaller = stage2.smaller(device)
            if not is_out_of_memory(error) or smaller is None:
                raise
            if not said:
                warnings.warn(
                    f"stage 2 ran out of memory with {stage2.patch_batch_size} patches per call and "
                    f"reference banks on the {stage2.bank_placement}; retrying with less "
                    f"(now {smaller.patch_batch_size}, {smaller.bank_placement})",
                    stacklevel=2,
                )
                said = True
            stage2 = smaller
            del error
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if generator is not None:
                generator.set_state(state)
            else:
                torch.random.set_rng_state(state)


@dataclass
class MethodRun:
    """One output image's run: its settings and plan, inputs, conditioning and random source."""

    settings: InpaintSettings
    plan: InpaintPlan
    image: LoadedImage
    mask: np.ndarray
    conditioning: Conditioning
    generator: torch.Generator | None
    latents: torch.Tensor | None  # the whole-image pass's start noise, when the caller gave it
    index: int


def broadcast(items: list, count: int, name: str) -> list:
    """One input for each of `count` prompts: a single one is shared, otherwise the counts must agree."""
    if len(items) == count:
        return items
    if len(items) == 1:
        return items * count
    raise ValueError(f"{len(items)} {name}s for a batch of {count}: give one {name}, or one per prompt")


def per_image_generators(generator, total: int) -> list:
    """A generator per output image: a list must have one for each (as diffusers requires)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != total:
            raise ValueError(
                f"a list of {len(generator)} generators for {total} images (prompts x "
                "num_images_per_prompt); give one generator, or one per image"
            )
        return list(generator)
    return [generator] * total


def per_image_latents(latents, plans, num_images_per_prompt: int, channels: int, factor: int = LATENT_FACTOR) -> list:
    """The caller's start noise of the whole-image pass, one (1, C, h, w) slice per output image."""
    total = len(plans) * num_images_per_prompt
    if latents is None:
        return [None] * total
    sizes = {plan.stage1_size for plan in plans if not plan.empty_mask}
    if None in sizes:
        raise ValueError(
            "latents are the start noise of the whole-image pass; the tiled method has none "
            "(its patches' noise comes from the generator)"
        )
    if len(sizes) > 1:
        raise ValueError(f"latents cannot serve images whose whole-image passes differ in size ({sorted(sizes)})")
    width, height = sizes.pop() if sizes else (0, 0)
    expected = (total, channels, height // factor, width // factor)
    if tuple(latents.shape) != expected:
        raise ValueError(
            f"latents must have shape {expected} (images, channels, and the whole-image pass's "
            f"{width}x{height} px on the latent grid), got {tuple(latents.shape)}"
        )
    return [latents[i : i + 1] for i in range(total)]


def image_rows(embeds: torch.Tensor, index: int, count: int, guided: bool) -> torch.Tensor:
    """Prompt `index`'s rows of IP-Adapter embeddings given per prompt ([negatives; positives] when guided)."""
    per_half = embeds.shape[0] // (2 if guided else 1)
    if per_half != count:
        raise ValueError(
            f"ip_adapter_image_embeds hold {per_half} images for {count} prompts: give one, or one per prompt"
        )
    rows = (
        [embeds[index : index + 1], embeds[per_half + index : per_half + index + 1]]
        if guided
        else [embeds[index : index + 1]]
    )
    return torch.cat(rows)


def check_output_size(image: LoadedImage, height, width) -> None:
    """height/width are the output's size; Patch-Adapter keeps the image's, so they must agree with it."""
    for name, asked, own in (("height", height, image.size[1]), ("width", width, image.size[0])):
        if asked is not None and asked != own:
            raise ValueError(
                f"{name}={asked} differs from the image's {own} px: Patch-Adapter inpaints at the "
                "image's own resolution (that is its purpose); resize the image first if you "
                "want another size"
            )


def randn_like_region(latents: torch.Tensor, generator) -> torch.Tensor:
    """Noise for a whole region at once, so overlapping patches share it."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
