"""The frozen SDXL-inpainting backbone: loading it from every place a user keeps it.

`load_backbone(source)` returns the diffusers components of an SDXL-inpainting
pipeline (unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
scheduler) from one of:

- ``"tiny"``: the same diffusers classes at small widths (native 128 px), trained in
  the tiny world (`patch_adapter.tiny_world`) and shipped as a diffusers folder in the
  package; tests, CI and the quick start use it;
- a local diffusers folder (one with ``model_index.json``);
- a single-file ``.safetensors``/``.ckpt`` SDXL-inpainting checkpoint;
- a hub id such as ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1`` (where a hub
  is reachable; offline it fails with a message that says what to download).

`source_kind` tells these apart (with the errors that say what to pass instead);
`PatchAdapterPipeline.from_pretrained` (loading.py) uses it too, then diffusers' loaders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SDXL_INPAINT_HUB_ID = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class BackboneLoadError(RuntimeError):
    """The backbone could not be loaded; the message says what to do instead."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of fp32, fp16, bf16") from None


# --------------------------------------------------------------------------- tiny


def tiny_weights_dir() -> Path:
    """The folder of the trained tiny backbone that ships with the package (``"tiny"``).

    The tiny world (`patch_adapter.tiny_world`) trains and owns it; the core only reads
    it as a diffusers folder, by path. ``PATCH_ADAPTER_TINY_WEIGHTS`` overrides it.
    """
    override = os.environ.get("PATCH_ADAPTER_TINY_WEIGHTS")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent / "tiny_world" / "weights"


# --------------------------------------------------------------------------- real


def _components_of(pipe) -> dict:
    return {name: getattr(pipe, name) for name in COMPONENT_NAMES}


def _offline_hint(source: str) -> str:
    return (
        f"Could not load {source!r} from the Hugging Face hub (no network, or it is not cached).\n"
        f"On a machine with internet, download it once:\n"
        f"    hf download {source} --local-dir ./models/{source.split('/')[-1]}\n"
        f"then copy that folder here and pass its path instead (--model ./models/{source.split('/')[-1]}),\n"
        f"or set HF_HOME to a cache that already holds it."
    )


def source_kind(source: str) -> tuple[str, object]:
    """What a model source is: ("folder", path), ("single_file", path) or ("hub", repo id);
    "tiny" is the folder the tiny world ships (`tiny_weights_dir`).

    Raises BackboneLoadError, saying what to pass instead, for a folder without
    model_index.json, a missing checkpoint file, or something that is none of these.
    """
    source = str(source)
    if source == "tiny":
        weights = tiny_weights_dir()
        if not (weights / "model_index.json").is_file():
            raise BackboneLoadError(
                f"the tiny backbone's folder {weights} holds no model_index.json: "
                f"train it with `make train-tiny`, or unset PATCH_ADAPTER_TINY_WEIGHTS to use the shipped one."
            )
        return "folder", weights
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BackboneLoadError(
                f"{source} is a folder but not a diffusers pipeline (no model_index.json). "
                f"Pass a diffusers folder such as a download of {SDXL_INPAINT_HUB_ID}, "
                f"or a single .safetensors checkpoint."
            )
        return "folder", path
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise BackboneLoadError(f"checkpoint file {source} does not exist.")
        return "single_file", path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hub", source
    raise BackboneLoadError(
        f"model {source!r} is neither 'tiny', an existing diffusers folder, a single-file checkpoint "
        f"({', '.join(SINGLE_FILE_SUFFIXES)}) nor a hub id of the form owner/name (e.g. {SDXL_INPAINT_HUB_ID})."
    )


def load_backbone(
    source: str = "tiny",
    torch_dtype: torch.dtype = torch.float32,
    config: str | None = None,
    variant: str | None = None,
    local_files_only: bool | None = None,
) -> dict:
    """Load the components of an SDXL-inpainting backbone (no adapters).

    ``config`` is only for single-file checkpoints: a local diffusers folder (or hub
    id) whose component configs describe the checkpoint; offline it is required.
    `PatchAdapterPipeline.from_pretrained` takes the same sources with diffusers' keywords.
    """
    from diffusers import StableDiffusionXLInpaintPipeline

    source = str(source)
    kind, where = source_kind(source)
    if source == "tiny":
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(where, dtype=torch_dtype)
        return _components_of(pipe)

    if kind == "folder":
        try:
            pipe = StableDiffusionXLInpaintPipeline.from_pretrained(where, dtype=torch_dtype, variant=variant)
        except (OSError, ValueError, TypeError) as err:
            raise BackboneLoadError(f"could not load the diffusers folder {source}: {err}") from err
        return check_inpainting_backbone(_components_of(pipe), source)

    if kind == "single_file":
        try:
            pipe = StableDiffusionXLInpaintPipeline.from_single_file(
                str(where),
                dtype=torch_dtype,
                config=config,
                local_files_only=bool(local_files_only) if local_files_only is not None else None,
            )
        except Exception as err:  # diffusers raises many kinds here; all mean the same to the user
            raise BackboneLoadError(
                f"could not load the single-file checkpoint {source}: {err}\n"
                "A single-file checkpoint needs the SDXL-inpainting component configs. Offline, pass a local "
                f"diffusers folder of {SDXL_INPAINT_HUB_ID} (its *.json files are enough) as config= "
                "(CLI: --config DIR)."
            ) from err
        return check_inpainting_backbone(_components_of(pipe), source)

    try:
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(
            source, dtype=torch_dtype, variant=variant, local_files_only=local_files_only or False
        )
    except Exception as err:  # connection errors, missing cache entries, 404s
        raise BackboneLoadError(_offline_hint(source) + f"\n(underlying error: {type(err).__name__}: {err})") from err
    return check_inpainting_backbone(_components_of(pipe), source)


def check_inpainting_backbone(components: dict, source: str) -> dict:
    """Refuse text-to-image UNets: the method needs the inpainting input (noisy latent + mask + masked-image latent).

    That is 2 x latent channels + 1 input channels: 9 for SDXL's 4-channel VAE (33 for a 16-channel one).
    """
    config = components["unet"].config
    latent_channels = components["vae"].config.latent_channels
    if config.out_channels != latent_channels:
        raise BackboneLoadError(
            f"{source} has a UNet that predicts {config.out_channels} channels but a VAE with {latent_channels} "
            "latent channels; they must be the same backbone's."
        )
    if config.in_channels != 2 * latent_channels + 1:
        raise BackboneLoadError(
            f"{source} has a UNet with {config.in_channels} input channels; Patch-Adapter needs an inpainting UNet "
            f"with {2 * latent_channels + 1} (noisy latent + mask + masked-image latent), such as {SDXL_INPAINT_HUB_ID}."
        )
    return components


def backbone_identity(unet) -> dict:
    """What an adapter depends on in the UNet: its attention layout, not its weights."""
    cfg = unet.config
    keys = (
        "in_channels",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "transformer_layers_per_block",
        "attention_head_dim",
        "num_attention_heads",
        "cross_attention_dim",
    )
    return json.loads(json.dumps({k: cfg.get(k) for k in keys}))


def vae_latent_factor(vae_config) -> int:
    """Pixels per latent of an AutoencoderKL config (a mapping): it halves the picture at each level but the last."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def native_size(unet, vae_scale_factor: int = 8) -> int:
    """The side in pixels the backbone was trained at (1024 for SDXL, 128 for tiny)."""
    return int(unet.config.sample_size) * vae_scale_factor


def sdxl_inpaint_configs() -> dict:
    """The architecture of diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (its configs, no weights).

    For FLOP counts, memory estimates and GPU benchmarks with random weights, offline.
    """
    return {
        "unet": dict(
            sample_size=128,
            in_channels=9,
            out_channels=4,
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            force_upcast=True,
        ),
        "text_encoder": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
            vocab_size=49408,
            max_position_embeddings=77,
        ),
        "text_encoder_2": dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
            vocab_size=49408,
            max_position_embeddings=77,
        ),
    }


def build_sdxl_components(torch_dtype: torch.dtype = torch.float32, device="meta") -> dict:
    """SDXL-inpainting's UNet, VAE and text encoders with random weights (meta: no memory at all)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs = sdxl_inpaint_configs()
    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(**configs["unet"]).to(torch_dtype),
            "vae": AutoencoderKL(**configs["vae"]).to(torch_dtype),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])).to(
                torch_dtype
            ),
            "text_encoder_2": transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**configs["text_encoder_2"])
            ).to(torch_dtype),
        }


def backbone_on_meta(
    source: str = "tiny",
    torch_dtype: torch.dtype = torch.float32,
    config: str | None = None,
    local_files_only: bool | None = None,
) -> dict:
    """The UNet, VAE and text encoders of a backbone built from its configs on the meta device.

    For memory estimates and FLOP counts without reading weights: a folder's or the
    hub cache's *.json files are enough (a single-file checkpoint takes them from
    `config`, by default SDXL-inpainting's).
    """
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = str(source)
    if source == "tiny":
        root = tiny_weights_dir()
    elif Path(source).expanduser().suffix.lower() in SINGLE_FILE_SUFFIXES:
        if config is None:
            return build_sdxl_components(torch_dtype)
        root = config
    else:
        root = Path(source).expanduser() if Path(source).expanduser().is_dir() else source
    offline = dict(local_files_only=local_files_only) if local_files_only is not None else {}
    try:
        unet_config = UNet2DConditionModel.load_config(root, subfolder="unet", **offline)
        vae_config = AutoencoderKL.load_config(root, subfolder="vae", **offline)
        text_configs = [
            transformers.AutoConfig.from_pretrained(root, subfolder=name, **offline)
            for name in ("text_encoder", "text_encoder_2")
        ]
    except Exception as err:  # missing files, no network: the same answer for the user
        raise BackboneLoadError(
            f"could not read the component configs of {source} from {root}: {err}\n" + _offline_hint(str(root))
        ) from err
    with torch.device("meta"):
        components = {
            "unet": UNet2DConditionModel.from_config(unet_config).to(torch_dtype),
            "vae": AutoencoderKL.from_config(vae_config).to(torch_dtype),
            "text_encoder": transformers.CLIPTextModel(text_configs[0]).to(torch_dtype),
            "text_encoder_2": transformers.CLIPTextModelWithProjection(text_configs[1]).to(torch_dtype),
        }
    return components
