"""The tiny backbone's architecture: SDXL-inpainting's diffusers classes at small widths.

`build_tiny_components` gives them deterministic random weights (the recipe's starting
point, and tests that need a backbone of the right structure but no training).
"""

from __future__ import annotations

import torch

from .tokenizer import tiny_tokenizer

NATIVE_SIZE = 128
"""The tiny backbone's native side in pixels (its UNet's sample size times the VAE's factor)."""

LATENT_FACTORS = (8, 4)
"""The VAE's downsampling factors the tiny world builds (`tiny_configs`): SDXL's, and 32x32 latents at native size."""


def tiny_configs(latent_factor: int = 8, latent_channels: int = 4) -> dict:
    """Configs of the tiny backbone: SDXL-inpainting's structure at small widths.

    `latent_factor` 8 is SDXL's (16x16 latents at native size: an inserted object is 2-4
    cells wide, too few for its shape, docs/tiny-world.md); 4 gives the VAE one level less
    and the UNet one more (a cheap 32x32 level without attention), so the UNet's inner
    levels, where the text attends, keep their sizes. `latent_channels` is SDXL's 4 or
    more (newer VAEs have 16); the inpainting UNet takes 2 x channels + 1 (noisy and
    masked latents, mask).
    """
    if latent_factor not in LATENT_FACTORS:
        raise ValueError(f"latent_factor must be one of {LATENT_FACTORS}, not {latent_factor}")
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be at least 1, not {latent_channels}")
    text_dim, pooled_dim, time_dim = 32, 32, 8
    if latent_factor == 8:
        unet_levels = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
        )
        vae_widths = (32, 32, 64, 64)  # its texture: docs/tiny-world-probe.md
    else:
        unet_levels = dict(
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64, 64),
            transformer_layers_per_block=(1, 1, 1, 2),
            attention_head_dim=(2, 2, 4, 4),
        )
        vae_widths = (32, 64, 64)
    text_encoder = dict(
        hidden_size=text_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=pooled_dim,
        hidden_act="gelu",
    )
    return {
        "unet": dict(
            sample_size=NATIVE_SIZE // latent_factor,
            in_channels=2 * latent_channels + 1,
            out_channels=latent_channels,
            **unet_levels,
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=2 * text_dim,  # concatenated features of both text encoders
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
            up_block_types=("UpDecoderBlock2D",) * len(vae_widths),
            block_out_channels=vae_widths,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=latent_channels,
            sample_size=NATIVE_SIZE,
            scaling_factor=0.13025,
            force_upcast=False,  # fp32 VAE; SDXL's fp16 VAE is upcast by the pipeline
        ),
        "text_encoder": dict(text_encoder),
        "text_encoder_2": dict(text_encoder),  # the same size (SDXL's second encoder is larger)
        # SDXL-inpainting's scheduler settings.
        "scheduler": dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        ),
    }


def build_tiny_components(seed: int = 0, latent_factor: int = 8, latent_channels: int = 4) -> dict:
    """The tiny backbone with deterministic random weights (no download); the latent shape as `tiny_configs`'s.

    Each component is built under its own seed so that changing one config leaves
    the others' weights as they were. Global RNG state is left untouched.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = tiny_configs(latent_factor, latent_channels)
    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)

    def seeded(offset, make):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            return make()

    unet = seeded(0, lambda: UNet2DConditionModel(**configs["unet"]))
    vae = seeded(1, lambda: AutoencoderKL(**configs["vae"]))
    special = dict(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_cfg = CLIPTextConfig(**special, **configs["text_encoder"])
    text_cfg_2 = CLIPTextConfig(**special, **configs["text_encoder_2"])
    text_encoder = seeded(2, lambda: CLIPTextModel(text_cfg))
    text_encoder_2 = seeded(3, lambda: CLIPTextModelWithProjection(text_cfg_2))
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
        "scheduler": EulerDiscreteScheduler(**configs["scheduler"]),
    }
