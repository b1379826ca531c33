"""Patch-Adapter: text-guided inpainting of 4K+ images with a frozen SDXL-inpainting backbone.

from patch_adapter import PatchAdapterPipeline
pipe = PatchAdapterPipeline.from_pretrained("tiny")          # or a diffusers folder / hub id
result = pipe(prompt="a wooden bench", image=image, mask_image=mask)
result.images[0].save("out.png")
"""

__version__ = "0.1.0"

__all__ = ["InpaintSettings", "METHODS", "PatchAdapterPipeline", "PatchAdapterPipelineOutput", "__version__"]

from .settings import METHODS, InpaintSettings  # plain data, no torch


def __getattr__(name):
    # the pipeline pulls in torch and diffusers; import it only when asked for
    if name in ("PatchAdapterPipeline", "PatchAdapterPipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'patch_adapter' has no attribute {name!r}")
