"""Installing the adapters in a UNet, and saving/loading their weights.

Weights are one flat safetensors state dict keyed by module path, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_q_ctx.weight``,
with a manifest in the file's metadata: format version, the backbone's identity,
which adapters the file holds, and every layer's parameter shapes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..backbone import backbone_identity
from ..image_io import atomic_write
from .dual_context import DualContextAttnProcessor, is_ip_adapter_processor
from .reference_patch import ReferencePatchAttnProcessor

FORMAT_NAME = "patch-adapter"
FORMAT_VERSION = 2
"""2: the RPA is joint (own + reference) attention with a per-head correction; 1 held a gated-sum RPA."""
ADAPTER_KINDS = ("dca", "rpa")
BUNDLED_ADAPTER_FILE = "patch_adapter.safetensors"
"""A diffusers folder that holds this file ships its adapters: from_pretrained loads them."""
PROCESSOR_CLASSES = {"dca": DualContextAttnProcessor, "rpa": ReferencePatchAttnProcessor}


class AdapterLoadError(ValueError):
    """An adapter file that does not fit this backbone, or is not an adapter file."""


def install_adapters(unet) -> None:
    """Put a DCA processor in every `attn2` and an RPA processor in every `attn1`.

    Processors already installed are kept (so their weights survive a second call).
    diffusers' IP-Adapter processors are kept inside the DCA processors (which add the
    IP-Adapter term themselves); any other processor with weights is refused rather
    than dropped. The UNet's state dict leaves the processors out (see `drop_processor_keys`).
    """
    processors = {}
    for name, current in unet.attn_processors.items():
        layer = name[: -len(".processor")]
        attn = unet.get_submodule(layer)
        ours = {"attn2": DualContextAttnProcessor, "attn1": ReferencePatchAttnProcessor}.get(layer.rsplit(".", 1)[-1])
        if ours is None or isinstance(current, ours):
            processors[name] = current
            continue
        if (
            isinstance(current, torch.nn.Module)
            and any(True for _ in current.parameters())
            and not (ours is DualContextAttnProcessor and is_ip_adapter_processor(current))
        ):
            raise ValueError(
                f"{layer} has a {type(current).__name__} with weights of its own, which Patch-Adapter's processor "
                "would replace and lose; remove it (unet.set_attn_processor(AttnProcessor2_0())) before "
                "installing the adapters"
            )
        proc = (
            DualContextAttnProcessor.for_layer(attn)
            if ours is DualContextAttnProcessor
            else ReferencePatchAttnProcessor.for_layer(attn, layer)
        )
        if is_ip_adapter_processor(current):
            proc.ip_adapter = current
        processors[name] = proc
    unet.set_attn_processor(processors)
    if not getattr(unet, "_patch_adapter_hooks", False):
        unet.register_state_dict_post_hook(drop_processor_keys)
        unet.register_load_state_dict_post_hook(forgive_processor_keys)
        unet._patch_adapter_hooks = True


PROCESSOR_KEY = ".processor."


def drop_processor_keys(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: no attention-processor weights in the UNet's state dict.

    Processors are nn.Modules under each Attention, so without it `unet.save_pretrained`
    writes the adapters (and IP-Adapter weights) into the UNet file; they have their own
    files (`save_adapter`, the IP-Adapter checkpoint).
    """
    for key in [k for k in state_dict if k.startswith(prefix) and PROCESSOR_KEY in k[len(prefix) :]]:
        del state_dict[key]


def forgive_processor_keys(module, incompatible_keys) -> None:
    """Load-state-dict hook: a UNet state dict without processor weights (see above) loads strictly."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if PROCESSOR_KEY not in k]


def own_state_dict(proc) -> dict:
    """A processor's adapter weights, without the IP-Adapter it may hold (that is not ours to save)."""
    return {k: v for k, v in proc.state_dict().items() if not k.startswith("ip_adapter.")}


def adapter_processors(unet, kinds=ADAPTER_KINDS) -> dict:
    """{module path: processor} of the installed adapters of the given kinds."""
    classes = tuple(PROCESSOR_CLASSES[k] for k in kinds)
    return {name: module for name, module in unet.named_modules() if isinstance(module, classes)}


def adapter_parameters(unet, kinds=ADAPTER_KINDS) -> list[torch.nn.Parameter]:
    return [
        p
        for proc in adapter_processors(unet, kinds).values()
        for name, p in proc.named_parameters()
        if not name.startswith("ip_adapter.")
    ]


def adapter_state_dict(unet, kinds=ADAPTER_KINDS) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, proc in adapter_processors(unet, kinds).items()
        for key, value in own_state_dict(proc).items()
    }


def reset_adapters(unet, kinds=ADAPTER_KINDS) -> None:
    """Back to the initial (no-effect / reference-only) state."""
    for name, proc in adapter_processors(unet, kinds).items():
        proc.reset_parameters(unet.get_submodule(name.rsplit(".", 1)[0]))


@contextlib.contextmanager
def initial_adapters(unet, kinds=ADAPTER_KINDS):
    """Within this block the adapters are at their initial weights; the trained ones come back after."""
    trained = {
        name: {k: v.clone() for k, v in own_state_dict(proc).items()}
        for name, proc in adapter_processors(unet, kinds).items()
    }
    reset_adapters(unet, kinds)
    try:
        yield unet
    finally:
        for name, proc in adapter_processors(unet, kinds).items():
            proc.load_state_dict(trained[name], strict=False)


def manifest(unet, state: dict, kinds, backbone_name: str | None = None) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapters": list(kinds),
        "backbone": backbone_identity(unet),
        "backbone_name": backbone_name or "",
        "shapes": {k: list(v.shape) for k, v in sorted(state.items())},
    }


def save_adapter(path, unet, kinds=ADAPTER_KINDS, backbone_name: str | None = None, dtype=None) -> Path:
    """Write the adapters' weights (and manifest) atomically to a .safetensors file."""
    import safetensors.torch

    path = Path(path)
    kinds = tuple(kinds)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in adapter_state_dict(unet, kinds).items()}
    if not state:
        raise ValueError("the UNet has no Patch-Adapter processors installed; call install_adapters(unet) first")
    meta = {key: json.dumps(value) for key, value in manifest(unet, state, kinds, backbone_name).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(safetensors.torch.save(state, metadata=meta))
    return path


def read_manifest(path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise AdapterLoadError(f"{path} is not a safetensors file: {err}") from err
    try:
        info = {key: json.loads(value) for key, value in meta.items()}
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{path} has an unreadable manifest: {err}") from err
    if info.get("format") != FORMAT_NAME:
        raise AdapterLoadError(f"{path} is not a Patch-Adapter weights file (no '{FORMAT_NAME}' manifest)")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{path} uses adapter format version {info['format_version']}, newer than this package reads "
            f"({FORMAT_VERSION}); upgrade patch-adapter"
        )
    return info


def load_adapter(path, unet) -> dict:
    """Load adapter weights into the installed processors; returns the manifest.

    Strict for every adapter the file holds: a different backbone, a missing or an
    unexpected key, or a shape mismatch is refused before anything is changed.
    """
    from safetensors.torch import load_file

    path = Path(path)
    info = read_manifest(path)
    here = backbone_identity(unet)
    if info["backbone"] != here:
        diff = {k: (info["backbone"].get(k), here.get(k)) for k in here if info["backbone"].get(k) != here.get(k)}
        details = "; ".join(f"{k}: file {a} vs backbone {b}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise AdapterLoadError(
            f"{path} was made for another backbone ({info.get('backbone_name') or 'unnamed'}): {details}. "
            "Load it with the backbone it was trained on, or train adapters for this one."
        )
    kinds = tuple(info["adapters"])
    if info.get("format_version", 0) < 2 and "rpa" in kinds:
        raise AdapterLoadError(
            f"{path} holds a Reference Patch Adapter of format {info.get('format_version')} (a gated sum of "
            "attentions), which this version replaced by joint reference attention: retrain stage 2 "
            "(patch-adapter train stage2 ...); its Dual Context Adapter is unchanged and can be re-saved alone "
            "with an older patch-adapter"
        )
    unknown = set(kinds) - set(ADAPTER_KINDS)
    if unknown:
        raise AdapterLoadError(f"{path} holds unknown adapter kinds {sorted(unknown)}")
    state = load_file(str(path))
    expected = adapter_state_dict(unet, kinds)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise AdapterLoadError(
            f"{path} does not fit this UNet's adapters: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} shape mismatches {wrong[:3]}"
        )
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(state[key].to(value.dtype))
    return info
