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
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import retrieve_latents
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .adapters import BUNDLED_ADAPTER_FILE, ReferenceBank, install_adapters, load_adapter, save_adapter
from .adapters.attention import repeat_to_batch
from .backbone import load_backbone, native_size, resolve_device, resolve_dtype, tiny_weights_dir
from .compositing import composite_into, with_opaque_alpha
from .image_io import LoadedImage, load_image, load_mask, loaded_from_pil
from .image_io import from_float as from_unit_float  # the old names, until the body uses from_float/to_float
from .image_io import to_float as to_unit_float
from .masks import feather_alpha_at, mask_bbox, resize_mask_any
from .memory import BANK_PLACEMENTS, available_memory, estimate_memory, stage2_settings
from .planning import METHODS, InpaintPlan, generation_mask, make_plan, padded_dims
from .resampling import resize_image, sample_region
from .tiling import TileFusion, bounding_tile, tile_window
from .validation import check_feather, check_inpaint_numbers, check_prompt

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass
class PatchAdapterPipelineOutput(BaseOutput):
    """`images`: PIL images (8 bit, RGBA when the input has alpha); `arrays`: the same in the
    input's bit depth, (H, W, 3) or (H, W, 4) with the input's alpha outside the mask."""

    images: list
    arrays: list = field(default_factory=list)
    plan: InpaintPlan | None = None


@dataclass
class TextConditioning:
    """Prompt embeddings for one inpaint, negative half first when guidance is on."""

    embeds: torch.Tensor  # (B, 77, 2048)
    pooled: torch.Tensor  # (B, 1280)
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return self.embeds.shape[0] == 2

    def positive(self) -> "TextConditioning":
        return TextConditioning(self.embeds[-1:], self.pooled[-1:], 1.0)


def as_loaded_image(image) -> LoadedImage:
    """A path, PIL image or (H, W, 3|4) uint8/uint16 array as a LoadedImage.

    A PIL image follows the rules of a file (EXIF orientation applied, 16-bit grey kept);
    an array is taken as it is, its 4th channel as alpha.
    """
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return load_image(image)
    if isinstance(image, PIL.Image.Image):
        return loaded_from_pil(image)
    if isinstance(image, np.ndarray):
        if image.dtype not in (np.uint8, np.uint16) or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(
                f"an image array must be (H, W, 3) or (H, W, 4) uint8/uint16, got {image.shape} {image.dtype}"
            )
        alpha = image[..., 3].copy() if image.shape[2] == 4 else None
        return LoadedImage(pixels=np.ascontiguousarray(image[..., :3]), alpha=alpha, path=None, format=None,
                           icc_profile=None)
    raise TypeError(f"image must be a path, a PIL image or a numpy array, not {type(image).__name__}")


def to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (1, 3, H, W) in [-1, 1], as diffusers' image processor does."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None] * 2.0 - 1.0


def pad_to_multiple(pixels: np.ndarray, mask: np.ndarray, height: int, width: int):
    """Pad (edge-replicate) pixels and (with False) the mask to height x width."""
    h, w = mask.shape
    if (h, w) == (height, width):
        return pixels, mask
    pixels = np.pad(pixels, ((0, height - h), (0, width - w), (0, 0)), mode="edge")
    mask = np.pad(mask, ((0, height - h), (0, width - w)))
    return pixels, mask


def bundled_adapter(source: str) -> Path | None:
    """The adapter file a backbone folder ships, if any."""
    folder = tiny_weights_dir() if str(source) == "tiny" else Path(str(source)).expanduser()
    path = folder / BUNDLED_ADAPTER_FILE
    return path if path.is_file() else None


class PatchAdapterPipeline(StableDiffusionXLInpaintPipeline):
    """Text-guided inpainting of images of any size with Patch-Adapter (ICCV 2025)."""

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
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, requires_aesthetics_score=requires_aesthetics_score,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
        )
        install_adapters(self.unet)
        self.backbone_name = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        source: str = "tiny",
        *,
        adapter=None,
        device: str = "auto",
        dtype=None,
        torch_dtype=None,
        cpu_offload: bool = False,
        config: str | None = None,
        variant: str | None = None,
        scheduler: str | None = None,
        local_files_only: bool | None = None,
    ) -> "PatchAdapterPipeline":
        """Load the backbone (``"tiny"``, a diffusers folder, a single file or a hub id).

        device: "auto" (cuda, mps, cpu), or any torch device. dtype: fp32 (default),
        fp16 or bf16. cpu_offload: keep each model on the CPU until it runs
        (diffusers' model offload; needs accelerate and a GPU). adapter: a
        Patch-Adapter .safetensors file to load; by default the one a diffusers
        folder ships (``patch_adapter.safetensors`` beside ``model_index.json``, as
        the trained tiny backbone does); False loads none. local_files_only: never
        reach the hub (default: the HF_HUB_OFFLINE environment variable).
        """
        dtype = resolve_dtype(torch_dtype if torch_dtype is not None else dtype)
        components = load_backbone(source, torch_dtype=dtype, config=config, variant=variant,
                                   local_files_only=local_files_only)
        pipe = cls(**components)
        pipe.backbone_name = str(source)
        if scheduler:
            pipe.set_scheduler(scheduler)
        if adapter is None:
            adapter = bundled_adapter(source)
        if adapter:
            pipe.load_adapter(adapter)
        device = resolve_device(device)
        if cpu_offload and device.type != "cpu":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        return pipe

    @contextlib.contextmanager
    def stock_attention(self):
        """Within this block the UNet has diffusers' stock processors (no adapter modules)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        installed = self.unet.attn_processors
        self.unet.set_attn_processor(AttnProcessor2_0())
        try:
            yield self.unet
        finally:
            self.unet.set_attn_processor(installed)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the backbone as a diffusers folder, without the adapters (see `save_adapter`)."""
        with self.stock_attention():
            super().save_pretrained(save_directory, **kwargs)

    def load_adapter(self, path) -> dict:
        """Load Patch-Adapter weights (DCA, RPA or both); returns the file's manifest."""
        return load_adapter(path, self.unet)

    def save_adapter(self, path, kinds=("dca", "rpa")):
        return save_adapter(path, self.unet, kinds, backbone_name=self.backbone_name)

    def set_scheduler(self, name: str) -> None:
        """Swap the scheduler by short name (euler, euler-a, ddim, dpm++, unipc)."""
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
        self.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(self.scheduler.config)

    @property
    def native_size(self) -> int:
        return native_size(self.unet, self.vae_scale_factor)

    # ------------------------------------------------------------------ planning

    def plan(
        self,
        image,
        mask_image=None,
        method: str = "patch-adapter",
        num_inference_steps: int = 50,
        strength: float = 0.9999,
        refine_steps: int | None = None,
        refine_strength: float = 0.6,
        guidance_scale: float = 7.5,
        rpa_scale: float = 1.0,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        mask_dilation: int = 0,
        crop_margin: int | None = None,
        mask_threshold: float = 0.5,
        patch_batch_size: int | None = None,
        max_memory: int | None = None,
        reference_banks: str = "auto",
    ) -> InpaintPlan:
        """The plan of an inpaint (tiles, sizes, UNet evaluations, memory estimate) without running it."""
        loaded = as_loaded_image(image)
        mask = load_mask(mask_image, loaded, threshold=mask_threshold)
        plan = self._plan(loaded, mask, method, num_inference_steps, strength, refine_steps, refine_strength,
                          guidance_scale, rpa_scale, tile_size, tile_overlap, mask_dilation, crop_margin)
        self.stage2_memory(plan, patch_batch_size, max_memory, reference_banks)
        return plan

    def _plan(self, loaded, mask, method, num_inference_steps, strength, refine_steps, refine_strength,
              guidance_scale, rpa_scale, tile_size, tile_overlap, mask_dilation, crop_margin) -> InpaintPlan:
        native = self.native_size
        tile = (tile_size or native) // self.vae_scale_factor
        overlap = (tile_overlap if tile_overlap is not None else native // 4) // self.vae_scale_factor
        return make_plan(
            image_size=loaded.size, mask=mask, method=method, native=native,
            num_inference_steps=num_inference_steps, strength=strength,
            refine_steps=refine_steps or num_inference_steps, refine_strength=refine_strength,
            tile_size=tile, tile_overlap=overlap, mask_dilation=mask_dilation,
            crop_margin=crop_margin if crop_margin is not None else native // 8,
            guidance=guidance_scale > 1.0, rpa_scale=rpa_scale,
        )

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str = "",
        image=None,
        mask_image=None,
        negative_prompt: str | None = None,
        method: str = "patch-adapter",
        num_inference_steps: int = 50,
        refine_steps: int | None = None,
        guidance_scale: float = 7.5,
        strength: float = 0.9999,
        refine_strength: float = 0.6,
        generator: torch.Generator | None = None,
        dca_scale: float = 1.0,
        rpa_scale: float = 1.0,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        mask_dilation: int = 0,
        mask_feather: int = 0,
        mask_threshold: float = 0.5,
        crop_margin: int | None = None,
        reference_timestep: int = 1,
        patch_batch_size: int | None = None,
        max_memory: int | None = None,
        reference_banks: str = "auto",
        num_images_per_prompt: int = 1,
        return_dict: bool = True,
    ):
        """Inpaint `image` inside `mask_image` (white = fill; None: the image's alpha).

        num_inference_steps/strength: the whole-image pass (stage 1, and the
        direct/crop/tiled baselines); refine_steps (default: num_inference_steps)
        and refine_strength (1.0 = from pure noise): the patches of stage 2.
        tile_size/tile_overlap in pixels (default: native size and a quarter of it).
        mask_dilation: grow the region the model regenerates (px); mask_feather:
        blend the fill into the original over this many px *inside* the mask.
        Pixels outside the mask are never changed. patch_batch_size: stage-2 patches
        per UNet call (default: the most that fit `max_memory`, up to 8; results agree
        to float rounding). max_memory: bytes the inpaint may use on its device,
        weights included (default: what the device has free). reference_banks: where
        stage 2 keeps the reference banks, "device", "host" (moved per call),
        "recompute" (recorded again per call), or "auto": the first that fits.
        An out-of-memory error in stage 2 halves the patch batch and retries.
        """
        # 1. Check inputs
        prompt = check_prompt(prompt)
        negative_prompt = check_prompt(negative_prompt, "negative_prompt") if negative_prompt is not None else None
        check_inpaint_numbers(
            num_inference_steps=num_inference_steps, refine_steps=refine_steps, guidance_scale=guidance_scale,
            strength=strength, refine_strength=refine_strength, dca_scale=dca_scale, rpa_scale=rpa_scale,
            mask_threshold=mask_threshold, mask_dilation=mask_dilation, mask_feather=mask_feather,
            num_images_per_prompt=num_images_per_prompt, patch_batch_size=patch_batch_size,
            tile_size=tile_size, tile_overlap=tile_overlap, crop_margin=crop_margin,
        )
        loaded = as_loaded_image(image)
        mask = load_mask(mask_image, loaded, threshold=mask_threshold)
        self.check_call_inputs(method, num_inference_steps, refine_steps, strength, refine_strength,
                               tile_size, tile_overlap, mask_dilation, mask_feather, num_images_per_prompt,
                               patch_batch_size, reference_banks)
        check_feather(mask, mask_feather)
        plan = self._plan(loaded, mask, method, num_inference_steps, strength, refine_steps, refine_strength,
                          guidance_scale, rpa_scale, tile_size, tile_overlap, mask_dilation, crop_margin)
        stage2 = self.stage2_memory(plan, patch_batch_size, max_memory, reference_banks)
        original = loaded.channels  # colour, and alpha last when the image has it
        if plan.empty_mask:
            arrays = [original.copy() for _ in range(num_images_per_prompt)]
            return self._output(arrays, plan, return_dict)

        # 2. Encode the prompt once for every stage
        self._guidance_scale = guidance_scale
        self._clip_skip = None
        text = self.encode_text(prompt, negative_prompt, guidance_scale)

        # 3. Run the method, once per requested image
        arrays = []
        for _ in range(num_images_per_prompt):
            fills = self._run_method(plan, loaded, mask, text, generator, num_inference_steps, strength,
                                     refine_steps or num_inference_steps, refine_strength, dca_scale,
                                     rpa_scale, mask_dilation, reference_timestep, stage2)
            # 4. Composite inside the mask only
            result = original.copy()
            for fill, (top, left, bottom, right) in fills:
                alpha = feather_alpha_at(mask, (top, left, bottom, right), mask_feather)
                composite_into(result, with_opaque_alpha(fill, result.shape[2]), mask[top:bottom, left:right], alpha,
                               offset=(top, left))
            arrays.append(result)

        self.maybe_free_model_hooks()
        return self._output(arrays, plan, return_dict)

    def check_call_inputs(self, method, steps, refine_steps, strength, refine_strength, tile_size, tile_overlap,
                          mask_dilation, mask_feather, num_images, patch_batch_size=None, reference_banks="auto"):
        check_call_settings(method, steps, refine_steps, strength, refine_strength, tile_size, tile_overlap,
                            mask_dilation, mask_feather, num_images, patch_batch_size,
                            native=self.native_size, factor=self.vae_scale_factor)
        if reference_banks not in ("auto",) + BANK_PLACEMENTS:
            raise ValueError(f"reference_banks must be auto, {', '.join(BANK_PLACEMENTS)}; got {reference_banks!r}")
        if reference_banks == "host" and self._execution_device.type == "cpu":
            raise ValueError("reference_banks='host' is for accelerators; on the CPU the host is the device "
                             "(use 'recompute' to bound memory)")

    def stage2_memory(self, plan, patch_batch_size=None, max_memory=None, reference_banks="auto") -> "Stage2Memory":
        """Patch batch and reference-bank placement for `plan`, from the memory estimate; sets plan.memory."""
        return choose_stage2_memory(self, plan, self._execution_device, patch_batch_size, max_memory,
                                    reference_banks)

    def _output(self, arrays, plan, return_dict):
        images = [PIL.Image.fromarray(a if a.dtype == np.uint8 else from_unit_float(to_unit_float(a), np.uint8))
                  for a in arrays]
        if not return_dict:
            return (images,)
        return PatchAdapterPipelineOutput(images=images, arrays=arrays, plan=plan)

    def _run_method(self, plan, loaded, mask, text, generator, steps, strength, refine_steps, refine_strength,
                    dca_scale, rpa_scale, mask_dilation, reference_timestep, stage2):
        """The fills: a list of (pixels (h, w, 3) in [0, 1], box (top, left, bottom, right))."""
        method = plan.method
        pixels = loaded.pixels
        height, width = mask.shape
        gen_mask = generation_mask(mask, mask_dilation)
        use_dca = dca_scale if method == "patch-adapter" else 0.0

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
                fill = self._inpaint_padded(to_unit_float(box_pixels), box_mask, text, generator, steps, strength,
                                            use_dca)
                return [(fill[m_top:m_bottom, m_left:m_right], fill_box)]
            low = self._stage1_at(box_pixels, box_mask, size, text, generator, steps, strength, use_dca)
            fill = sample_region(low, (bottom - top, right - left), (m_top, m_left, m_bottom, m_right))
            return [(fill, fill_box)]

        reference = None
        if plan.stage1_size is not None:
            # stage 1 at the native pixel count; its result is the reference of stage 2
            reference = self._stage1_at(pixels, gen_mask, plan.stage1_size, text, generator,
                                        steps, strength, use_dca)
        # stage 2 (or the tiled baseline): each group of overlapping patches on its own
        fills = []
        for group in plan.groups:
            refine = functools.partial(
                self._refine_patches, group, plan.tile_overlap, pixels, gen_mask, reference, text, generator,
                steps=refine_steps if method != "tiled" else steps,
                strength=refine_strength if method != "tiled" else strength,
                dca_scale=use_dca, rpa_scale=rpa_scale if method == "patch-adapter" else 0.0,
                reference_timestep=reference_timestep,
            )
            fills.append(retry_out_of_memory(refine, stage2, generator, self._execution_device))
        return fills

    # ------------------------------------------------------------------ text

    def encode_text(self, prompt, negative_prompt, guidance_scale) -> TextConditioning:
        device = self._execution_device
        embeds, neg_embeds, pooled, neg_pooled = self.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance_scale > 1.0, negative_prompt=negative_prompt,
        )
        if guidance_scale > 1.0:
            embeds = torch.cat([neg_embeds, embeds])
            pooled = torch.cat([neg_pooled, pooled])
        return TextConditioning(embeds, pooled, guidance_scale)

    def time_ids(self, height: int, width: int, text: TextConditioning) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop top-left, target size."""
        projection_dim = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None \
            else int(text.pooled.shape[-1])
        ids, neg_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), 6.0, 2.5, (height, width), (0, 0), (height, width),
            dtype=text.embeds.dtype, text_encoder_projection_dim=projection_dim,
        )
        ids = torch.cat([neg_ids, ids]) if text.guided else ids
        return ids.to(self._execution_device)

    def predict_noise(self, latents, t, mask, masked_latents, text, time_ids, attention_kwargs):
        """Guided noise prediction for a batch of latents already scaled by the scheduler.

        latents (k, 4, h, w); mask and masked latents with batch k or 1; text and
        time_ids with one row per guidance half, shared by the k items.
        """
        batch = latents.shape[0]
        model_input = torch.cat([latents] * 2) if text.guided else latents
        full = model_input.shape[0]
        model_input = torch.cat([model_input, repeat_to_batch(mask, full), repeat_to_batch(masked_latents, full)],
                                dim=1)
        noise = self.unet(
            model_input, t, encoder_hidden_states=text.embeds.repeat_interleave(batch, dim=0),
            added_cond_kwargs={"text_embeds": text.pooled.repeat_interleave(batch, dim=0),
                               "time_ids": time_ids.repeat_interleave(batch, dim=0)},
            cross_attention_kwargs=attention_kwargs, return_dict=False,
        )[0]
        if text.guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + text.guidance_scale * (cond - uncond)
        return noise

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
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, image) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latents, the distribution's mode (no noise)."""
        with self._vae_for((image.shape[-2] // self.vae_scale_factor, image.shape[-1] // self.vae_scale_factor)) as dt:
            latents = retrieve_latents(self.vae.encode(image.to(self._execution_device, dt)), sample_mode="argmax")
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    # ------------------------------------------------------------------ stage 1

    def _stage1_at(self, pixels, mask, size, text, generator, steps, strength, dca_scale) -> torch.Tensor:
        """Inpaint `pixels` (uint8/uint16) resized to `size`; returns (1, 3, h, w) in [0, 1].

        The mask is resized so that no masked pixel is lost (docs/method.md, stage 1).
        """
        width, height = size
        small = resize_image(pixels, (height, width))
        small_mask = resize_mask_any(mask, (height, width))
        return self._inpaint_whole(small, small_mask, text, generator, steps, strength, dca_scale)

    def _inpaint_padded(self, pixels, mask, text, generator, steps, strength, dca_scale) -> np.ndarray:
        """The whole image at its own size (padded to the latent grid); (h, w, 3) in [0, 1]."""
        h, w = mask.shape
        width, height = padded_dims(w, h)
        pixels, padded_mask = pad_to_multiple(pixels, mask, height, width)
        out = self._inpaint_whole(pixels, padded_mask, text, generator, steps, strength, dca_scale)
        return out[0].permute(1, 2, 0).cpu().numpy()[:h, :w]

    def _inpaint_whole(self, pixels, mask, text, generator, steps, strength, dca_scale) -> torch.Tensor:
        """One inpaint at the pixels' own size (multiples of 8), as diffusers' SDXL inpainting does it.

        With dca_scale 0 this is step for step `StableDiffusionXLInpaintPipeline.__call__`
        (same RNG order: image latents, noise, masked-image latents), which the tests
        check. Returns (1, 3, H, W) in [0, 1].
        """
        device = self._execution_device
        height, width = mask.shape
        dtype = text.embeds.dtype
        image = to_model_range(pixels).float()
        mask_t = torch.from_numpy(mask.astype(np.float32))[None, None]

        # timesteps, shortened by strength
        self.scheduler.set_timesteps(steps, device=device)
        timesteps, _ = self.get_timesteps(steps, strength, device)
        masked_image = image * (mask_t < 0.5)
        latents, _ = self.prepare_latents(
            1, self.vae.config.latent_channels, height, width, dtype, device, generator,
            image=image, timestep=timesteps[:1], is_strength_max=strength == 1.0, return_noise=True,
        )
        mask_latents, masked_latents = self.prepare_mask_latents(
            mask_t, masked_image, 1, height, width, dtype, device, generator, False
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        time_ids = self.time_ids(height, width, text)
        attention_kwargs = {"dca_mask": mask_latents, "dca_scale": dca_scale}

        for t in self._progress(timesteps, f"stage 1 ({width}x{height})"):
            model_latents = self.scheduler.scale_model_input(latents, t)
            noise = self.predict_noise(model_latents, t, mask_latents, masked_latents, text, time_ids,
                                       attention_kwargs)
            latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
        return self.decode(latents)

    # ------------------------------------------------------------------ stage 2

    def _refine_patches(self, tiles, overlap, pixels, gen_mask, reference, text, generator, steps, strength,
                        dca_scale, rpa_scale, reference_timestep, stage2=None):
        """Denoise overlapping patches in lock step; returns (pixels (h, w, 3) in [0, 1], box).

        tiles: one group of the plan (canvas latent coordinates); box: the pixels the
        result covers (top, left, bottom, right). reference: the stage-1 result
        (1, 3, h, w), upsampled here to full size inside the mask; None for the tiled
        baseline, which starts from noise without one.
        """
        device = self._execution_device
        factor = self.vae_scale_factor
        height, width = gen_mask.shape
        region = bounding_tile(tiles)
        top, left = region.top * factor, region.left * factor
        bottom, right = top + region.height * factor, left + region.width * factor
        box = (top, left, min(bottom, height), min(width, right))

        # region pixels (padded to the latent grid), masked image, reference
        original = to_unit_float(pixels[box[0]:box[2], box[1]:box[3]])
        region_mask = gen_mask[box[0]:box[2], box[1]:box[3]]
        original, region_mask = pad_to_multiple(original, region_mask, bottom - top, right - left)
        mask_t = torch.from_numpy(region_mask.astype(np.float32))[None, None]
        original_t = to_model_range(original)
        if reference is not None:
            upsampled = sample_region(reference, (height, width), (top, left, bottom, right))
            reference_t = torch.where(mask_t > 0, to_model_range(upsampled), original_t)
        else:
            reference_t = original_t
        base_latents = self.encode(reference_t)  # (1, 4, H/8, W/8)
        masked_latents = self.encode(original_t * (mask_t < 0.5))
        mask_latents = F.max_pool2d(mask_t, factor).to(device, base_latents.dtype)  # any coverage
        del original, original_t, reference_t  # the region's pixels are not needed while denoising

        # start latents: the reference noised to `strength` (SDEdit), pure noise at 1.0
        self.scheduler.set_timesteps(steps, device=device)
        timesteps, _ = self.get_timesteps(steps, strength, device)
        noise = randn_like_region(base_latents, generator)
        if strength >= 1.0:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(base_latents, noise, timesteps[:1])
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)

        # per-patch inputs: tiles in region coordinates, windows, reference banks
        canvas = (-(-height // factor), -(-width // factor))
        windows = [tile_window(t, canvas, overlap) for t in tiles]
        tiles = [t.shifted(-region.top, -region.left) for t in tiles]
        fusion = TileFusion(tuple(latents.shape), windows, tiles)
        # patches run `stage2.patch_batch_size` at a time (all tiles of a group have one size, see plan_tiles)
        stage2 = stage2 or Stage2Memory(1, "device")
        size = stage2.patch_batch_size
        batches = [tiles[i: i + size] for i in range(0, len(tiles), size)]

        def stacked(tensor, batch):  # (k, C, h, w): the batch's patches of a region tensor
            return torch.cat([tensor[(..., *tile.slices)] for tile in batch])

        references = ReferenceBanks(self, stage2.bank_placement, text, reference_timestep)
        if rpa_scale != 0 and reference is not None:
            bar = self._progress(None, "reference patches", total=len(tiles))  # counts patches, like stage 2
            for batch in batches:
                references.add(stacked(base_latents, batch))
                bar.update(len(batch))
            bar.close()
        time_ids = self.time_ids(tiles[0].height * factor, tiles[0].width * factor, text)

        # denoise all patches in lock step; fuse noise predictions, then one scheduler step
        bar = self._progress(None, f"stage 2 ({len(tiles)} patches)", total=len(timesteps) * len(tiles))
        for i, t in enumerate(timesteps):
            model_latents = self.scheduler.scale_model_input(latents, t)
            fused = fusion.start(device)
            for index, batch in enumerate(batches):
                attention_kwargs = {"dca_mask": stacked(mask_latents, batch), "dca_scale": dca_scale,
                                    "rpa_bank": references.bank(index), "rpa_scale": rpa_scale}
                noise = self.predict_noise(stacked(model_latents, batch), t, stacked(mask_latents, batch),
                                           stacked(masked_latents, batch), text, time_ids, attention_kwargs)
                fused.add(batch, noise)
                bar.update(len(batch))
                bar.set_postfix_str(f"step {i + 1}/{len(timesteps)}")
            noise_pred = fused.result(latents.dtype)
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        bar.close()

        # latents no patch covered keep the reference; decode the region
        covered = fusion.covered.to(device)
        latents = torch.where(covered, latents, base_latents)
        fill = self.decode(latents)[0].permute(1, 2, 0).cpu().numpy()
        return fill[: box[2] - box[0], : box[3] - box[1]], box

    def record_reference(self, reference_latents, text, timestep: int) -> ReferenceBank:
        """Pass a clean reference patch through the frozen UNet once, keeping attn1 inputs."""
        bank = ReferenceBank()
        positive = text.positive()
        h, w = reference_latents.shape[-2:]
        time_ids = self.time_ids(h * self.vae_scale_factor, w * self.vae_scale_factor, positive)
        no_mask = torch.zeros_like(reference_latents[:, :1])
        t = torch.tensor(timestep, device=reference_latents.device)
        with bank.record():
            self.predict_noise(reference_latents, t, no_mask, reference_latents, positive, time_ids,
                               {"rpa_bank": bank})
        return bank

    # ------------------------------------------------------------------ progress

    #: The class of every progress bar of a call. A tqdm subclass can watch a run (the web app
    #: streams stage, patch group and step from it) or stop it by raising from `update`/`__iter__`.
    progress_bar_class = tqdm

    def _progress(self, iterable=None, desc: str = "", total: int | None = None):
        config = dict(getattr(self, "_progress_bar_config", {}))
        config.setdefault("leave", False)
        config.setdefault("desc", desc)
        return self.progress_bar_class(iterable, total=total, **config)


def choose_stage2_memory(backbone, plan, device, patch_batch_size=None, max_memory=None,
                         reference_banks="auto") -> "Stage2Memory":
    """Stage2Memory for `plan` on `device` from the memory estimate (also set as plan.memory).

    `backbone` needs unet, vae, text encoders and vae_scale_factor (a pipeline, or models
    on the meta device for a plan made without loading weights).
    """
    device = torch.device(device)
    budget = max_memory if max_memory is not None else available_memory(device)
    if not plan.tiles:
        batch, placement = patch_batch_size or 1, "device"
        estimate = estimate_memory(backbone, plan, batch, placement, device)
    elif reference_banks == "auto":
        batch, placement, estimate = stage2_settings(backbone, plan, budget, patch_batch_size, device)
    else:
        batch = min(patch_batch_size or 1, max(len(g) for g in plan.groups))
        placement = reference_banks
        estimate = estimate_memory(backbone, plan, batch, placement, device)
    plan.memory = estimate
    if estimate.peak > budget:
        warnings.warn(f"the inpaint is expected to need {estimate.peak / 2**20:,.0f} MiB on {device}, over the "
                      f"{budget / 2**20:,.0f} MiB budget, even with the smallest stage-2 settings; it runs "
                      "anyway (a smaller tile_size or cpu_offload needs less)", stacklevel=3)
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
        later = order[order.index(self.bank_placement) + 1:]
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
                warnings.warn(f"stage 2 ran out of memory with {stage2.patch_batch_size} patches per call and "
                              f"reference banks on the {stage2.bank_placement}; retrying with less "
                              f"(now {smaller.patch_batch_size}, {smaller.bank_placement})", stacklevel=2)
                said = True
            stage2 = smaller
            del error
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if generator is not None:
                generator.set_state(state)
            else:
                torch.random.set_rng_state(state)


def check_call_settings(method, steps, refine_steps, strength, refine_strength, tile_size, tile_overlap,
                        mask_dilation, mask_feather, num_images, patch_batch_size=None, *, native: int, factor: int = 8,
                        mask_threshold: float = 0.5, **numbers):
    """Refuse settings the pipeline cannot run, before any work (batch checks a manifest's rows with it).

    The numbers' types and ranges are `validation.check_inpaint_numbers`'s (`numbers`: its
    other keywords, such as guidance_scale); what depends on the backbone is checked here.
    """
    check_inpaint_numbers(num_inference_steps=steps, refine_steps=refine_steps, strength=strength,
                          refine_strength=refine_strength, tile_size=tile_size, tile_overlap=tile_overlap,
                          mask_dilation=mask_dilation, mask_feather=mask_feather, num_images_per_prompt=num_images,
                          patch_batch_size=patch_batch_size, mask_threshold=mask_threshold, **numbers)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if min(int(steps * strength), steps) < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
    tile = tile_size or native
    overlap = tile_overlap if tile_overlap is not None else native // 4
    if tile % factor or overlap % factor or tile <= 0:
        raise ValueError(f"tile_size ({tile}) and tile_overlap ({overlap}) must be positive multiples of {factor} px")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap ({overlap}) must be smaller than tile_size ({tile})")


def randn_like_region(latents: torch.Tensor, generator) -> torch.Tensor:
    """Noise for a whole region at once, so overlapping patches share it."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
