"""The training loop of both adapters, on one CPU or many GPUs through accelerate.

Reads top to bottom like diffusers' ``train_text_to_image_sdxl.py``, split into
functions:

    train(config)
      1. accelerator, output folder, resolved config
      2. the frozen backbone; only the stage's adapter parameters train
      3. data: records, buckets, the deterministic batch stream
      4. optimizer, schedule, EMA (diffusers' EMAModel); accelerator.prepare
      5. resume: adapter weights, optimizer, schedule, RNG, data position
      6. the loop: loss, backward, step; log, checkpoint, validate
      7. export: <output>/dca.safetensors or rpa.safetensors, the summary

Loss (docs/method.md, "Training"): the backbone's noise-prediction MSE (epsilon for
SDXL-inpainting, v for a v-prediction backbone) with its 9-channel input [noisy
latents, mask, masked-image latents], random timesteps, the caption as prompt
(dropped at random for classifier-free guidance).
Stage 1: the Dual Context Adapter is on (``dca_mask``) and only its weights train.
Stage 2: the degraded reference crop is recorded by a frozen UNet pass into a
ReferenceBank, the Reference Patch Adapter attends to it, only its weights train;
a stage-1 DCA file (``dca``) stays frozen and, as in the pipeline's patches, off
(``dca_scale`` 0: it halved the fills' sharpness there); it is loaded to export both
adapters in one file.

Train as the pipeline infers: the mask reaches the latent grid as the pipeline
sends it there (stage 1: diffusers' nearest resize; stage 2: any coverage counts),
the masked image is grey under the mask, and the SDXL time ids are the pipeline's.

Randomness: every random draw of a micro-batch comes from a seed made of (seed,
micro-batch number, process index), never from a carried stream, so resuming at a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import ReferenceBank
from ..image_io import atomic_write, save_image
from ..masks import latent_mask_tensor
from .config import TrainConfig
from .data import BatchStream, TrainingData, collate, group_by_bucket, sample_seed, scan_dataset

EXPORT_NAMES = {"stage1": "dca.safetensors", "stage2": "rpa.safetensors"}
COMBINED_NAME = "patch_adapter.safetensors"  # stage 2 with --dca: both adapters in one file
ADAPTER_KIND = {"stage1": "dca", "stage2": "rpa"}
CHECKPOINT_WEIGHTS = "adapter.safetensors"


@dataclass
class TrainResult:
    output: Path
    weights: Path  # the exported adapter file
    steps: int
    losses: list = field(default_factory=list)  # mean loss of every optimizer step of this run
    skipped: list = field(default_factory=list)  # images left out or replaced because they could not be read
    too_small: list = field(default_factory=list)  # stage 2: images under the minimum side
    pipeline: object = None  # the PatchAdapterPipeline holding the trained (not EMA) adapter, for inspection


# --------------------------------------------------------------------------- state


class TrainState:
    """What accelerate's checkpoint needs beyond weights, optimizer, schedule and RNG."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.data_position = 0  # micro-batches this process has consumed
        self.skipped: set = set()  # keys of images that failed to decode so far

    def state_dict(self) -> dict:
        return {"step": self.step, "data_position": self.data_position, "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.skipped = set(state["skipped"])


@contextmanager
def ema_weights(ema, params):
    """Within this block `params` hold the EMA weights (diffusers' `EMAModel`); unchanged without EMA."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


@contextmanager
def quiet_libraries():
    """diffusers and transformers at error level while training, restored after.

    Their warnings repeat every step (CLIP truncating captions over 77 tokens, as
    SDXL was trained, is expected here) and would bury the progress bar.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])


# --------------------------------------------------------------------------- pieces


def trackers(config: TrainConfig):
    """accelerate `log_with`: TensorBoard when asked for, or 'auto' and installed."""
    if config.report_to == "auto":
        found = any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))
        return "tensorboard" if found else None
    return None if config.report_to == "none" else config.report_to


def freeze_backbone(pipe, kind: str) -> list[torch.nn.Parameter]:
    """Everything frozen, then the `kind` adapter's parameters trainable; returns those."""
    from ..adapters import adapter_parameters

    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
    params = adapter_parameters(pipe.unet, [kind])
    for p in params:
        p.requires_grad_(True)
    return params


def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 77, D) token features and (B, P) pooled embeddings of the captions.

    Differentiable: the tiny backbone's recipe trains its text encoders through it.

    An empty caption (dropped for classifier-free guidance) becomes zeros, which is
    what the pipeline uses for its unconditional half (force_zeros_for_empty_prompt).
    """
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(captions), device=pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    empty = torch.tensor([c == "" for c in captions], device=embeds.device)
    embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
    pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return embeds, pooled


def stage_latent_mask(mask: torch.Tensor, stage: str, factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, H/f, W/f), as the pipeline builds it for that stage.

    Stage 1 runs diffusers' `prepare_mask_latents` (nearest resize); stage 2's
    patches count a latent as masked if any pixel under it is (`masks.latent_mask_tensor`).
    """
    if stage == "stage1":
        return F.interpolate(mask, size=(mask.shape[-2] // factor, mask.shape[-1] // factor))
    return latent_mask_tensor(mask, factor)


def micro_time_ids(pipe, batch_size: int, height: int, width: int, embeds, pooled) -> torch.Tensor:
    """SDXL micro-conditioning of `batch_size` uncropped (height, width) pictures: `pipe.time_ids`, as stage 2 uses it."""
    from ..pipeline import Conditioning

    return pipe.time_ids(height, width, Conditioning(embeds[:1], pooled[:1], 1.0)).expand(batch_size, -1)


def training_loss(
    pipe, unet, noise_scheduler, batch, config: TrainConfig, generator: torch.Generator, autocast=nullcontext
) -> torch.Tensor:
    """The noise-prediction loss of one micro-batch; `unet` is the (possibly wrapped) trained UNet."""
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    pixels = batch["pixels"].to(device)  # (B, 3, H, W) in [-1, 1]
    mask = batch["mask"].to(device)  # (B, 1, H, W), 1 = fill
    bsz, _, height, width = pixels.shape

    with torch.no_grad(), autocast():
        latents = pipe.encode(pixels)  # (B, 4, H/8, W/8), scaled
        masked_latents = pipe.encode(pixels * (mask < 0.5))  # grey under the mask, as the pipeline builds it
        mask_latents = stage_latent_mask(mask, config.stage, pipe.vae_scale_factor).to(latents.dtype)  # (B, 1, h, w)
        embeds, pooled = encode_captions(pipe, batch["caption"])
        time_ids = micro_time_ids(pipe, bsz, height, width, embeds, pooled)

    attention_kwargs = {"dca_mask": mask_latents, "dca_scale": 1.0}
    if config.stage == "stage2":
        with torch.no_grad(), autocast():
            reference_latents = pipe.encode(batch["reference"].to(device))
            bank = ReferenceBank.recorded(
                pipe.unet,
                reference_latents,
                config.reference_timestep,
                embeds,
                {"text_embeds": pooled, "time_ids": time_ids},
            )
        attention_kwargs = {"dca_mask": mask_latents, "dca_scale": config.dca_scale, "rpa_bank": bank, "rpa_scale": 1.0}
    return denoising_loss(
        unet,
        noise_scheduler,
        latents,
        mask_latents,
        masked_latents,
        embeds,
        pooled,
        time_ids,
        attention_kwargs,
        generator,
        dtype,
        mask_weight=config.mask_weight,
        max_timestep=config.max_timestep or None,
        detail_weight=config.detail_weight,
    )


def predict_noise(
    unet, noisy, mask_latents, masked_latents, timesteps, embeds, pooled, time_ids, attention_kwargs: dict
) -> torch.Tensor:
    """The inpainting UNet's prediction for noisy latents: its 9-channel input (noisy, mask, masked picture)."""
    model_input = torch.cat([noisy, mask_latents, masked_latents], dim=1).to(noisy.dtype)  # (B, 9, h, w)
    return unet(
        model_input,
        timesteps,
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        cross_attention_kwargs=attention_kwargs,
        return_dict=False,
    )[0]


def denoising_loss(
    unet,
    noise_scheduler,
    latents,
    mask_latents,
    masked_latents,
    embeds,
    pooled,
    time_ids,
    attention_kwargs: dict,
    generator: torch.Generator,
    dtype: torch.dtype,
    snr_gamma: float | None = None,
    mask_weight: float = 0.0,
    max_timestep: int | None = None,
    detail_weight: float = 0.0,
) -> torch.Tensor:
    """The backbone's loss on clean latents: noise them at random timesteps, predict, MSE to the target.

    Shared by the adapter trainer and the tiny world's recipe, which trains the UNet itself.
    `snr_gamma` weights each sample by min(SNR, gamma) / SNR (Hang et al. 2023, "Min-SNR"),
    for epsilon prediction: the nearly clean timesteps, which teach little, stop dominating.
    `mask_weight` adds that many times the sample's mean error inside its mask: outside
    the mask the answer can be copied from the masked latents, and a small model trained
    on the whole-picture mean spends its few steps learning the copy, not the fill.
    `max_timestep` draws the timesteps from [0, max_timestep) instead of the whole schedule.
    `detail_weight` adds that many times `detail_error`: the MSE rewards the mean of the
    fills that fit, a blur for a weak model; this term asks for the truth's amount of detail.
    """
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    highest = noise_scheduler.config.num_train_timesteps
    if max_timestep is not None:
        if not 0 < max_timestep <= highest:
            raise ValueError(f"max_timestep must be in [1, {highest}], got {max_timestep}")
        highest = max_timestep
    timesteps = torch.randint(0, highest, (latents.shape[0],), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:  # epsilon, as SDXL-inpainting
        target = noise
    prediction = predict_noise(
        unet, noisy.to(dtype), mask_latents, masked_latents, timesteps, embeds, pooled, time_ids, attention_kwargs
    )
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = error.mean(dim=(1, 2, 3))
    if detail_weight:
        per_sample = per_sample + detail_weight * detail_error(
            noise_scheduler, noisy, prediction, latents, timesteps, mask_latents
        )
    if mask_weight:
        per_sample = per_sample + mask_weight * mean_inside(error, mask_latents)
    if snr_gamma is None:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    return (per_sample * weight.float()).mean()


def mean_inside(values: torch.Tensor, mask_latents: torch.Tensor) -> torch.Tensor:
    """Per sample: the mean of `values` over the latent mask (0 for a sample without one)."""
    inside = mask_latents.float().expand_as(values)
    return (values * inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3)).clamp_min(1)


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """What a 3x3 box blur removes: the latents' finest detail."""
    return x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def detail_error(noise_scheduler, noisy, prediction, latents, timesteps, mask_latents) -> torch.Tensor:
    """Per sample: how far the predicted clean latents' detail magnitude is from the truth's, inside the mask.

    Magnitudes, not values: a fill whose grain is where the truth's is not is not
    penalised, a flat one is. Weighted by alpha_bar, so the noisy timesteps, whose
    clean-latent estimate is a blur by necessity, count little.
    """
    alpha_bar = noise_scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    if noise_scheduler.config.prediction_type == "v_prediction":
        clean = alpha_bar.sqrt() * noisy.float() - (1 - alpha_bar).sqrt() * prediction.float()
    else:
        clean = (noisy.float() - (1 - alpha_bar).sqrt() * prediction.float()) / alpha_bar.sqrt()
    gap = (high_pass(clean).abs() - high_pass(latents.float()).abs()) ** 2 * alpha_bar
    return mean_inside(gap, mask_latents)


def find_checkpoint(output: Path, resume: str) -> Path | None:
    """'latest' -> the highest checkpoint-N in `output` (None if there is none); else the path given."""
    if resume != "latest":
        path = Path(resume)
        if not (path / CHECKPOINT_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a training checkpoint (no {CHECKPOINT_WEIGHTS})")
        return path
    found = sorted(
        (
            p
            for p in output.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / CHECKPOINT_WEIGHTS).is_file()
        ),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return found[-1] if found else None


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete the oldest checkpoint-N folders so that `keep` - 1 remain (room for the next)."""
    if keep <= 0:
        return
    found = sorted(
        (p for p in output.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in found[: max(0, len(found) - keep + 1)]:
        shutil.rmtree(old, ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """After a resume at `step`, drop log lines of the steps that will run again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in lines).encode())


def validation_inputs(dataset: TrainingData, config: TrainConfig, native: int):
    """A fixed image, mask and prompt: the first readable record (stage 1 at native size, stage 2 full size)."""
    from ..planning import native_dims
    from .masks import boxes

    image, record, _ = dataset.load(0)
    image = np.asarray(image)
    if config.stage == "stage1":
        import PIL.Image

        w, h = native_dims(image.shape[1], image.shape[0], config.resolution or native)
        image = np.asarray(PIL.Image.fromarray(image).resize((w, h), PIL.Image.Resampling.LANCZOS))
    mask = boxes(np.random.default_rng([config.seed, 17]), image.shape[0], image.shape[1])
    return image, mask, config.validation_prompt or record.caption or ""


@torch.no_grad()
def validate(pipe, config: TrainConfig, inputs, step: int, output: Path) -> np.ndarray:
    """Inpaint the validation image with the adapters being trained; write [input | result] as PNG.

    Returns the panel (H, 2W, 3) uint8 for the trackers.
    """
    image, mask, prompt = inputs
    was_training = pipe.unet.training
    pipe.unet.eval()
    try:
        result = pipe(
            prompt=prompt,
            image=image,
            mask_image=mask,
            num_inference_steps=config.validation_inference_steps,
            generator=torch.Generator().manual_seed(config.seed),
        ).images[0]
    finally:
        pipe.unet.train(was_training)
    shown = image.copy()
    shown[mask] = 127
    panel = np.concatenate([shown, np.asarray(result.convert("RGB"))], axis=1)
    save_image(output / "validation" / f"step-{step:07d}.png", panel)
    return panel


# --------------------------------------------------------------------------- train


@quiet_libraries()
def train(config: TrainConfig) -> TrainResult:
    """Train the adapter of `config.stage`; returns where the weights went and what happened."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file
    from safetensors.torch import save as safetensors_bytes
    from tqdm.auto import tqdm

    from ..adapters import adapter_state_dict, load_adapter, save_adapter
    from ..backbone import load_backbone, native_size
    from ..pipeline import PatchAdapterPipeline

    config.validate()
    if not config.data:
        raise ValueError("no training data: pass --data DIR (an imagefolder, a .tar shard or a folder of shards)")
    kind = ADAPTER_KIND[config.stage]
    output = Path(config.output)

    # 1. Accelerator: devices, processes, mixed precision, accumulation, trackers
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=trackers(config),
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:  # each process would train alone and overwrite the others' files
        raise ValueError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: "
            "on CPUs, set ACCELERATE_USE_CPU=true (see docs/training.md)"
        )
    set_seed(config.seed)  # only model construction could use it; every training draw is seeded explicitly
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        config.save(output / "config.yaml")
    if torch.cuda.is_available() and config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 2. The frozen backbone with both adapters installed; only this stage's adapter trains
    pipe = PatchAdapterPipeline(**load_backbone(config.model))
    pipe.backbone_name = config.model
    pipe.set_progress_bar_config(disable=True)
    if config.stage == "stage2" and config.dca:
        load_adapter(config.dca, pipe.unet)
    params = freeze_backbone(pipe, kind)
    pipe.to(accelerator.device, weight_dtype)
    for p in params:  # adapters train in fp32 under autocast, as diffusers' LoRA scripts do
        p.data = p.data.float()
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    native = native_size(pipe.unet, pipe.vae_scale_factor)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    grid = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # the UNet halves its grid
    if config.bucket_step % grid:
        raise ValueError(f"bucket_step must be a multiple of {grid} px for this backbone, got {config.bucket_step}")

    # 3. Data
    min_side = (config.stage2_min_side or 2 * native) if config.stage == "stage2" else 0
    report = scan_dataset(config.data, min_side=min_side)
    if not report.records:
        raise ValueError(
            f"no usable images in {config.data}: {len(report.unreadable)} unreadable, "
            f"{len(report.too_small)} too small (stage 2 needs a shorter side of at least {min_side} px)"
        )
    groups, _ = group_by_bucket(report.records, config, native)
    dataset = TrainingData(report.records, config, native)

    # 4. Optimizer (adapter parameters only), schedule, EMA
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    # accelerate steps a prepared schedule once per process: count in those units, as diffusers' scripts do
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay > 0 else None
    state = TrainState()
    unet, optimizer, lr_scheduler = accelerator.prepare(pipe.unet, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # checkpoints hold only the adapter being trained (plus accelerate's optimizer/schedule/RNG files)
    def save_model_hook(models, weights, folder):
        if accelerator.is_main_process:
            state_dict = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(pipe.unet, [kind]).items()}
            with atomic_write(Path(folder) / CHECKPOINT_WEIGHTS) as f:
                f.write(safetensors_bytes(state_dict))
        weights.clear()

    def load_model_hook(models, folder):
        saved = load_file(str(Path(folder) / CHECKPOINT_WEIGHTS))
        with torch.no_grad():
            for key, value in adapter_state_dict(pipe.unet, [kind]).items():
                value.copy_(saved[key])
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # 5. Resume
    log_path = output / "train_log.jsonl"
    if config.resume:
        checkpoint = find_checkpoint(output, config.resume)
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {output} to resume from; starting fresh")
        else:
            accelerator.load_state(str(checkpoint))
            if ema is not None:  # its shadow weights come back on the CPU
                ema.to(accelerator.device)
            accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    if accelerator.is_main_process:
        truncate_log(log_path, state.step) if config.resume else log_path.unlink(missing_ok=True)
    if accelerator.log_with:
        accelerator.init_trackers(
            "patch-adapter",
            config={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()},
        )
    stream = BatchStream(
        groups,
        config.batch_size,
        config.seed,
        accelerator.num_processes,
        accelerator.process_index,
        start=state.data_position,
        repeat=config.overfit_batches,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=stream,
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
        persistent_workers=config.dataloader_num_workers > 0,
    )
    validation = validation_inputs(dataset, config, native) if accelerator.is_main_process else None

    # 6. The loop
    progress = tqdm(
        total=config.max_steps,
        initial=state.step,
        desc=f"train {config.stage}",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    losses, step_losses = [], []
    tick, tick_step = time.perf_counter(), state.step
    unet.train()
    data = iter(loader)
    while state.step < config.max_steps:
        batch = next(data)
        state.skipped.update(batch["skipped"])
        position = state.data_position % config.overfit_batches if config.overfit_batches else state.data_position
        generator = torch.Generator().manual_seed(sample_seed(config.seed, 13, position, accelerator.process_index))
        with accelerator.accumulate(unet):
            loss = training_loss(pipe, unet, noise_scheduler, batch, config, generator, accelerator.autocast)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state.data_position += 1
        step_losses.append(loss.detach())
        if not accelerator.sync_gradients:
            continue

        state.step += 1
        if ema is not None:
            ema.step(params)
        step_loss = accelerator.gather(torch.stack(step_losses).mean()[None]).mean().item()
        step_losses = []
        losses.append(step_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")

        if state.step % config.log_steps == 0 or state.step == config.max_steps:
            now = time.perf_counter()
            rate = (state.step - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, state.step
            record = {
                "step": state.step,
                "loss": step_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "steps_per_s": round(rate, 4),
            }
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)

        if state.step % config.checkpointing_steps == 0 or state.step == config.max_steps:
            # every process's skipped images, so that a resume reports them all
            state.skipped = set().union(*gather_object([sorted(state.skipped)]))
            if accelerator.is_main_process:
                prune_checkpoints(output, config.checkpoints_total_limit)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(output / f"checkpoint-{state.step}"))

        if (
            accelerator.is_main_process
            and config.validation_steps >= 0
            and (
                (config.validation_steps and state.step % config.validation_steps == 0)
                or state.step == config.max_steps
            )
        ):
            with ema_weights(ema, params), accelerator.autocast():
                panel = validate(pipe, config, validation, state.step, output)
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_image("validation", panel, state.step, dataformats="HWC")
    progress.close()

    # 7. Export (the EMA weights when EMA is on), report
    accelerator.wait_for_everyone()
    skipped = sorted(set().union(*gather_object([sorted(state.skipped)])) | set(report.unreadable))
    weights = output / EXPORT_NAMES[config.stage]
    if accelerator.is_main_process:
        with ema_weights(ema, params):
            save_adapter(weights, pipe.unet, kinds=(kind,), backbone_name=config.model)
            if config.stage == "stage2" and config.dca:
                save_adapter(output / COMBINED_NAME, pipe.unet, kinds=("dca", "rpa"), backbone_name=config.model)
        summary = {
            "stage": config.stage,
            "steps": state.step,
            "weights": str(weights),
            "final_loss": losses[-1] if losses else None,
            "images": len(report.records),
            "skipped_unreadable": len(skipped),
            "skipped_files": skipped,
            "too_small_for_stage2": len(report.too_small),
            "missing_captions": report.missing_captions,
        }
        with atomic_write(output / "train_summary.json") as f:
            f.write(json.dumps(summary, indent=2).encode())
        if skipped:
            accelerator.print(
                f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}"
                + (" ..." if len(skipped) > 5 else "")
            )
        if report.too_small:
            accelerator.print(f"left out {len(report.too_small)} image(s) smaller than {min_side} px (stage 2)")
        accelerator.print(f"wrote {weights}")
    # the DDP wrapper must go before its process group does: freed after it, a process can hang
    # at exit (seen in about one run in eight with two CPU processes on gloo)
    accelerator.wait_for_everyone()
    del unet, optimizer, lr_scheduler
    accelerator.free_memory()
    accelerator.end_training()
    return TrainResult(
        output=output,
        weights=weights,
        steps=state.step,
        losses=losses,
        skipped=skipped,
        too_small=list(report.too_small),
        pipeline=pipe,
    )
