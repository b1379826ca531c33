"""Peak memory of an inpaint, estimated before it runs, and stage-2 settings that fit a budget.

The working memory of each phase (stage 1, the stage-2 encode, denoising, decode) is
measured by running that phase's models on the meta device under a tracker of live
tensor bytes: no weights are needed and nothing is computed, so an SDXL estimate
costs seconds on any machine. Attention is counted as the fused kernels run it
(output only, no N x N matrix), as PyTorch's SDPA does on CUDA and on the CPU.
The estimate is `weights + max(phases)`; `stage2_settings` picks the largest patch
batch, and where the reference banks live, that fit a budget.
"""

from __future__ import annotations

import copy
import functools
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .backbone import vae_latent_factor

MAX_AUTO_PATCH_BATCH = 8
"""The largest patch batch chosen automatically: beyond it a GPU gains little speed."""


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created inside the block that are still alive, and their peak.

    Each storage is counted once, from the first tensor that holds it until the last such
    tensor is gone (weakref finalizers, so the cost per operation stays constant).
    """

    def __init__(self, ignore=()):
        super().__init__()
        self.known = {StorageWeakRef(t.untyped_storage()).cdata for t in ignore}
        self.holders: dict[int, list[int]] = {}  # storage -> [tensors holding it, its bytes]
        self.bytes = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        holders = self.holders[key]
        holders[0] -= 1
        if holders[0] == 0:
            self.bytes -= holders[1]
            del self.holders[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = StorageWeakRef(storage).cdata
            if key in self.known:
                continue
            if key not in self.holders:
                self.holders[key] = [0, storage.nbytes()]
                self.bytes += storage.nbytes()
            self.holders[key][0] += 1
            weakref.finalize(tensor, self._release, key)
        self.peak = max(self.peak, self.bytes)
        return out


class FusedAttention(TorchFunctionMode):
    """SDPA as fused kernels run it: the output is allocated, the attention matrix is not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            query, value = args[0], args[2]
            return query.new_empty(*query.shape[:-1], value.shape[-1])
        return func(*args, **(kwargs or {}))


def traced_peak(fn, ignore=()) -> int:
    """Peak bytes of the tensors `fn` creates (on meta tensors: nothing is computed)."""
    with torch.no_grad(), LiveBytes(ignore) as tracker, FusedAttention():
        fn()
    return tracker.peak


def module_bytes(*modules) -> int:
    return sum(
        t.numel() * t.element_size() for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())
    )


@functools.lru_cache(maxsize=4)
def _meta_copy(module):
    """A weightless copy of a model (same config, processors and dtype) on the meta device."""
    memo = {id(p): torch.nn.Parameter(p.to("meta"), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b.to("meta") for b in module.buffers()})
    return copy.deepcopy(module, memo)


@dataclass(frozen=True)
class MemoryEstimate:
    """Expected peak memory of one inpaint on its device, in bytes, by part."""

    device: str
    dtype: str
    weights: int  # the models on the device
    stage1: int  # the whole-image pass: UNet call, VAE encode/decode
    stage2_encode: int  # the largest region's pixels and their VAE encode
    stage2_denoise: int  # one UNet call at the patch batch, latents, reference banks held
    stage2_decode: int  # the largest region's VAE decode
    banks: int  # the part of stage2_denoise that reference banks take
    bank_per_patch: int
    patch_batch_size: int
    bank_placement: str

    @property
    def peak(self) -> int:
        return self.weights + max(self.stage1, self.stage2_encode, self.stage2_denoise, self.stage2_decode)

    def describe(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"

        return (
            f"memory estimate on {self.device} ({self.dtype}): peak {mib(self.peak)} = weights {mib(self.weights)} "
            f"+ the largest phase (stage 1 {mib(self.stage1)}; stage 2: encode {mib(self.stage2_encode)}, "
            f"denoise {mib(self.stage2_denoise)} with {mib(self.banks)} of reference banks, "
            f"decode {mib(self.stage2_decode)}); patch batch {self.patch_batch_size}, "
            f"reference banks on the {self.bank_placement}"
            + f" ({mib(self.bank_per_patch)} a patch)"
            * (self.bank_per_patch > 0)
        )


def _latent_bytes(pipe, batch: int, height: int, width: int) -> int:
    return batch * pipe.unet.config.in_channels * height * width * pipe.unet.dtype.itemsize


class PhaseTracer:
    """Working memory of the pipeline's phases for one backbone, traced on meta copies."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = _meta_copy(pipe.unet)
        self.vae = _meta_copy(pipe.vae)
        config = pipe.unet.config
        self.cross_dim = config.cross_attention_dim
        self.text_dim = pipe.unet.add_embedding.linear_1.in_features - 6 * config.addition_time_embed_dim
        self.dtype = pipe.unet.dtype

    @functools.lru_cache(maxsize=64)  # noqa: B019 - tracers live for the process anyway (_TRACERS)
    def unet_call(self, patches: int, halves: int, height: int, width: int, bank: bool, dca: bool) -> tuple[int, int]:
        """(working bytes of one UNet call, bank bytes of its reference patches) at a latent size.

        patches: latents in the call; halves: 2 with classifier-free guidance, else 1;
        bank: with reference patches (stage 2); dca: with the DCA (stage 1 only).
        """
        from .adapters import ReferenceBank

        def inputs(b):
            meta = dict(device="meta", dtype=self.dtype)
            added = {"text_embeds": torch.empty(b, self.text_dim, **meta), "time_ids": torch.empty(b, 6, **meta)}
            if self.unet.config.encoder_hid_dim_type == "ip_image_proj":  # an IP-Adapter is loaded
                added["image_embeds"] = ip_adapter_inputs(self.unet, b, meta)
            extra = {}
            if self.unet.config.time_cond_proj_dim is not None:  # a guidance-distilled UNet
                extra["timestep_cond"] = torch.empty(b, self.unet.config.time_cond_proj_dim, **meta)
            return (
                torch.empty(b, self.unet.config.in_channels, height, width, **meta),
                torch.tensor(1.0),
                dict(
                    encoder_hidden_states=torch.empty(b, 77, self.cross_dim, **meta), added_cond_kwargs=added, **extra
                ),
            )

        reference = ReferenceBank()
        if bank:
            sample, t, kwargs = inputs(patches)
            with torch.no_grad(), reference.record():
                self.unet(sample, t, cross_attention_kwargs={"rpa_bank": reference}, **kwargs)
        sample, t, kwargs = inputs(patches * halves)
        mask = torch.empty(1, 1, height, width, device="meta", dtype=self.dtype)
        attention = {"dca_mask": mask if dca else None, "rpa_bank": reference if bank else None}
        peak = traced_peak(
            lambda: self.unet(sample, t, cross_attention_kwargs=attention, **kwargs),
            ignore=list(reference.features.values()),
        )
        return peak, reference.nbytes()

    @functools.lru_cache(maxsize=64)  # noqa: B019 - as unet_call
    def vae_call(self, height: int, width: int, decode: bool) -> int:
        """Working bytes of a VAE encode or decode at a latent size (tiled above native, as the pipeline does).

        A tiled pass is traced on one tile. diffusers keeps every tile's output (those at
        the far edges cut short) until it blends them into rows and the rows into the
        whole: the peak is the last tile's work with the others held, or every tile with
        the rows and the whole.
        """
        vae, meta = self.vae, dict(device="meta", dtype=self.vae.dtype)
        factor = vae_latent_factor(vae.config)
        if max(height, width) > self.pipe.unet.config.sample_size:
            tile = vae.tile_latent_min_size  # latents per tile side
            stride = int(tile * (1 - vae.tile_overlap_factor))
            tiled_h = sum(min(tile, height - i) for i in range(0, height, stride))
            tiled_w = sum(min(tile, width - j) for j in range(0, width, stride))
            # a decode gives 3 colours per pixel, an encode the latents' mean and log-variance per latent
            channels, scale = (3, factor) if decode else (2 * vae.config.latent_channels, 1)
            per_latent = channels * scale**2 * self.vae.dtype.itemsize
            tiles = tiled_h * tiled_w * per_latent
            whole = height * width * per_latent
            return max(self.vae_call(tile, tile, decode) + tiles, tiles + 2 * whole)
        if decode:
            latents = torch.empty(1, vae.config.latent_channels, height, width, **meta)
            return traced_peak(lambda: vae.decode(latents))
        pixels = torch.empty(1, 3, height * factor, width * factor, **meta)
        return traced_peak(lambda: vae.encode(pixels))


def ip_adapter_inputs(unet, batch: int, meta: dict) -> list[torch.Tensor]:
    """Image embeddings of the shape each loaded IP-Adapter's projection takes, one image each."""
    from diffusers.models.embeddings import ImageProjection

    inputs = []
    for layer in unet.encoder_hid_proj.image_projection_layers:
        if isinstance(layer, ImageProjection):
            inputs.append(torch.empty(batch, 1, layer.image_embeds.in_features, **meta))
        else:  # the "plus" kinds take the image encoder's hidden states (CLIP ViT-H: 257 tokens)
            linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
            inputs.append(torch.empty(batch, 1, 257, linear.in_features, **meta))
    return inputs


def estimate_memory(pipe, plan, patch_batch_size: int, bank_placement: str = "device", device=None) -> MemoryEstimate:
    """The expected peak memory of running `plan` with `pipe` on `device` (default: the pipeline's).

    `pipe` needs only unet, vae, text_encoder(_2) and vae_scale_factor: models on the meta
    device (`backbone.backbone_on_meta`) estimate a backbone without loading it.
    """
    tracer = _tracer(pipe)
    factor = pipe.vae_scale_factor
    guided = 2 if plan.guidance else 1
    device = torch.device(device) if device is not None else pipe._execution_device
    weights = module_bytes(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    stage1 = 0
    if plan.stage1_size is not None:
        w, h = (s // factor for s in plan.stage1_size)
        stage1 = max(
            tracer.unet_call(1, guided, h, w, False, True)[0], tracer.vae_call(h, w, True), tracer.vae_call(h, w, False)
        ) + 6 * _latent_bytes(pipe, 1, h, w)
    encode = denoise = decode = banks = bank_per_patch = 0
    if plan.tiles:
        regions = plan.regions
        group_sizes = [len(g) for g in plan.groups]
        batch = min(patch_batch_size, max(group_sizes))
        tile_h, tile_w = plan.tiles[0].height, plan.tiles[0].width
        with_bank = plan.reference_passes > 0
        step, batch_bank = tracer.unet_call(batch, guided, tile_h, tile_w, with_bank, False)
        bank_per_patch = batch_bank // batch if with_bank else 0
        largest = max(regions, key=lambda r: r.height * r.width)
        region_latents = 9 * _latent_bytes(pipe, 1, largest.height, largest.width)  # latents, fusion, mask, ...
        held = {"device": max(group_sizes) * bank_per_patch, "host": 2 * batch_bank, "recompute": batch_bank}
        banks = held[bank_placement] if with_bank else 0
        recording = tracer.unet_call(batch, 1, tile_h, tile_w, False, False)[0] if bank_placement == "recompute" else 0
        denoise = region_latents + banks + max(step, recording)
        pixels = 4 * 3 * largest.height * largest.width * factor * factor * 4  # float32 region images
        encode = pixels + tracer.vae_call(largest.height, largest.width, False)
        decode = region_latents + tracer.vae_call(largest.height, largest.width, True)
    return MemoryEstimate(
        device=str(device),
        dtype=str(pipe.unet.dtype).replace("torch.", ""),
        weights=weights,
        stage1=stage1,
        stage2_encode=encode,
        stage2_denoise=denoise,
        stage2_decode=decode,
        banks=banks,
        bank_per_patch=bank_per_patch,
        patch_batch_size=patch_batch_size,
        bank_placement=bank_placement,
    )


_TRACERS: dict[int, PhaseTracer] = {}


def _tracer(pipe) -> PhaseTracer:
    key = id(pipe.unet)
    if key not in _TRACERS or _TRACERS[key].pipe is not pipe:
        _TRACERS[key] = PhaseTracer(pipe)
    return _TRACERS[key]


def available_memory(device: torch.device) -> int:
    """What an inpaint may use on `device`, weights included: free memory plus what torch holds there."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def stage2_settings(pipe, plan, budget: int, patch_batch_size: int | None = None, device=None):
    """(patch batch, bank placement, estimate): the largest batch, then the cheapest placement, that fit.

    An explicit `patch_batch_size` is the upper bound. Banks stay on the device when they
    fit; on an accelerator they move to the host next; recording them again per call is
    the last resort. When nothing fits, the smallest settings are returned and the
    estimate says by how much the budget is exceeded.
    """
    largest = max((len(g) for g in plan.groups), default=1)
    top = min(patch_batch_size or MAX_AUTO_PATCH_BATCH, largest)
    batches = [top]
    while batches[-1] > 1:
        batches.append(batches[-1] // 2)
    device = torch.device(device) if device is not None else pipe._execution_device
    accelerator = device.type != "cpu"
    kept = ("device", "host") if accelerator else ("device",)
    tries = [(b, p) for b in batches for p in kept] + [(b, "recompute") for b in batches]
    if not plan.reference_passes:  # no banks: only the batch matters
        tries = [(b, "device") for b in batches]
    for batch, placement in tries:
        estimate = estimate_memory(pipe, plan, batch, placement, device)
        if estimate.peak <= budget:
            return batch, placement, estimate
    return batch, placement, estimate
