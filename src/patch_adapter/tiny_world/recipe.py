"""The tiny backbone's recipe: train it from scratch in the tiny world, then its adapters.

`make train-tiny` runs `train_tiny`: four stages, each writing its result into the
package (`stages`, committed) so that work finished is kept if a later stage runs out of
time, and each skipped once done. Every stage runs on the CPU (the defaults' cost on 2
cores is in docs/tiny-world.md) or, with `device` "cuda", on a GPU, where the committed
stages were trained:

1. vae: reconstruct native-size views with the recipe's latent shape (f4 by default:
   32x32 latents at native size), from random weights or the shipped backbone's VAE, with
   L1 on pixels (object pixels counted more, crops centred on objects) and on their
   Laplacian (`vae_loss`): objects are a few percent of the pixels, and a VAE that
   returns them as blobs caps what any UNet can draw (`competence.vae_insert_ceiling`).
   An optional block-energy term asks each 8x8 block for the input's texture strength
   (off: it drew texture but cost the objects; docs/tiny-world.md).
   Written to `stages/vae` with its figures (`competence.texture_energy_kept`, the ceiling,
   `competence.phantom_objects`).
2. decoder: that VAE's decoder taught to draw the texture no latent cell can hold
   (`decoder_loss`: objects copied, backgrounds matched after a 5x5 mean and in their
   texture's spectrum, colour where there is none punished), the encoder frozen so the
   latents stay the VAE stage's. Written to `stages/decoder` with the same figures
   before and after; the backbone ships this VAE, unless it paints objects on empty
   backgrounds (`decoder_max_phantoms`) or draws texture no closer to the world's than
   the VAE stage's decoder (`decoder_min_spectrum_gain`): then only its report is written.
3. denoiser: the inpainting UNet (of the VAE stage's latent shape) and both text
   encoders, trained together on the Min-SNR-weighted noise-prediction loss over the
   views' insert / remove / repaint
   lessons (`views`), with the error inside each lesson's mask counted once more
   (`mask_weight`); EMA weights are kept. One run adds one round of `unet_steps` steps
   from the last round's weights, up to `denoiser_rounds`; each round's report holds
   the inserts read back at native size (`competence.insert_accuracy`) and the digest of
   the VAE whose latents it learnt (rounds on another VAE's latents are refused).
4. adapters: the backbone of stages 1-3 as a diffusers folder (fp16; its model_index
   names StableDiffusionXLInpaintPipeline), full-resolution scenes exported as an
   imagefolder, the Dual Context Adapter then the Reference Patch Adapter trained on
   them with the same `train()` as `patch-adapter train stage1|stage2`, and the shipped
   folder `weights` (what ``"tiny"`` loads) replaced whole. A decoder stage finished
   after them reassembles the backbone and keeps the adapters (they learnt the
   encoder's latents, which it leaves alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..image_io import to_float, to_model_range
from .competence import laplacian


@dataclass
class TinyRecipe:
    output: str = "src/patch_adapter/tiny_world/weights"  # the shipped diffusers folder ("tiny")
    stages: str = "src/patch_adapter/tiny_world/stages"  # each stage's committed result
    work: str = "build/tiny"  # views, intermediate models and adapter runs
    seed: int = 0
    threads: int = 2  # torch threads (the recipe is timed on 2 cores)
    device: str = "cpu"  # where the models train ("cuda" on a GPU); the figures are computed there too
    # the latent shape (`architecture.tiny_configs`): the VAE stage builds it, the denoiser follows the VAE stage's.
    # f4: 32x32 latents at native size (an f8 VAE's round trips read back at most 0.73-0.77 of the inserts, f4 0.90)
    latent_factor: int = 4
    latent_channels: int = 4
    # a wall-clock time (seconds since the epoch) at which a stage's training loop stops early, for runs on a
    # lent machine that must end in time; 0: none. The reports record the steps done (`steps_done`)
    stop_at: float = 0.0
    views: int = 16000  # training views of the denoiser (each with its own lesson and mask)
    # 1. VAE (the committed stage ran these on a GPU, 2,360 steps; docs/tiny-world.md, "The GPU sweep")
    vae_init: str = "random"  # "random": from scratch; "shipped": from the shipped backbone's VAE (`output`)
    vae_steps: int = 1600  # 87 minutes on 2 cores (3.3 s a step); the committed stage ran 2,360 on a GPU
    vae_batch: int = 64
    vae_crop: int = 64  # crops of the views; the VAE is convolutional
    vae_object_crops: float = 0.8  # share of crops centred near an object pixel (objects are a few % of the pixels)
    vae_object_weight: float = 10.0  # extra L1 weight of object pixels (`vae_loss`)
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_check_every: int = 400  # steps between read-backs of round-tripped inserts (`competence.vae_insert_ceiling`)
    # the block-energy term (see `vae_loss`): off while the copy loss converges, then ramped up. Off by default:
    # at weight 10 it drew texture but cost the objects (docs/tiny-world.md, "The VAE's objects")
    vae_energy_weight: float = 0.0
    vae_energy_start: float = 0.4  # share of the steps before it starts
    vae_energy_full: float = 0.7  # share of the steps at which it reaches its weight
    # 2. decoder: the VAE stage's decoder taught to draw texture (`decoder_loss`); the encoder is kept
    decoder_steps: int = 900
    decoder_batch: int = 8  # whole native views: texture everywhere, objects at every size
    decoder_lr: float = 2e-4
    decoder_spectrum_weight: float = 1.0  # the backgrounds asked for the input's texture spectrum
    decoder_colour_weight: float = 1.0  # the hinge against colour where the input has none (phantom objects)
    # a tuned decoder that paints more objects than this per empty background is not shipped (`decoder_stage`)
    decoder_max_phantoms: float = 0.1
    # nor one whose texture is not closer to the world's than the VAE stage's decoder's by more than this
    # (`competence.texture_spectrum_error`; a 4 px grid of its own is further than a flat decode)
    decoder_min_spectrum_gain: float = 0.0
    # 3. denoiser
    # a round (the committed ones: 1,131 and 1,434 steps on a GPU, stopped by `stop_at`; then 2,400 of batch 64 on 2 cores)
    unet_steps: int = 1450
    unet_batch: int = 128
    unet_lr: float = 6e-4
    unet_warmup: int = 200
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0  # Min-SNR loss weighting (0: plain MSE, as the first recipe)
    mask_weight: float = 1.0  # extra weight of the error inside the lesson's mask (`denoising_loss`)
    ema_decay: float = 0.999
    competence_tasks: int = 48  # native-size inserts read back after each round (competence.insert_accuracy)
    denoiser_rounds: int = 3  # runs of the denoiser stage, each `unet_steps` steps from the last one's weights
    # 4. adapters (the adapter trainer; any TrainConfig key can be added to these)
    adapter_scenes: int = 300
    adapter_sizes: tuple = (512, 1024)  # 4x and 8x native
    stage1: dict = dataclasses.field(
        default_factory=lambda: {"max_steps": 600, "batch_size": 8, "learning_rate": 1e-3, "lr_warmup_steps": 50}
    )
    # the joint-attention RPA starts from reference-only attention, and 300 steps train it on 2 cores in
    # under an hour (the gated-sum RPA before it had 600)
    stage2: dict = dataclasses.field(
        default_factory=lambda: {"max_steps": 300, "batch_size": 8, "learning_rate": 1e-3, "lr_warmup_steps": 30}
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%: the factor of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def out_of_time(recipe: TinyRecipe, step: int) -> bool:
    """True once `recipe.stop_at` has passed (never before a first step): the training loop then stops early."""
    if step and recipe.stop_at and time.time() > recipe.stop_at:
        log(f"stopping at step {step}: the run's time (stop_at) is up")
        return True
    return False


def make_views(recipe: TinyRecipe, native: int) -> dict:
    """All training views as arrays (cached in the work folder: drawing them takes a while)."""
    from .views import VIEWS_VERSION, scene_view

    cache = Path(recipe.work) / f"views_v{VIEWS_VERSION}_{recipe.views}_{recipe.seed}.npz"
    if cache.is_file():
        data = np.load(cache)
        return {"pixels": data["pixels"], "mask": data["mask"], "prompt": list(data["prompt"])}
    pixels = np.zeros((recipe.views, native, native, 3), dtype=np.uint8)
    mask = np.zeros((recipe.views, native, native), dtype=bool)
    prompts = []
    for i in range(recipe.views):
        view = scene_view(recipe.seed * 1_000_003 + i, native)
        pixels[i], mask[i] = view.pixels, view.mask
        prompts.append(view.prompt)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, pixels=pixels, mask=mask, prompt=np.array(prompts))
    return {"pixels": pixels, "mask": mask, "prompt": prompts}


def model_batch(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], the VAE's input."""
    return to_model_range(torch.from_numpy(to_float(pixels)).permute(0, 3, 1, 2))


def block_energy(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Mean squared Laplacian per block x block cell: how much fine detail each latent cell's pixels hold."""
    return F.avg_pool2d(laplacian(x) ** 2, block)


def object_share(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1]: how strongly each pixel is an object's colour.

    The detector's rule (`evaluation.detector`): objects are strongly coloured, the
    world's backgrounds and textures nearly grey. Ramps from its background chroma to 1.5x it.
    """
    from ..evaluation.detector import BACKGROUND_CHROMA

    chroma = (x - x.mean(dim=1, keepdim=True)).norm(dim=1, keepdim=True) * 127.5  # in 0-255 units
    return ((chroma - BACKGROUND_CHROMA) / (0.5 * BACKGROUND_CHROMA)).clamp(0, 1)


def vae_loss(
    reconstruction: torch.Tensor, x: torch.Tensor, energy_weight: float, object_weight: float = 0.0
) -> tuple[torch.Tensor, dict]:
    """Copy loss (L1 on pixels and on their Laplacian) plus the block-energy term.

    `object_weight` counts the L1 of object pixels (`object_share`) that much more: they
    are a few percent of the pixels, and a VAE trained on plain L1 learns the
    backgrounds first and returns objects as faint blobs of the wrong colour, which no
    UNet can then draw (docs/tiny-world.md, "The VAE's objects").

    A decoder trained only to copy returns the mean of what one latent cell cannot
    hold, so 1-2 px texture decodes flat. The energy term asks each 8x8 block of the
    reconstruction for the input's Laplacian energy, not its phase: the decoder then
    synthesizes texture of the right strength, as SDXL's adversarially trained VAE does
    (measured in docs/tiny-world-probe.md).
    """
    weight = 1.0 + object_weight * object_share(x)
    l1 = ((reconstruction - x).abs() * weight).mean() / weight.mean()
    detail = F.l1_loss(laplacian(reconstruction), laplacian(x))
    energy = F.l1_loss(block_energy(reconstruction).clamp_min(1e-8).sqrt(), block_energy(x).clamp_min(1e-8).sqrt())
    loss = l1 + detail + energy_weight * energy
    return loss, {"l1": F.l1_loss(reconstruction, x).item(), "laplacian_l1": detail.item(), "energy": energy.item()}


def object_pixels(pixels: np.ndarray, chunk: int = 512) -> np.ndarray:
    """(N, H, W, 3) uint8 views -> (N, H, W) bool: the detector's object pixels (strongly coloured)."""
    from ..evaluation.detector import BACKGROUND_CHROMA, chroma

    return np.concatenate(
        [
            np.linalg.norm(chroma(pixels[i : i + chunk]), axis=-1) > BACKGROUND_CHROMA
            for i in range(0, len(pixels), chunk)
        ]
    )


def vae_crops(
    rng: np.random.Generator, pixels: np.ndarray, objects: np.ndarray, index: np.ndarray, recipe: TinyRecipe
) -> np.ndarray:
    """(B, crop, crop, 3) crops of the views `index`: `vae_object_crops` of them centred near an object pixel.

    `objects`: the views' `object_pixels`, computed once (per crop it was most of a GPU step's time).
    """
    side, crop = pixels.shape[1], recipe.vae_crop
    out = []
    for i in index:
        ys, xs = np.nonzero(objects[i])
        if len(ys) and rng.random() < recipe.vae_object_crops:
            k = rng.integers(len(ys))
            centre = np.array([ys[k], xs[k]]) + rng.integers(-crop // 3, crop // 3 + 1, size=2)
            top, left = np.clip(centre - crop // 2, 0, side - crop)
        else:
            top, left = rng.integers(0, side - crop + 1, size=2)
        out.append(pixels[i, top : top + crop, left : left + crop])
    return np.stack(out)


def energy_weight_at(step: int, recipe: TinyRecipe) -> float:
    """The energy term's weight at `step`: 0, then a linear ramp, then `vae_energy_weight`."""
    start, full = recipe.vae_energy_start * recipe.vae_steps, recipe.vae_energy_full * recipe.vae_steps
    return recipe.vae_energy_weight * float(np.clip((step - start) / max(1.0, full - start), 0.0, 1.0))


def train_vae(vae, views: dict, recipe: TinyRecipe) -> dict:
    """Reconstruction training of the VAE; returns its log."""
    from .competence import vae_insert_ceiling

    rng = np.random.default_rng(recipe.seed)
    objects = object_pixels(views["pixels"])
    vae.to(recipe.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train()
    history, ceilings = [], []
    for step in range(recipe.vae_steps):
        if out_of_time(recipe, step):
            break
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * cosine_lr(step, recipe.vae_steps, 100)
        index = rng.integers(0, len(views["pixels"]), recipe.vae_batch)
        x = model_batch(vae_crops(rng, views["pixels"], objects, index, recipe)).to(recipe.device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss, parts = vae_loss(reconstruction, x, energy_weight_at(step, recipe), recipe.vae_object_weight)
        loss = loss + recipe.vae_kl * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        history.append(parts)
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            recent = {k: np.mean([h[k] for h in history[-100:]]) for k in parts}
            log(f"vae step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in recent.items()))
        if (step + 1) % recipe.vae_check_every == 0:
            vae.eval()
            ceilings.append({"step": step + 1, **vae_insert_ceiling(vae, recipe.competence_tasks)})
            log(f"vae step {step + 1}: inserts read back after a round trip {ceilings[-1]}")
            vae.train()
    vae.eval()
    return {
        "l1_first100": float(np.mean([h["l1"] for h in history[:100]])),
        "l1_last100": float(np.mean([h["l1"] for h in history[-100:]])),
        "energy_last100": float(np.mean([h["energy"] for h in history[-100:]])),
        "insert_ceiling_during": ceilings,
        "steps_done": len(history),
    }


def local_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of each pixel's 5x5 neighbourhood (edges replicated): the picture without its 1-2 px texture."""
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def decoder_loss(
    reconstruction: torch.Tensor, x: torch.Tensor, spectrum_weight: float, colour_weight: float, object_weight: float
) -> tuple[torch.Tensor, dict]:
    """The decoder stage's loss: copy the objects, synthesize the backgrounds' texture.

    No latent cell holds the phase of 1-2 px lines, dots and grain, so L1 on pixels pulls
    a decoder to their flat mean (VAE stage 2 keeps 0.00005 of their energy). Here only
    objects and their edges (`object_share`, grown by 3 px) are copied pixel for pixel
    (L1 counted `object_weight` + 1 times, and on the Laplacian). Backgrounds are compared
    after a 5x5 mean (`local_mean`), where the texture averages out, and by the spectrum
    of their object-free windows (`competence.texture_spectrum`): the decoder draws the
    texture's frequencies and orientations at a phase of its own, as SDXL's VAE synthesizes
    grain. Asking only for the texture's energy drew a 4 px grid of the decoder's own with
    colour speckle (docs/tiny-world.md, "A texture of the world's spectrum"). A hinge on
    colour where the input has none keeps it from painting objects there
    (`competence.phantom_objects`), which texture-drawing decoders did without it.
    """
    from .competence import SPECTRUM_WINDOW, spectrum_error, texture_spectrum

    objects = F.max_pool2d(object_share(x), 7, stride=1, padding=3)
    background = 1 - objects
    copy = ((reconstruction - x).abs() * (1 + object_weight * objects) * objects).mean()
    edges = ((laplacian(reconstruction) - laplacian(x)).abs() * objects[..., 1:-1, 1:-1]).mean()
    low = ((local_mean(reconstruction) - local_mean(x)).abs() * background).mean()
    # the spectrum's windows with no object in them, in `texture_spectrum`'s order
    plain = (F.avg_pool2d(objects, SPECTRUM_WINDOW, stride=SPECTRUM_WINDOW // 2) < 0.02).float().flatten(1)
    errors = spectrum_error(texture_spectrum(reconstruction, plain), texture_spectrum(x, plain))
    spectrum = (errors * (plain.sum(dim=1) > 0)).mean()
    colour = (object_share(reconstruction) * background).mean()
    loss = copy + edges + low + spectrum_weight * spectrum + colour_weight * colour
    parts = {
        "objects": (copy + edges).item(),
        "background": low.item(),
        "spectrum": spectrum.item(),
        "colour": colour.item(),
    }
    return loss, parts


def encoder_digest(vae) -> str:
    """`weights_digest` of what makes the latents (encoder and quant_conv): equal digests, equal latents."""
    return weights_digest(torch.nn.ModuleList([m for m in (vae.encoder, vae.quant_conv) if m is not None]))


def train_decoder(vae, views: dict, recipe: TinyRecipe) -> dict:
    """`decoder_loss` on whole views, the encoder frozen; returns its log."""
    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator(recipe.device).manual_seed(recipe.seed)
    vae.to(recipe.device).requires_grad_(False)
    parameters = [*vae.decoder.parameters(), *(vae.post_quant_conv.parameters() if vae.post_quant_conv else [])]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=recipe.decoder_lr, betas=(0.5, 0.9), weight_decay=0.0)
    vae.eval()  # the encoder's latents as the denoiser sees them; the decoder has no dropout or batch norm
    history = []
    for step in range(recipe.decoder_steps):
        if out_of_time(recipe, step):
            break
        for group in optimizer.param_groups:
            group["lr"] = recipe.decoder_lr * cosine_lr(step, recipe.decoder_steps, 30)
        x = model_batch(views["pixels"][rng.integers(0, len(views["pixels"]), recipe.decoder_batch)]).to(recipe.device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator)
        loss, parts = decoder_loss(
            vae.decode(latents).sample,
            x,
            recipe.decoder_spectrum_weight,
            recipe.decoder_colour_weight,
            recipe.vae_object_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        history.append(parts)
        if step % 100 == 0 or step == recipe.decoder_steps - 1:
            recent = {k: np.mean([h[k] for h in history[-100:]]) for k in parts}
            log(f"decoder step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in recent.items()))
    vae.requires_grad_(False)
    return {
        f"{k}_{part}": float(np.mean([h[k] for h in span]))
        for k in history[0]
        for part, span in (("first100", history[:100]), ("last100", history[-100:]))
    } | {"steps_done": len(history)}


@torch.no_grad()
def fit_latent_scale(vae, views: dict, count: int = 256) -> float:
    """SD's recipe: scaling_factor = 1 / std of the latents, so the UNet sees unit variance."""
    latents = [
        vae.encode(model_batch(views["pixels"][i : i + 32]).to(vae.device)).latent_dist.mean
        for i in range(0, min(count, len(views["pixels"])), 32)
    ]
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def encode_views(pipe, views: dict, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of each target view, and of it with the mask area grey (the UNet's 9-channel input), on the CPU."""
    targets, masked = [], []
    for i in range(0, len(views["pixels"]), batch):
        x = model_batch(views["pixels"][i : i + batch])
        keep = torch.from_numpy(~views["mask"][i : i + batch])[:, None].float()
        targets.append(pipe.encode(x).cpu())
        masked.append(pipe.encode(x * keep).cpu())
    return torch.cat(targets), torch.cat(masked)


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's weights: which VAE a cache or a stage started from."""
    import hashlib

    return hashlib.sha1(b"".join(t.cpu().numpy().tobytes() for t in module.state_dict().values())).hexdigest()[:12]


def cached_latents(pipe, views: dict, recipe: TinyRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_views`, kept in the work folder per views and VAE (encoding 16,000 views takes 15 minutes on 2 cores)."""

    from .views import VIEWS_VERSION

    cache = Path(recipe.work) / f"latents_v{VIEWS_VERSION}_{recipe.views}_{recipe.seed}_{weights_digest(pipe.vae)}.pt"
    if cache.is_file():
        return torch.load(cache)
    encoded = encode_views(pipe, views)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoded, cache)
    return encoded


def train_denoiser(pipe, views: dict, recipe: TinyRecipe, encoded: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The UNet and both text encoders on the noise-prediction loss; EMA weights end up in `pipe`.

    `encoded`: the views' (latents, masked latents), from `cached_latents`.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from ..training.trainer import denoising_loss, encode_captions, micro_time_ids, stage_latent_mask

    latents, masked_latents = (e.to(recipe.device) for e in encoded)
    log(f"encoded {len(latents)} views: latent std {latents.std():.3f}")
    masks = torch.from_numpy(views["mask"])[:, None].float().to(recipe.device)
    prompts = views["prompt"]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=recipe.ema_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed + 1)
    factor = pipe.vae_scale_factor
    history = []
    for step in range(recipe.unet_steps):
        if out_of_time(recipe, step):
            break
        for group in optimizer.param_groups:
            group["lr"] = recipe.unet_lr * cosine_lr(step, recipe.unet_steps, recipe.unet_warmup)
        index = torch.from_numpy(rng.integers(0, len(latents), recipe.unet_batch)).to(recipe.device)
        x0, masked = latents[index], masked_latents[index]
        # both stages' latent masks: stage 1 resizes (nearest), stage 2 max-pools
        mask = stage_latent_mask(masks[index], "stage1" if step % 2 else "stage2", factor)
        captions = ["" if rng.random() < recipe.caption_dropout else prompts[i] for i in index.tolist()]
        embeds, pooled = encode_captions(pipe, captions)
        time_ids = micro_time_ids(pipe, len(index), x0.shape[-2] * factor, x0.shape[-1] * factor, embeds, pooled)
        loss = denoising_loss(
            pipe.unet,
            noise_scheduler,
            x0,
            mask,
            masked,
            embeds,
            pooled,
            time_ids,
            {"dca_scale": 0.0},
            generator,
            x0.dtype,
            snr_gamma=recipe.snr_gamma or None,
            mask_weight=recipe.mask_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(params)
        history.append(loss.item())
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            log(f"denoiser step {step}: loss {np.mean(history[-100:]):.4f}")
    ema.copy_to(params)
    for m in modules:
        m.eval().requires_grad_(False)
    return {
        "loss_first100": float(np.mean(history[:100])),
        "loss_last100": float(np.mean(history[-100:])),
        "steps_done": len(history),
    }


def copy_atomically(source: Path, target: Path) -> None:
    """Copy a file so that `target` is either the old file or the whole new one, never a part."""
    import shutil

    from ..image_io import atomic_write

    with open(source, "rb") as reading, atomic_write(target) as writing:
        shutil.copyfileobj(reading, writing)


def read_json(path: Path):
    """The JSON in `path`, or None where there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: dict) -> None:
    from ..image_io import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=2).encode())


def initial_vae(recipe: TinyRecipe) -> tuple:
    """(VAE, where it came from): the shipped backbone's VAE (`vae_init` "shipped") or the seed's random one.

    Starting from the shipped VAE makes each run of the stage a round on top of the last
    shipped one, as the denoiser's rounds are: a VAE trained from scratch on 2 cores
    draws objects as blobs for its first thousands of steps (docs/tiny-world.md).
    """
    from diffusers import AutoencoderKL

    from .architecture import build_tiny_components

    if recipe.vae_init == "random":
        shape = dict(latent_factor=recipe.latent_factor, latent_channels=recipe.latent_channels)
        return build_tiny_components(seed=recipe.seed, **shape)["vae"], "random"
    shipped = Path(recipe.output) / "vae"
    if recipe.vae_init != "shipped":
        raise ValueError(f"vae_init must be 'shipped' or 'random', not {recipe.vae_init!r}")
    if not (shipped / "config.json").is_file():
        raise FileNotFoundError(
            f"{shipped} holds no VAE to start from: run with --vae-init random to start from scratch"
        )
    vae = AutoencoderKL.from_pretrained(shipped, torch_dtype=torch.float32)
    if latent_shape(vae) != (recipe.latent_factor, recipe.latent_channels):
        raise ValueError(
            f"the shipped VAE in {shipped} has latent factor and channels {latent_shape(vae)}, the recipe asks for "
            f"{(recipe.latent_factor, recipe.latent_channels)}: run with --vae-init random to start from scratch"
        )
    return vae, f"{shipped} (weights {weights_digest(vae)})"


def latent_shape(vae) -> tuple[int, int]:
    """(downsampling factor, latent channels) of an AutoencoderKL, as `architecture.tiny_configs` takes them."""
    from ..backbone import vae_latent_factor

    return vae_latent_factor(vae.config), int(vae.config.latent_channels)


def write_vae_stage(vae, report: dict, recipe: TinyRecipe, folder: Path) -> Path:
    """A VAE stage's result: the fp16 AutoencoderKL folder and its report (with the recipe), in place of `folder`.

    `vae` None writes the report alone (a decoder stage whose result was rejected).
    """
    from .views import VIEWS_VERSION

    report["recipe"] = dataclasses.asdict(recipe) | {"views_version": VIEWS_VERSION}
    log(f"{folder.name}: {report}")
    staging = fresh_staging(folder)
    if vae is None:
        staging.mkdir(parents=True)
    else:
        vae.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    write_json(staging / "report.json", report)
    replace_folder(staging, folder)
    return folder


def vae_stage(recipe: TinyRecipe) -> Path:
    """Stage 1: the VAE, written to `<stages>/vae` (fp16, a diffusers AutoencoderKL folder) with its report."""
    from .architecture import NATIVE_SIZE
    from .competence import phantom_objects, texture_energy_kept, vae_insert_ceiling

    folder = Path(recipe.stages) / "vae"
    if (folder / "report.json").is_file():
        log(f"vae stage already done: {folder}")
        return folder
    vae, init = initial_vae(recipe)
    vae.to(recipe.device)
    start = time.time()
    views = make_views(recipe, NATIVE_SIZE)
    log(f"{len(views['pixels'])} views in {time.time() - start:.0f} s")
    start = time.time()
    report = {"init": init, "insert_ceiling_before": vae_insert_ceiling(vae.eval(), recipe.competence_tasks)}
    report |= train_vae(vae, views, recipe)
    report["seconds"] = time.time() - start
    vae.to(torch.float16).to(torch.float32)  # the figures are those of the weights the stage writes
    report["insert_ceiling"] = vae_insert_ceiling(vae, recipe.competence_tasks)
    vae.register_to_config(scaling_factor=fit_latent_scale(vae, views))
    report["scaling_factor"] = vae.config.scaling_factor
    report["texture_energy_kept"] = texture_energy_kept(vae)
    report["phantom_objects"] = phantom_objects(vae)
    return write_vae_stage(vae, report, recipe, folder)


def load_stage_vae(recipe: TinyRecipe):
    """The VAE of stage 1, in float32 (frozen from here on)."""
    from diffusers import AutoencoderKL

    folder = Path(recipe.stages) / "vae"
    if not (folder / "report.json").is_file():
        raise FileNotFoundError(f"{folder} holds no finished VAE stage: run the recipe's 'vae' stage first")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)


def decoder_figures(vae, recipe: TinyRecipe) -> dict:
    """What a decoder changes: texture kept and its spectrum error, inserts read back, objects painted where none are."""
    from .competence import phantom_objects, texture_energy_kept, texture_spectrum_error, vae_insert_ceiling

    return {
        "texture_energy_kept": texture_energy_kept(vae),
        "texture_spectrum_error": texture_spectrum_error(vae),
        "insert_ceiling": vae_insert_ceiling(vae, recipe.competence_tasks),
        "phantom_objects": phantom_objects(vae),
    }


def decoder_stage(recipe: TinyRecipe) -> Path:
    """Stage 2: the VAE stage's decoder taught to draw texture (`decoder_loss`), written to `<stages>/decoder`.

    The encoder stays the VAE stage's bit for bit, so the latents the denoiser learns
    (and the digest its rounds record) are unchanged, and so are the adapters trained on
    them: only what the backbone draws from its latents changes (Stable Diffusion's
    ft-MSE VAE was made the same way). The backbone ships this VAE (`backbone_vae`).
    """
    from .architecture import NATIVE_SIZE

    folder = Path(recipe.stages) / "decoder"
    if (folder / "report.json").is_file():
        log(f"decoder stage already done: {folder}")
        return folder
    vae = load_stage_vae(recipe).to(recipe.device)
    encoder = encoder_digest(vae)
    views = make_views(recipe, NATIVE_SIZE)
    report = {"encoder": encoder, "before": decoder_figures(vae, recipe)}
    start = time.time()
    report |= train_decoder(vae, views, recipe)
    report["seconds"] = time.time() - start
    vae.to(torch.float16).to(torch.float32)  # the figures are those of the weights the stage writes
    if encoder_digest(vae) != encoder:
        raise RuntimeError("the decoder stage changed the encoder: the denoiser's latents would no longer be its")
    report["after"] = decoder_figures(vae, recipe)
    spectrum = {k: report[k]["texture_spectrum_error"]["round_trip"] for k in ("before", "after")}
    if report["after"]["phantom_objects"] > recipe.decoder_max_phantoms:
        # a backbone that paints objects on empty backgrounds paints them into removals too
        report["rejected"] = (
            f"{report['after']['phantom_objects']:.3f} phantom objects per empty background, more than "
            f"decoder_max_phantoms {recipe.decoder_max_phantoms}: the VAE stage's decoder is kept"
        )
    elif spectrum["before"] - spectrum["after"] <= recipe.decoder_min_spectrum_gain:
        # texture of its own (a grid, speckle) is further from the world's than the flat decode it would replace
        report["rejected"] = (
            f"texture spectrum error {spectrum['after']:.3f} against the VAE stage's decoder's "
            f"{spectrum['before']:.3f}, not lower by more than decoder_min_spectrum_gain "
            f"{recipe.decoder_min_spectrum_gain}: the VAE stage's decoder is kept"
        )
    if "rejected" in report:  # the stage is done, its report says why, and `backbone_vae` keeps the VAE stage's
        return write_vae_stage(None, report, recipe, folder)
    return write_vae_stage(vae, report, recipe, folder)


def backbone_vae(recipe: TinyRecipe):
    """The VAE the backbone ships: the decoder stage's once it is done (and not rejected), else the VAE stage's.

    Refuses a decoder stage whose encoder is not the VAE stage's: it was tuned on another VAE.
    """
    from diffusers import AutoencoderKL

    vae = load_stage_vae(recipe)
    folder = Path(recipe.stages) / "decoder"
    report = read_json(folder / "report.json")
    if report is None or "rejected" in report:
        return vae
    tuned = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)
    if encoder_digest(tuned) != encoder_digest(vae):
        raise RuntimeError(
            f"the decoder in {folder} was tuned on another VAE stage's encoder; delete {folder} to tune this one's"
        )
    return tuned


DENOISER_PARTS = ("unet", "text_encoder", "text_encoder_2")


def load_denoiser(folder: Path, dtype: torch.dtype) -> dict:
    """The UNet and both text encoders of a denoiser round, as components."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=dtype),
    }


def check_same_vae(rounds: list, vae, folder: Path) -> str:
    """The digest of the stage's `vae`; refuses denoiser rounds that were trained on the latents of another VAE."""
    digest = weights_digest(vae)
    trained_on = {r.get("vae") for r in rounds}
    if trained_on - {digest}:
        raise RuntimeError(
            f"the denoiser rounds in {folder} were trained on another VAE's latents than the VAE stage's "
            f"(weights {digest}); delete {folder} to train the denoiser again on this VAE"
        )
    return digest


def denoiser_stage(recipe: TinyRecipe) -> Path:
    """Stage 3: one round of denoiser training, written to `<stages>/denoiser`.

    Each run of the stage adds one round of `unet_steps` steps (its own warm-up and
    cosine schedule), starting from the previous round's EMA weights, until
    `denoiser_rounds` rounds are done: the stage fits the 90-minute limit per run and
    still trains as long as the world needs.
    """
    from ..pipeline import PatchAdapterPipeline
    from .architecture import build_tiny_components
    from .competence import insert_accuracy, mask_errors
    from .views import VIEWS_VERSION

    folder = Path(recipe.stages) / "denoiser"
    report_file = folder / "report.json"
    rounds = json.loads(report_file.read_text())["rounds"] if report_file.is_file() else []
    stage_vae = load_stage_vae(recipe)
    vae = check_same_vae(rounds, stage_vae, folder)
    if len(rounds) >= recipe.denoiser_rounds:
        log(f"denoiser stage already done ({len(rounds)} rounds): {folder}")
        return folder
    factor, channels = latent_shape(stage_vae)  # the UNet's latents are the VAE stage's
    components = build_tiny_components(seed=recipe.seed, latent_factor=factor, latent_channels=channels)
    components["vae"] = stage_vae
    if rounds:
        components.update(load_denoiser(folder, torch.float32))
    pipe = PatchAdapterPipeline(**components).to(recipe.device)
    pipe.set_progress_bar_config(disable=True)
    views = make_views(recipe, pipe.native_size)
    start = time.time()
    encoded = cached_latents(pipe, views, recipe)
    result = train_denoiser(pipe, views, dataclasses.replace(recipe, seed=recipe.seed + len(rounds)), encoded)
    result["seconds"] = time.time() - start
    result["insert_at_native"] = insert_accuracy(pipe, count=recipe.competence_tasks, dca_scale=0.0)  # no adapters yet
    shown = slice(0, recipe.competence_tasks)  # the first views: what the round learnt, inside the masks and outside
    masks = torch.from_numpy(views["mask"][shown])[:, None]
    result["mask_errors"] = mask_errors(pipe, encoded[0][shown], encoded[1][shown], masks, views["prompt"][shown])
    result["vae"] = vae
    result["recipe"] = dataclasses.asdict(recipe) | {"views_version": VIEWS_VERSION}
    log(f"denoiser round {len(rounds) + 1}: {result}")
    staging = fresh_staging(folder)
    for name in DENOISER_PARTS:
        getattr(pipe, name).to(torch.float16).save_pretrained(staging / name, safe_serialization=True)
    write_json(staging / "report.json", {"rounds": rounds + [result]})
    replace_folder(staging, folder)
    return folder


def fresh_staging(folder: Path) -> Path:
    """An empty `<folder>.partial` to write a stage's result into (what an interrupted run left there is removed)."""
    import shutil

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def replace_folder(staging: Path, folder: Path) -> None:
    """Put a finished `staging` folder in place of `folder` (the old one removed only once the new is whole)."""
    import shutil

    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def assemble_backbone(recipe: TinyRecipe, folder: Path) -> Path:
    """The backbone of the VAE, decoder and denoiser stages as a diffusers folder (fp16; model_index names
    StableDiffusionXLInpaintPipeline)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from .architecture import build_tiny_components

    denoiser = Path(recipe.stages) / "denoiser"
    if not (denoiser / "report.json").is_file():
        raise FileNotFoundError(f"{denoiser} holds no finished denoiser stage: run the recipe's 'denoiser' stage")
    vae = load_stage_vae(recipe)
    check_same_vae(json.loads((denoiser / "report.json").read_text())["rounds"], vae, denoiser)
    components = build_tiny_components(seed=recipe.seed)
    components.update(load_denoiser(denoiser, torch.float16), vae=backbone_vae(recipe).to(torch.float16))
    StableDiffusionXLInpaintPipeline(**components).save_pretrained(folder, safe_serialization=True)
    write_json(folder / "recipe_report.json", stage_reports(recipe))
    return folder


def stage_reports(recipe: TinyRecipe) -> dict:
    """The reports of the stages a backbone is assembled from (its `recipe_report.json`)."""
    folders = {stage: Path(recipe.stages) / stage / "report.json" for stage in ("vae", "decoder", "denoiser")}
    return {stage: json.loads(path.read_text()) for stage, path in folders.items() if path.is_file()}


TRAINED_ON = "trained_on.json"
"""Next to adapters (kept in the stages folder, or an adapter run in the work folder): the stage reports of the
backbone they learnt (`backbone_learnt`)."""

ADAPTERS_LEARN = ("vae", "denoiser")
"""The stages whose change makes trained adapters stale (a new decoder does not: they learnt the encoder's latents)."""


def backbone_learnt(backbone: Path) -> dict:
    """What adapters trained on an assembled `backbone` learnt: its VAE and denoiser stages' reports."""
    report = read_json(backbone / "recipe_report.json") or {}
    return {k: report.get(k) for k in ADAPTERS_LEARN}


def train_adapters(recipe: TinyRecipe, backbone: Path) -> Path:
    """Step 4-5: DCA then RPA with the adapter trainer; both merged into one adapter file.

    A finished run in the work folder is reused only when it was trained on this backbone's VAE and
    denoiser (its `TRAINED_ON`); other runs are trained again (they were once reused silently).
    """
    import shutil

    from safetensors.torch import load_file

    from ..adapters import BUNDLED_ADAPTER_FILE, install_adapters, save_adapter
    from ..backbone import load_backbone
    from ..training.config import TrainConfig
    from ..training.trainer import train
    from .views import export_scene_folder

    work = Path(recipe.work)
    data = work / "scenes"
    if not (data / "metadata.jsonl").is_file():
        export_scene_folder(data, recipe.adapter_scenes, recipe.adapter_sizes, seed=recipe.seed + 7)
    common = dict(
        model=str(backbone),
        data=str(data),
        seed=recipe.seed,
        dataloader_num_workers=0,
        report_to="none",
        checkpointing_steps=10_000,
    )
    files = {"stage1": work / "stage1" / "dca.safetensors", "stage2": work / "stage2" / "rpa.safetensors"}
    learnt = backbone_learnt(backbone)
    for stage, weights in files.items():
        run = weights.parent
        if weights.is_file() and read_json(run / TRAINED_ON) == learnt:
            continue  # a finished run on this backbone: a rerun of the stage continues
        if run.exists():
            # finished or not, a run on another backbone would be shipped as if it had learnt this one
            log(f"{stage}: the run in {run} is not one on this backbone's VAE and denoiser; training it again")
            shutil.rmtree(run)
        settings = dict(common, stage=stage, output=str(run), **getattr(recipe, stage))
        if stage == "stage2":
            settings["dca"] = str(files["stage1"])
        log(f"{stage}: {train(TrainConfig(**settings))}")
        write_json(run / TRAINED_ON, learnt)

    components = load_backbone(str(backbone))
    unet = components["unet"]
    install_adapters(unet)
    state = {**load_file(str(files["stage1"])), **load_file(str(files["stage2"]))}
    _, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"adapter files hold keys the UNet lacks: {unexpected[:5]}")
    path = save_adapter(backbone / BUNDLED_ADAPTER_FILE, unet, backbone_name="tiny", dtype=torch.float16)
    log(f"adapters merged into {path}")
    return path


def kept_adapters_file(recipe: TinyRecipe) -> Path:
    """The adapters stage's committed adapter file (its `TRAINED_ON` beside it)."""
    from ..adapters import BUNDLED_ADAPTER_FILE

    return Path(recipe.stages) / "adapters" / BUNDLED_ADAPTER_FILE


def keep_adapters(recipe: TinyRecipe, trained: Path, backbone: Path) -> Path:
    """Commit an adapter file to the adapters stage, with what its backbone's stages had learnt (`TRAINED_ON`)."""
    kept = kept_adapters_file(recipe)
    kept.parent.mkdir(parents=True, exist_ok=True)
    write_json(kept.parent / TRAINED_ON, backbone_learnt(backbone))
    copy_atomically(trained, kept)
    return kept


def retrain_adapters(recipe: TinyRecipe, kinds=("rpa",)) -> Path:
    """Train adapters again on the backbone already in `recipe.output`, keeping the others.

    For a change of an adapter's design: the backbone (hours) stays, the named adapters
    train from their initial weights, the other ones are kept from the shipped file
    (read whatever its format version, since only the kept kinds are used). The result
    replaces the shipped file and the adapters stage's committed one, so that
    `make train-tiny` assembles the same folder again.
    """
    import shutil

    from safetensors.torch import load_file

    from ..adapters import BUNDLED_ADAPTER_FILE, install_adapters, save_adapter
    from ..backbone import load_backbone

    work, output = Path(recipe.work), Path(recipe.output)
    backbone = work / "backbone"
    if not (backbone / "model_index.json").is_file():
        shutil.copytree(output, backbone, ignore=shutil.ignore_patterns(BUNDLED_ADAPTER_FILE))
    shipped = load_file(str(output / BUNDLED_ADAPTER_FILE))
    stage_of = {"dca": ("stage1", "dca.safetensors"), "rpa": ("stage2", "rpa.safetensors")}
    for kind, (stage, name) in stage_of.items():
        target = work / stage / name
        if kind in kinds or target.is_file():
            continue
        unet = load_backbone(str(backbone))["unet"]
        install_adapters(unet)
        layer = "attn2" if kind == "dca" else "attn1"
        unet.load_state_dict({k: v for k, v in shipped.items() if f".{layer}.processor." in k}, strict=False)
        save_adapter(target, unet, kinds=(kind,), backbone_name="tiny")
        write_json(target.parent / TRAINED_ON, backbone_learnt(backbone))
        log(f"kept the shipped {kind} in {target}")
    path = train_adapters(recipe, backbone)
    kept = keep_adapters(recipe, path, backbone)
    copy_atomically(path, output / BUNDLED_ADAPTER_FILE)
    log(f"adapters in {output / BUNDLED_ADAPTER_FILE} and {kept}")
    return output / BUNDLED_ADAPTER_FILE


def adapters_stage(recipe: TinyRecipe) -> Path:
    """Stage 4: DCA then RPA on the assembled backbone; then the shipped folder (`output`) is replaced whole.

    The adapter file is kept in `<stages>/adapters` too, with the VAE and denoiser reports it was trained on
    (`trained_on.json`): committed, so that a fresh clone ships them without training, and refused once
    those stages change (a new decoder leaves them valid: the latents they learnt are the encoder's).
    """
    import shutil

    from ..adapters import BUNDLED_ADAPTER_FILE

    kept = kept_adapters_file(recipe)
    trained_on_file = kept.parent / TRAINED_ON
    backbone = Path(recipe.work) / "backbone"
    assembled = backbone / "recipe_report.json"
    old = read_json(assembled) or {}
    now = stage_reports(recipe)
    # adapters kept from before `trained_on.json` existed are checked against the backbone they were assembled with
    trained_on = read_json(trained_on_file) or old
    if kept.is_file() and trained_on and any(trained_on.get(k) != now.get(k) for k in ADAPTERS_LEARN):
        raise RuntimeError(
            f"the adapters in {kept.parent} were trained on another VAE or denoiser than the stages' now: "
            f"delete {kept.parent} to train them again"
        )
    if not assembled.is_file() or old != now:  # a stage finished since the backbone was assembled
        replace_folder(assemble_backbone(recipe, fresh_staging(backbone)), backbone)
    if not kept.is_file():
        keep_adapters(recipe, train_adapters(recipe, backbone), backbone)
    output = Path(recipe.output)
    staging = fresh_staging(output)
    shutil.copytree(backbone, staging, ignore=shutil.ignore_patterns(BUNDLED_ADAPTER_FILE))
    shutil.copyfile(kept, staging / BUNDLED_ADAPTER_FILE)
    replace_folder(staging, output)
    log(f"tiny backbone and adapters in {output}")
    return output


STAGES = {"vae": vae_stage, "decoder": decoder_stage, "denoiser": denoiser_stage, "adapters": adapters_stage}
"""The recipe's stages in order; each writes its result into the package and is skipped once done."""


def train_tiny(recipe: TinyRecipe, stages=tuple(STAGES)) -> Path:
    """The named stages in order (all by default); returns the last one's folder."""
    start = time.time()
    for name in stages:
        folder = STAGES[name](recipe)
        if name == "denoiser":  # one run adds one round; the whole recipe runs them all
            while len(json.loads((folder / "report.json").read_text())["rounds"]) < recipe.denoiser_rounds:
                folder = denoiser_stage(recipe)
        log(f"stage {name} done after {(time.time() - start) / 60:.1f} min: {folder}")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(TinyRecipe):
        if field.type in ("int", "float", "str"):
            parser.add_argument(
                f"--{field.name.replace('_', '-')}",
                type={"int": int, "float": float}.get(field.type, str),
                default=getattr(TinyRecipe(), field.name),
            )
    parser.add_argument(
        "--retrain",
        default=None,
        choices=["rpa", "dca", "adapters"],
        help="train only these adapters again on the backbone already in --output",
    )
    parser.add_argument(
        "--stage", default=None, choices=list(STAGES), help="run only this stage (one round of the denoiser's)"
    )
    args = parser.parse_args(argv)
    retrain = args.__dict__.pop("retrain")
    stage = args.__dict__.pop("stage")
    recipe = TinyRecipe(**vars(args))
    torch.set_num_threads(recipe.threads)
    if stage:
        STAGES[stage](recipe)
    elif retrain:
        retrain_adapters(recipe, ("dca", "rpa") if retrain == "adapters" else (retrain,))
    else:
        train_tiny(recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
