"""How an inpaint runs: one validated, frozen settings object and one table of methods.

`InpaintSettings` holds every knob the pipeline, `plan()`, the CLI, the batch command,
the web app, the output metadata and the benchmark share. It is checked once, when it
is made; `resolved(native)` fills the defaults that depend on the backbone (tile size,
overlap, crop margin, refine steps), so the same values reach the plan, the run and the
metadata. `METHODS` says what each method does; adding a method is one row (and its
branch in `planning.make_plan` if it runs the model in a new way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .validation import LATENT_FACTOR, SettingsError, check_inpaint_numbers, check_integer, check_real

#: Sampler short names (the CLI's --scheduler, `pipe.set_scheduler`) -> diffusers scheduler classes
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
#: Where stage 2 keeps reference banks: all on the device; on the host, each batch's moved over per
#: UNet call (accelerators only); or none, each batch's recorded again per call (bounded memory
#: anywhere, one extra conditional UNet forward per patch and step). memory.py estimates each.
BANK_PLACEMENTS = ("device", "host", "recompute")


@dataclass(frozen=True)
class Method:
    """What a method runs: the whole-image pass, full-resolution patches, a reference, adapters."""

    name: str
    whole_image: str | None  # "native": at the native pixel count; "own": at the image's size; "crop": a box
    patches: bool  # full-resolution patches around the mask (stage 2, or the tiled baseline)
    reference: bool  # the patches start from and attend to the whole-image result
    adapters: tuple[str, ...]  # the trained adapters it uses ("dca", "rpa")
    summary: str

    @property
    def uses_dca(self) -> bool:
        return "dca" in self.adapters

    @property
    def uses_rpa(self) -> bool:
        return "rpa" in self.adapters


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "patch-adapter",
            "native",
            True,
            True,
            ("dca", "rpa"),
            "stage 1 at native size with the DCA, then full-resolution patches with the RPA",
        ),
        Method("resize", "native", False, False, (), "the whole image at native size, upsampled into the mask"),
        Method(
            "crop", "crop", False, False, (), "a native-size box around the mask, like diffusers' padding_mask_crop"
        ),
        Method("direct", "own", False, False, (), "the whole image at its own size in one pass"),
        Method("tiled", None, True, False, (), "full-resolution patches from noise, without a whole-image pass"),
        Method("two-stage", "native", True, True, (), "Patch-Adapter's two stages without either adapter"),
    )
}


def check_method(name) -> Method:
    if name not in METHODS:
        raise SettingsError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class InpaintSettings:
    """Every knob of an inpaint except its inputs (image, mask, prompts, generator).

    Sizes are in pixels. None means "the backbone's default" and is filled by `resolved`:
    tile_size the native size, tile_overlap a quarter of it, crop_margin an eighth,
    refine_steps num_inference_steps.
    """

    method: str = "patch-adapter"
    num_inference_steps: int = 50  # the whole-image pass (and the tiled baseline's patches)
    strength: float = 0.9999
    refine_steps: int | None = None  # stage 2's patches
    refine_strength: float = 0.6  # 1.0: stage 2 starts from pure noise
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0  # DDIM's eta, as diffusers
    dca_scale: float = 1.0  # the DCA in stage 1 (and whole-image passes); stage 2's patches run without it
    rpa_scale: float = 1.0
    tile_size: int | None = None
    tile_overlap: int | None = None
    mask_dilation: int = 0  # grow the region the model regenerates (px)
    mask_feather: int = 0  # blend the fill into the picture over this many px inside the mask
    mask_threshold: float = 0.5
    crop_margin: int | None = None
    reference_timestep: int = 1  # the timestep the reference patches are recorded at
    patch_batch_size: int | None = None  # None: the most that fit max_memory, up to 8
    max_memory: int | None = None  # bytes; None: what the device has free
    reference_banks: str = "auto"  # "auto" or one of BANK_PLACEMENTS

    def __post_init__(self):
        check_method(self.method)
        check_inpaint_numbers(
            num_inference_steps=self.num_inference_steps,
            refine_steps=self.refine_steps,
            guidance_scale=self.guidance_scale,
            strength=self.strength,
            refine_strength=self.refine_strength,
            dca_scale=self.dca_scale,
            rpa_scale=self.rpa_scale,
            mask_threshold=self.mask_threshold,
            mask_dilation=self.mask_dilation,
            mask_feather=self.mask_feather,
            patch_batch_size=self.patch_batch_size,
            tile_size=self.tile_size,
            tile_overlap=self.tile_overlap,
            crop_margin=self.crop_margin,
        )
        check_real("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        check_real("eta", self.eta, 0.0, 1.0)
        check_integer("reference_timestep", self.reference_timestep, 0)
        check_integer("max_memory", self.max_memory, 1, optional=True)
        if self.reference_banks not in ("auto",) + BANK_PLACEMENTS:
            raise SettingsError(
                f"reference_banks must be auto, {', '.join(BANK_PLACEMENTS)}; got {self.reference_banks!r}"
            )
        for name in ("tile_size", "tile_overlap"):
            value = getattr(self, name)
            if value is not None and value % LATENT_FACTOR:
                raise SettingsError(f"{name} {value} must be a multiple of {LATENT_FACTOR} px (one latent)")
        if min(int(self.num_inference_steps * self.strength), self.num_inference_steps) < 1:
            raise SettingsError(
                f"strength {self.strength} with {self.num_inference_steps} steps leaves no denoising step; raise either"
            )
        refine = self.refine_steps or self.num_inference_steps
        if self.spec.patches and self.spec.reference and min(int(refine * self.refine_strength), refine) < 1:
            raise SettingsError(
                f"refine_strength {self.refine_strength} with {refine} refine steps leaves no "
                "denoising step; raise either"
            )

    @property
    def spec(self) -> Method:
        """This method's row of `METHODS`."""
        return METHODS[self.method]

    @property
    def guided(self) -> bool:
        """Classifier-free guidance, as diffusers decides it."""
        return self.guidance_scale > 1.0

    @property
    def effective_dca_scale(self) -> float:
        return self.dca_scale if self.spec.uses_dca else 0.0

    @property
    def effective_rpa_scale(self) -> float:
        return self.rpa_scale if self.spec.uses_rpa else 0.0

    def replace(self, **changes) -> "InpaintSettings":
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    def resolved(self, native: int) -> "InpaintSettings":
        """The settings with the backbone's defaults filled in; refuses tiles that cannot run on it."""
        tile = self.tile_size or native
        overlap = self.tile_overlap if self.tile_overlap is not None else native // 4
        if overlap >= tile:
            raise SettingsError(f"tile_overlap ({overlap}) must be smaller than tile_size ({tile})")
        return self.replace(
            tile_size=tile,
            tile_overlap=overlap,
            crop_margin=self.crop_margin if self.crop_margin is not None else native // 8,
            refine_steps=self.refine_steps or self.num_inference_steps,
        )

    def as_dict(self) -> dict:
        """Plain values, for metadata and JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
