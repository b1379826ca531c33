"""Keeping the adapters in the UNet: the pipeline side.

The adapters live in the UNet as attention processors, and diffusers replaces attention
processors in many places (attention slicing, QKV fusion, IP-Adapter loading,
`set_attn_processor`). A replaced adapter stops working without an error and its
trained weights are gone. `AdapterGuardMixin` makes the pipeline's own entry points
keep the adapters (slicing and IP-Adapters compose with them), keeps its own reference
to the adapter processors, and refuses to run when something else replaced them.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

from .dual_context import DualContextAttnProcessor, is_ip_adapter_processor
from .reference_patch import ReferencePatchAttnProcessor

ADAPTER_CLASSES = (DualContextAttnProcessor, ReferencePatchAttnProcessor)


class AdapterReplacedError(RuntimeError):
    """The UNet's Patch-Adapter processors were replaced, or do not fit its IP-Adapter state."""


class AdapterGuardMixin:
    """Pipeline methods that keep the Patch-Adapter processors in `self.unet`.

    Put it before the diffusers pipeline in the bases; call `record_adapters()` after
    `install_adapters(self.unet)` and `check_adapters()` first thing in `__call__`.
    """

    # ------------------------------------------------------------------ the record

    def record_adapters(self) -> None:
        """Remember the adapter processors now in the UNet (the pipeline's own reference to their weights)."""
        self._patch_adapters = {
            name: proc for name, proc in self.unet.attn_processors.items() if isinstance(proc, ADAPTER_CLASSES)
        }

    def _recorded_adapters(self) -> dict:
        if getattr(self, "_patch_adapters", None) is None:
            self.record_adapters()
        return self._patch_adapters

    def check_adapters(self) -> None:
        """Raise AdapterReplacedError unless every adapter processor is in its layer.

        Our own processors put there by someone else (e.g. `install_adapters`) are
        accepted and become the recorded ones; anything else is refused, because the
        UNet would run without the adapters and give a plausible, wrong result.
        """
        recorded = self._recorded_adapters()
        current = self.unet.attn_processors
        replaced, adopted = Counter(), {}
        for name, proc in recorded.items():
            now = current.get(name)
            if now is proc:
                continue
            if isinstance(now, type(proc)):
                adopted[name] = now
            else:
                replaced["no attention layer" if now is None else type(now).__name__] += 1
        if replaced:
            found = ", ".join(f"{cls} in {n}" for cls, n in replaced.most_common())
            raise AdapterReplacedError(
                f"the Patch-Adapter attention processors were replaced in {sum(replaced.values())} of "
                f"{len(recorded)} UNet attention layers (now: {found}), so the adapters are off. Something set "
                "the UNet's processors directly (unet.set_attn_processor, unet.set_default_attn_processor, "
                "unet.set_attention_slice, unet.fuse_qkv_projections or a diffusers loader). The pipeline kept "
                "the trained adapter weights: call pipe.restore_adapters() to put them back, and use the "
                "pipeline's enable_attention_slicing / load_ip_adapter / unload_ip_adapter / "
                "set_ip_adapter_scale, which keep the adapters."
            )
        recorded.update(adopted)
        dcas = [p for p in recorded.values() if isinstance(p, DualContextAttnProcessor)]
        projection = (
            self.unet.encoder_hid_proj is not None
            and getattr(self.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"
        )
        if projection and any(p.ip_adapter is None for p in dcas):
            raise AdapterReplacedError(
                "the UNet has an IP-Adapter image projection but the Patch-Adapter cross-attention layers hold no "
                "IP-Adapter weights (were they loaded with unet-level calls?): call pipe.unload_ip_adapter(), then "
                "load it with pipe.load_ip_adapter(...), which puts the IP-Adapter into the adapter processors"
            )
        if not projection and any(p.ip_adapter is not None for p in dcas):
            raise AdapterReplacedError(
                "the Patch-Adapter cross-attention layers hold IP-Adapter weights but the UNet has no IP-Adapter "
                "image projection (unet.encoder_hid_proj was changed), so image tokens would be read from the "
                "text: call pipe.unload_ip_adapter() and load the IP-Adapter again with pipe.load_ip_adapter(...)"
            )

    def restore_adapters(self) -> None:
        """Put the recorded adapter processors (with their trained weights) back into the UNet."""
        recorded = self._recorded_adapters()
        for name, proc in recorded.items():
            try:
                layer = self.unet.get_submodule(name[: -len(".processor")])
            except AttributeError:
                raise AdapterReplacedError(
                    f"the UNet has no layer {name[: -len('.processor')]}: it is not the UNet the adapters were "
                    "made for; build a new pipeline for it"
                ) from None
            proc.to(layer.to_q.weight.device)
        self._set_processors(recorded)

    def _set_processors(self, processors: dict) -> None:
        """Set some layers' processors (diffusers' set_attn_processor wants all of them)."""
        full = self.unet.attn_processors
        full.update(processors)
        self.unet.set_attn_processor(full)

    def stock_processors(self) -> dict:
        """All UNet processors as diffusers would have them without Patch-Adapter (for set_attn_processor).

        Each adapter layer gets `AttnProcessor2_0`, or the IP-Adapter processor its DCA
        processor holds, so a stock forward keeps a loaded IP-Adapter.
        """
        from diffusers.models.attention_processor import AttnProcessor2_0

        stock = AttnProcessor2_0()
        processors = self.unet.attn_processors
        for name, proc in processors.items():
            if isinstance(proc, DualContextAttnProcessor) and proc.ip_adapter is not None:
                processors[name] = proc.ip_adapter
            elif isinstance(proc, ADAPTER_CLASSES):
                processors[name] = stock
        return processors

    @contextmanager
    def _diffusers_view(self, take_ip: bool = False):
        """Within this block the adapter layers hold what diffusers' own methods expect.

        That is `AttnProcessor2_0`, or the layer's IP-Adapter processor where one is
        loaded. Afterwards the adapter processors go back; with `take_ip` (IP-Adapter
        loading and unloading) each DCA processor takes its layer's IP-Adapter processor
        as diffusers left it. If the block fails, the adapters go back unchanged.
        """
        self.check_adapters()
        recorded = self._recorded_adapters()
        self.unet.set_attn_processor(self.stock_processors())
        done = False
        try:
            yield recorded
            done = True
        finally:
            if done and take_ip:
                current = self.unet.attn_processors
                for name, proc in recorded.items():
                    if isinstance(proc, DualContextAttnProcessor):
                        now = current.get(name)
                        proc.ip_adapter = now if is_ip_adapter_processor(now) else None
            self._set_processors(recorded)

    # ------------------------------------------------------------------ diffusers' entry points

    def enable_attention_slicing(self, slice_size="auto"):
        """diffusers' attention slicing, done by the adapter processors themselves.

        diffusers installs `SlicedAttnProcessor` everywhere, which would drop the
        adapters; here it picks the per-layer slice sizes (and checks them), and each
        adapter processor then slices its own attention calls the same way.
        """
        with self._diffusers_view() as recorded:
            super().enable_attention_slicing(slice_size)
            current = self.unet.attn_processors
            for name, proc in recorded.items():
                proc.slice_size = getattr(current[name], "slice_size", None)  # None: not sliced

    def disable_attention_slicing(self):
        self.enable_attention_slicing(None)

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True):
        """Refused for the UNet: fusion installs FusedAttnProcessor2_0, which has no adapters."""
        if unet:
            raise NotImplementedError(
                "fuse_qkv_projections(unet=True) would replace the Patch-Adapter attention processors (which "
                "compute their own projections) and turn the adapters off; fuse only the VAE with "
                "pipe.fuse_qkv_projections(unet=False)"
            )
        return super().fuse_qkv_projections(unet=False, vae=vae)

    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        """Refused: xFormers processors would replace the adapters (ours run on torch SDPA, memory-efficient already)."""
        raise NotImplementedError(
            "xFormers attention would replace the Patch-Adapter attention processors and turn the adapters off; "
            "they run on torch's scaled_dot_product_attention, which picks memory-efficient kernels itself "
            "(pipe.enable_attention_slicing() keeps the adapters if memory is short)"
        )

    def disable_xformers_memory_efficient_attention(self):
        """Nothing to undo (enabling is refused); diffusers' version would reset the adapter layers."""

    def load_ip_adapter(self, *args, **kwargs):
        """diffusers' IP-Adapter loading, with the IP-Adapter put inside the DCA processors (they add its term)."""
        with self._diffusers_view(take_ip=True):
            super().load_ip_adapter(*args, **kwargs)

    def unload_ip_adapter(self):
        """diffusers' IP-Adapter unloading, keeping the Patch-Adapter processors."""
        with self._diffusers_view(take_ip=True):
            super().unload_ip_adapter()

    def set_ip_adapter_scale(self, scale):
        """diffusers' scale setting (floats or per-block dicts), on the IP-Adapters the DCA processors hold."""
        with self._diffusers_view():
            super().set_ip_adapter_scale(scale)
