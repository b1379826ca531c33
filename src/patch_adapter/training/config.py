"""Training configuration: plain data with a comment on every default.

A run is described by one `TrainConfig`. It is built from the defaults below, then
a YAML or TOML file, then the command-line flags (each layer overrides the one
before), and the resolved result is written next to the weights (`config.yaml`).

A config file is flat (``learning_rate: 1e-4``); it may also hold ``stage1:`` and
``stage2:`` tables whose keys apply only to that stage, so that one file can
describe both stages. Unknown keys raise, with the key named.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("stage1", "stage2")
MASK_KINDS = ("brush", "box", "large", "border", "object")


def default_mask_mix() -> dict:
    # Relative weights of the mask generator's kinds (normalised when drawn).
    # "object" uses the dataset's object masks where it has them and an
    # object-shaped random blob otherwise.
    return {"brush": 0.3, "box": 0.2, "large": 0.2, "border": 0.1, "object": 0.2}


@dataclass
class TrainConfig:
    # --- what to train, on what, where (also command-line flags)
    stage: str = "stage1"  # stage1 trains the Dual Context Adapter, stage2 the Reference Patch Adapter
    model: str = "tiny"  # backbone: "tiny", a diffusers folder, a single-file checkpoint or a hub id
    data: str = ""  # imagefolder (metadata.jsonl or sidecar .txt captions), a .tar shard, or a folder of shards
    output: str = "output"  # weights, config.yaml, train_log.jsonl, checkpoints and validation images go here
    max_steps: int = 1000  # optimizer steps (a step is batch_size * accumulation * processes images)
    seed: int = 0  # every random choice (data order, masks, crops, noise, timesteps) derives from it
    resume: str | None = None  # "latest" or a checkpoint-N folder; None starts fresh
    dca: str | None = None  # stage 2 only: a trained stage-1 file (dca.safetensors), loaded and kept frozen

    # --- optimisation
    batch_size: int = 1  # images per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-4  # AdamW learning rate after warm-up (adapters are small: 1e-4 is the usual)
    lr_scheduler: str = "constant_with_warmup"  # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 100  # linear warm-up, in optimizer steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    overfit_batches: int = 0  # debugging: repeat the first N micro-batches (images, masks, noise, timesteps); 0 = off
    ema_decay: float = 0.0  # EMA of the adapter weights (0 = off; 0.999 is typical); exported weights are the EMA
    # extra weight of the error inside the mask (`trainer.denoising_loss`); 0 = the whole-latent MSE only
    mask_weight: float = 0.0
    # timesteps drawn from [0, max_timestep) (0 = the scheduler's whole range). Stage 2's patches start at
    # refine_strength x 1000 (600 by default), so the RPA never meets the noisier ones at inference
    max_timestep: int = 0
    # weight of the detail term (`trainer.detail_error`: the predicted clean latents' high-frequency magnitude
    # against the truth's, inside the mask); 0 = off
    detail_weight: float = 0.0

    # --- memory and speed
    mixed_precision: str = "no"  # no, fp16 or bf16: the frozen backbone is cast to it, adapters train in fp32
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: much less memory, ~30% slower
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    dataloader_num_workers: int = 2  # data loading processes per training process (0 = in the main process)

    # --- data
    resolution: int = 0  # stage 1: pixel count of the buckets as a side (0 = the backbone's native size)
    bucket_step: int = 0  # stage 1: bucket sides are multiples of this (0 = native / 16, at least 32)
    max_aspect: float = 2.0  # stage 1: widest bucket's aspect ratio (and its inverse)
    random_flip: bool = True  # horizontal flips (masks flip with the image)
    caption_dropout: float = 0.1  # share of empty prompts, so classifier-free guidance keeps working
    stage2_min_side: int = 0  # stage 2: images whose shorter side is below this are skipped (0 = 2 x native)

    # --- masks
    mask_mix: dict = field(default_factory=default_mask_mix)  # weights of brush/box/large/border/object masks

    # --- stage 2 references (docs/method.md: downscale to native, upscale back, same crop, degraded)
    reference_blur: float = 0.5  # probability of a Gaussian blur of the reference
    reference_blur_sigma: float = 1.5  # largest blur sigma in pixels
    reference_color: float = 0.5  # probability of a colour shift
    reference_color_strength: float = 0.05  # largest per-channel gain/offset change
    reference_shift: float = 0.5  # probability of a small misalignment
    reference_shift_pixels: int = 4  # largest misalignment in pixels (each axis)
    reference_timestep: int = 1  # timestep of the frozen pass that records the reference tokens (as at inference)
    # stage 2: strength of the frozen DCA during training (when --dca is given); 0 as the pipeline, whose
    # patches run without the DCA (docs/method.md)
    dca_scale: float = 0.0

    # --- feedback and checkpoints
    log_steps: int = 1  # a train_log.jsonl line every this many steps
    checkpointing_steps: int = 500  # a checkpoint-N folder every this many steps (and at the end)
    checkpoints_total_limit: int = 3  # older checkpoint folders are deleted (0 = keep all)
    validation_steps: int = 0  # validation inpaintings every this many steps (0 = only at the end, -1 = never)
    validation_prompt: str = ""  # prompt of the validation inpaint ("" = the first image's caption)
    validation_inference_steps: int = 20  # denoising steps of the validation inpaint
    report_to: str = "auto"  # "auto" (TensorBoard when installed), "tensorboard", "wandb" or "none"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        unknown = set(self.mask_mix) - set(MASK_KINDS)
        if unknown:
            raise ValueError(
                f"unknown mask kind(s) in mask_mix: {', '.join(sorted(unknown))} (known: {', '.join(MASK_KINDS)})"
            )
        if not any(float(v) > 0 for v in self.mask_mix.values()) or any(float(v) < 0 for v in self.mask_mix.values()):
            raise ValueError("mask_mix needs non-negative weights, at least one of them positive")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_steps", "checkpointing_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        for name in ("mask_weight", "detail_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in (
            "lr_warmup_steps",
            "checkpoints_total_limit",
            "dataloader_num_workers",
            "overfit_batches",
            "resolution",
            "bucket_step",
            "stage2_min_side",
            "reference_shift_pixels",
            "max_timestep",
        ):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} cannot be negative, got {getattr(self, name)}")
        for name in ("reference_blur", "reference_color", "reference_shift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.validation_steps < -1:
            raise ValueError(
                f"validation_steps must be -1 (never), 0 (at the end) or a step count, got {self.validation_steps}"
            )
        if self.report_to not in ("auto", "tensorboard", "wandb", "none"):
            raise ValueError(f"report_to must be auto, tensorboard, wandb or none, not {self.report_to!r}")
        if self.dca and self.stage != "stage2":
            raise ValueError("dca (a trained stage-1 file kept frozen) is for stage2 only")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> Path:
        """Write the resolved config as YAML (readable back with `load_config`)."""
        import yaml

        from ..image_io import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(yaml.safe_dump(self.to_dict(), sort_keys=False).encode())
        return path


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path) -> dict:
    """A YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        data = tomllib.loads(text)
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return data


def _coerce(name: str, value):
    """Check a file value against the field's default type (ints accepted for floats)."""
    default = TrainConfig.__dataclass_fields__[name]
    if name == "mask_mix":
        if not isinstance(value, dict):
            raise ValueError(f"config key mask_mix must be a mapping of mask kind to weight, got {value!r}")
        mix = {k: 0.0 for k in MASK_KINDS}
        mix.update({str(k): float(v) for k, v in value.items()})
        return mix
    kind = type(default.default) if default.default is not dataclasses.MISSING else None
    if value is None or kind is None or isinstance(default.default, type(None)):
        return value
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"config key {name} must be true or false, got {value!r}")
    if kind is not bool and isinstance(value, bool):
        raise ValueError(f"config key {name} must be a {kind.__name__}, got {value!r}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind):
        raise ValueError(f"config key {name} must be a {kind.__name__}, got {value!r}")
    return value


def resolve_config(stage: str, file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the file (its flat keys, then its `stage:` table), then `overrides`.

    `overrides` with value None are ignored (flags the user did not give).
    """
    values: dict = {}
    if file:
        data = read_config_file(file)
        tables = {s: data.pop(s) for s in STAGES if s in data}
        for s, table in tables.items():
            if not isinstance(table, dict):
                raise ValueError(f"config key {s} must be a table of keys for that stage")
        for where, keys in [(file, data)] + [(f"{file} [{s}]", t) for s, t in tables.items()]:
            unknown = sorted(set(keys) - set(FIELDS) - {"stage"})
            if unknown:  # the other stage's table too: a typo there would wait for the next run
                raise ValueError(f"unknown config key(s) in {where}: {', '.join(unknown)}")
        values.update(data)
        values.update(tables.get(stage, {}))
        values = {k: _coerce(k, v) for k, v in values.items() if k != "stage"}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["stage"] = stage
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    return TrainConfig(**values)


def load_config(path) -> TrainConfig:
    """A resolved config written by `TrainConfig.save` (all keys present)."""
    data = read_config_file(path)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) in {path}: {', '.join(unknown)}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in data.items()})
