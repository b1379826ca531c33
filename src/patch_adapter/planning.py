"""What an inpaint will do, before it does it: sizes, tiles and UNet evaluations.

`make_plan` is pure (sizes and a mask in, a plan out), so the CLI's plan mode and
the benchmarks can count the cost of an 8K inpaint without running a model, and the
pipeline follows the same plan when it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .masks import dilate_mask, latent_mask, mask_bbox
from .settings import METHODS, InpaintSettings
from .tiling import Tile, bounding_tile, group_tiles, plan_tiles, tiles_touching
from .validation import LATENT_FACTOR

__all__ = ["METHODS", "InpaintPlan", "make_plan"]


def native_dims(width: int, height: int, native: int) -> tuple[int, int]:
    """(width, height) with about native**2 pixels, the aspect kept, both multiples of 8."""
    scale = math.sqrt(native * native / (width * height))
    w = max(LATENT_FACTOR, int(round(width * scale / LATENT_FACTOR)) * LATENT_FACTOR)
    h = max(LATENT_FACTOR, int(round(height * scale / LATENT_FACTOR)) * LATENT_FACTOR)
    return w, h


def padded_dims(width: int, height: int) -> tuple[int, int]:
    """The size rounded up to multiples of 8 (the UNet's latent grid)."""
    return -(-width // LATENT_FACTOR) * LATENT_FACTOR, -(-height // LATENT_FACTOR) * LATENT_FACTOR


def effective_steps(steps: int, strength: float) -> int:
    """Denoising steps actually run at a strength, as diffusers' `get_timesteps` counts them."""
    return min(int(steps * strength), steps)


def crop_box(mask: np.ndarray, margin: int, native: int) -> tuple[int, int, int, int]:
    """The crop baseline's box: the mask's bounding box plus a margin, at least native-size.

    Like diffusers' `padding_mask_crop`, the box is grown to hold the mask and the
    margin; it is then widened to at least the native size where the image allows,
    so that the crop is never processed below the backbone's resolution.
    """
    height, width = mask.shape
    top, left, bottom, right = mask_bbox(mask)
    top, left = max(0, top - margin), max(0, left - margin)
    bottom, right = min(height, bottom + margin), min(width, right + margin)

    def widen(lo, hi, limit):
        size = max(hi - lo, min(native, limit))
        lo = min(max(0, (lo + hi) // 2 - size // 2), limit - size)
        return lo, lo + size

    top, bottom = widen(top, bottom, height)
    left, right = widen(left, right, width)
    return top, left, bottom, right


@dataclass
class InpaintPlan:
    """Sizes, tiles and the number of UNet evaluations of one inpaint."""

    method: str
    image_size: tuple[int, int]  # (width, height)
    native: int
    empty_mask: bool = False
    stage1_size: tuple[int, int] | None = None  # (width, height) the whole-image pass runs at
    stage1_box: tuple[int, int, int, int] | None = None  # (top, left, bottom, right) it covers
    stage1_steps: int = 0
    tile_size: int = 0  # latents
    tile_overlap: int = 0  # latents
    latent_factor: int = LATENT_FACTOR  # pixels per latent of the VAE the tiles are planned for
    groups: list[list[Tile]] = field(default_factory=list)  # tiles that overlap, fused and decoded together
    stage2_steps: int = 0
    reference_passes: int = 0
    guidance: bool = True  # classifier-free guidance doubles the batch of each forward
    memory: object | None = None  # a memory.MemoryEstimate, where a pipeline made one
    settings: InpaintSettings | None = None  # resolved against `native`
    stage2: object | None = None  # a pipeline.Stage2Memory (patch batch, bank placement), where a pipeline chose one

    @property
    def tiles(self) -> list[Tile]:
        """Every patch (canvas latent coordinates), group by group."""
        return [tile for group in self.groups for tile in group]

    @property
    def regions(self) -> list[Tile]:
        """The latent box of each group: what stage 2 encodes and decodes."""
        return [bounding_tile(group) for group in self.groups]

    @property
    def unet_forwards(self) -> int:
        """UNet calls (a call with guidance evaluates a batch of two)."""
        return self.stage1_steps + len(self.tiles) * self.stage2_steps + self.reference_passes

    @property
    def unet_evaluations(self) -> int:
        """UNet evaluations of one latent of the call's size, counting both guidance halves."""
        batch = 2 if self.guidance else 1
        return batch * (self.stage1_steps + len(self.tiles) * self.stage2_steps) + self.reference_passes

    def describe(self) -> str:
        w, h = self.image_size
        lines = [f"method: {self.method}", f"image: {w}x{h} px (native {self.native} px)"]
        if self.empty_mask:
            lines.append("mask is empty: the image is returned unchanged, no UNet evaluation")
            return "\n".join(lines)
        if self.stage1_size:
            sw, sh = self.stage1_size
            top, left, bottom, right = self.stage1_box
            lines.append(
                f"whole-image pass: {sw}x{sh} px of box (top={top}, left={left}, bottom={bottom}, right={right}), "
                f"{self.stage1_steps} steps"
            )
        if self.tiles:
            px = self.latent_factor
            lines.append(
                f"patches: {len(self.tiles)} of {self.tile_size * px} px, overlap {self.tile_overlap * px} px, "
                f"{self.stage2_steps} steps each, {self.reference_passes} reference passes"
            )
            index = 0
            for group, r in zip(self.groups, self.regions, strict=True):
                lines.append(
                    f"patch region: top={r.top * px}, left={r.left * px}, {r.width * px}x{r.height * px} px, "
                    f"{len(group)} patches"
                )
                for t in group:
                    lines.append(
                        f"  patch {index}: top={t.top * px} left={t.left * px} size={t.width * px}x{t.height * px}"
                    )
                    index += 1
        lines.append(
            f"UNet forwards: {self.unet_forwards} ({self.unet_evaluations} evaluations"
            f"{' with classifier-free guidance' if self.guidance else ''})"
        )
        if self.memory is not None:
            lines.append(self.memory.describe())
        return "\n".join(lines)


def generation_mask(mask: np.ndarray, dilation: int) -> np.ndarray:
    """The mask the model fills: the user's mask grown by `dilation` px (bounding box only)."""
    if dilation <= 0:
        return mask
    box = mask_bbox(mask)
    if box is None:
        return mask
    top, left, bottom, right = box
    height, width = mask.shape
    top, left = max(0, top - dilation), max(0, left - dilation)
    bottom, right = min(height, bottom + dilation), min(width, right + dilation)
    out = np.zeros_like(mask)
    out[top:bottom, left:right] = dilate_mask(mask[top:bottom, left:right], dilation)
    return out


def make_plan(
    settings: InpaintSettings,
    image_size: tuple[int, int],
    mask: np.ndarray,
    native: int,
    latent_factor: int = LATENT_FACTOR,
) -> InpaintPlan:
    """Plan an inpaint; `mask` is the (height, width) bool mask at full resolution.

    `settings` are resolved against `native` here, and the plan keeps the resolved copy.
    `latent_factor`: pixels per latent of the backbone's VAE (SDXL's 8; the tiny world's
    f4 VAE 4); the patches are planned on its latent grid. Pixel sizes stay multiples
    of 8, so the factor must divide 8.
    """
    if latent_factor <= 0 or LATENT_FACTOR % latent_factor:
        raise ValueError(f"a VAE with {latent_factor} pixels per latent is not supported: it must divide 8")
    settings = settings.resolved(native)
    spec = settings.spec
    width, height = image_size
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} does not match image size {width}x{height}")
    plan = InpaintPlan(
        method=settings.method,
        image_size=(width, height),
        native=native,
        guidance=settings.guided,
        settings=settings,
        latent_factor=latent_factor,
    )
    if not mask.any():
        plan.empty_mask = True
        return plan

    small = width * height <= native * native
    stage1_steps = effective_steps(settings.num_inference_steps, settings.strength)
    if spec.whole_image == "own" or (small and spec.whole_image != "crop"):
        # the whole image at its own size (images at or below native size need no stage 2)
        plan.stage1_size = padded_dims(width, height)
        plan.stage1_box = (0, 0, height, width)
        plan.stage1_steps = stage1_steps
        return plan
    if spec.whole_image == "crop":
        top, left, bottom, right = crop_box(mask, settings.crop_margin, native)
        plan.stage1_size = native_dims(right - left, bottom - top, native)
        plan.stage1_box = (top, left, bottom, right)
        plan.stage1_steps = stage1_steps
        return plan
    if spec.whole_image == "native":
        plan.stage1_size = native_dims(width, height, native)
        plan.stage1_box = (0, 0, height, width)
        plan.stage1_steps = stage1_steps
    if spec.patches:
        tile, overlap = settings.tile_size // latent_factor, settings.tile_overlap // latent_factor
        lat_mask = latent_mask(generation_mask(mask, settings.mask_dilation), latent_factor)
        grid = plan_tiles(lat_mask.shape, tile, overlap)
        plan.groups = group_tiles(tiles_touching(grid, lat_mask))
        plan.tile_size, plan.tile_overlap = tile, overlap
        if spec.reference:
            plan.stage2_steps = effective_steps(settings.refine_steps, settings.refine_strength)
        else:
            plan.stage2_steps = stage1_steps
        uses_rpa = spec.reference and settings.effective_rpa_scale != 0
        plan.reference_passes = len(plan.tiles) if uses_rpa else 0
    return plan
