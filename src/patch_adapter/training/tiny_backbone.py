"""The tiny backbone's recipe: train it from scratch on procedural scenes, then its adapters.

`make train-tiny` runs `train_tiny`, which reproduces the committed
`src/patch_adapter/tiny_weights/` in five steps:

1. VAE: reconstruct native-size views (L1 on pixels and on their Laplacian, a tiny
   KL term). Measured: it decodes 1-2 px texture as a flat tint (its reconstructions
   keep about 1e-4 of the texture's Laplacian energy): 4 channels per 8x8 block
   trained for minutes cannot hold the lines' phase. Two texture-energy losses were
   tried (matching the local mean |Laplacian| per channel, then per direction on
   luma) and gave coloured vertical stripes (energy 0.4-0.5 of the truth's) or flat
   output again (0.015-0.05 after 600 steps), so the plain losses stay.
2. Denoiser: the 9-channel inpainting UNet and both text encoders, trained together
   on the noise-prediction loss over the views' insert / remove / repaint lessons
   (`scene_views`); an EMA of the weights is what gets saved.
3. The backbone is written as a diffusers folder in fp16 (`save_pretrained`: its
   model_index.json names StableDiffusionXLInpaintPipeline, so stock diffusers loads it).
4. Full-resolution scenes are exported as an imagefolder, and the Dual Context
   Adapter (stage 1) then the Reference Patch Adapter (stage 2) are trained on it
   with the same `train()` as `patch-adapter train stage1|stage2`.
5. Both adapters are merged into the folder's `BUNDLED_ADAPTER_FILE`, which
   `PatchAdapterPipeline.from_pretrained("tiny")` loads.

Each step writes its result into the work folder and is skipped when rerun, so an
interrupted recipe continues where it stopped.
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


@dataclass
class TinyRecipe:
    output: str = "src/patch_adapter/tiny_weights"  # the committed diffusers folder
    work: str = "build/tiny"  # views, intermediate models and adapter runs
    seed: int = 0
    threads: int = 2  # torch threads (the recipe is timed on 2 cores)
    views: int = 16000  # training views of the denoiser (each with its own lesson and mask)
    # 1. VAE
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_crop: int = 64  # random crops of the views; the VAE is convolutional
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    # 2. denoiser
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    unet_warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
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


def make_views(recipe: TinyRecipe, native: int) -> dict:
    """All training views as arrays (cached in the work folder: drawing them takes a while)."""
    from .scene_views import scene_view

    cache = Path(recipe.work) / f"views_{recipe.views}_{recipe.seed}.npz"
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


def laplacian(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    kernel = kernel.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, kernel, groups=x.shape[1])


def train_vae(vae, views: dict, recipe: TinyRecipe) -> dict:
    """Reconstruction training of the VAE; returns its log."""
    rng = np.random.default_rng(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train()
    history = []
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * cosine_lr(step, recipe.vae_steps, 100)
        index = rng.integers(0, len(views["pixels"]), recipe.vae_batch)
        top, left = rng.integers(0, views["pixels"].shape[1] - recipe.vae_crop + 1, 2)
        x = model_batch(views["pixels"][index, top : top + recipe.vae_crop, left : left + recipe.vae_crop])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(reconstruction, x)
        detail = F.l1_loss(laplacian(reconstruction), laplacian(x))
        loss = l1 + detail + recipe.vae_kl * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        history.append((l1.item(), detail.item()))
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            recent = np.mean(history[-100:], axis=0)
            log(f"vae step {step}: l1 {recent[0]:.4f} laplacian l1 {recent[1]:.4f}")
    vae.eval()
    return {
        "l1_first100": float(np.mean([h[0] for h in history[:100]])),
        "l1_last100": float(np.mean([h[0] for h in history[-100:]])),
    }


@torch.no_grad()
def fit_latent_scale(vae, views: dict, count: int = 256) -> float:
    """SD's recipe: scaling_factor = 1 / std of the latents, so the UNet sees unit variance."""
    latents = [
        vae.encode(model_batch(views["pixels"][i : i + 32])).latent_dist.mean
        for i in range(0, min(count, len(views["pixels"])), 32)
    ]
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def encode_views(pipe, views: dict, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of each target view, and of it with the mask area grey (the UNet's 9-channel input)."""
    targets, masked = [], []
    for i in range(0, len(views["pixels"]), batch):
        x = model_batch(views["pixels"][i : i + batch])
        keep = torch.from_numpy(~views["mask"][i : i + batch])[:, None].float()
        targets.append(pipe.encode(x))
        masked.append(pipe.encode(x * keep))
    return torch.cat(targets), torch.cat(masked)


def train_denoiser(pipe, views: dict, recipe: TinyRecipe) -> dict:
    """The UNet and both text encoders on the noise-prediction loss; EMA weights end up in `pipe`."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from .trainer import denoising_loss, encode_captions, micro_time_ids, stage_latent_mask

    latents, masked_latents = encode_views(pipe, views)
    log(f"encoded {len(latents)} views: latent std {latents.std():.3f}")
    masks = torch.from_numpy(views["mask"])[:, None].float()
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
        for group in optimizer.param_groups:
            group["lr"] = recipe.unet_lr * cosine_lr(step, recipe.unet_steps, recipe.unet_warmup)
        index = torch.from_numpy(rng.integers(0, len(latents), recipe.unet_batch))
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
    return {"loss_first100": float(np.mean(history[:100])), "loss_last100": float(np.mean(history[-100:]))}


def train_backbone(recipe: TinyRecipe) -> Path:
    """Steps 1-3: a trained tiny backbone as a diffusers folder in the work folder."""
    from ..backbone import build_tiny_components
    from ..pipeline import PatchAdapterPipeline

    folder = Path(recipe.work) / "backbone"
    if (folder / "model_index.json").is_file():
        log(f"backbone already trained: {folder}")
        return folder
    components = build_tiny_components(seed=recipe.seed)
    pipe = PatchAdapterPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    native = pipe.native_size
    start = time.time()
    views = make_views(recipe, native)
    log(f"{len(views['pixels'])} views in {time.time() - start:.0f} s")
    report = {}

    vae_file = Path(recipe.work) / "vae.pt"
    if vae_file.is_file():
        pipe.vae.load_state_dict(torch.load(vae_file))
        report["vae"] = json.loads((Path(recipe.work) / "vae.json").read_text())
    else:
        start = time.time()
        report["vae"] = train_vae(pipe.vae, views, recipe)
        report["vae"]["seconds"] = time.time() - start
        pipe.vae.register_to_config(scaling_factor=fit_latent_scale(pipe.vae, views))
        report["vae"]["scaling_factor"] = pipe.vae.config.scaling_factor
        torch.save(pipe.vae.state_dict(), vae_file)
        (Path(recipe.work) / "vae.json").write_text(json.dumps(report["vae"]))
    pipe.vae.register_to_config(scaling_factor=report["vae"]["scaling_factor"])
    pipe.vae.requires_grad_(False)

    start = time.time()
    report["denoiser"] = train_denoiser(pipe, views, recipe)
    report["denoiser"]["seconds"] = time.time() - start
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "recipe_report.json").write_text(json.dumps(report, indent=2))
    return folder


def train_adapters(recipe: TinyRecipe, backbone: Path) -> Path:
    """Step 4-5: DCA then RPA with the adapter trainer; both merged into one adapter file."""
    from safetensors.torch import load_file

    from ..adapters import BUNDLED_ADAPTER_FILE, install_adapters, save_adapter
    from ..backbone import load_backbone
    from .config import TrainConfig
    from .scene_views import export_scene_folder
    from .trainer import train

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
    for stage, weights in files.items():
        if not weights.is_file():
            settings = dict(common, stage=stage, output=str(weights.parent), **getattr(recipe, stage))
            if stage == "stage2":
                settings["dca"] = str(files["stage1"])
            log(f"{stage}: {train(TrainConfig(**settings))}")

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


def retrain_adapters(recipe: TinyRecipe, kinds=("rpa",)) -> Path:
    """Train adapters again on the backbone already in `recipe.output`, keeping the others.

    For a change of an adapter's design: the backbone (hours) stays, the named adapters
    train from their initial weights, the other ones are kept from the shipped file
    (read whatever its format version, since only the kept kinds are used).
    """
    import shutil

    from safetensors.torch import load_file

    from ..adapters import BUNDLED_ADAPTER_FILE, install_adapters, save_adapter
    from ..backbone import load_backbone
    from ..image_io import atomic_write

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
        log(f"kept the shipped {kind} in {target}")
    path = train_adapters(recipe, backbone)
    with open(path, "rb") as source, atomic_write(output / BUNDLED_ADAPTER_FILE) as target:
        shutil.copyfileobj(source, target)
    log(f"adapters in {output / BUNDLED_ADAPTER_FILE}")
    return output / BUNDLED_ADAPTER_FILE


def train_tiny(recipe: TinyRecipe) -> Path:
    """The whole recipe; copies the result into `recipe.output`."""
    import shutil

    start = time.time()
    backbone = train_backbone(recipe)
    train_adapters(recipe, backbone)
    output = Path(recipe.output)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(backbone, staging)
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    log(f"tiny backbone and adapters in {output} after {(time.time() - start) / 60:.1f} min")
    return output


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
    args = parser.parse_args(argv)
    retrain = args.__dict__.pop("retrain")
    recipe = TinyRecipe(**vars(args))
    torch.set_num_threads(recipe.threads)
    if retrain:
        retrain_adapters(recipe, ("dca", "rpa") if retrain == "adapters" else (retrain,))
    else:
        train_tiny(recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
