"""Peak GPU memory and speed of one training step of each stage at SDXL's size.

Builds the SDXL-inpainting architecture with random weights (nothing is downloaded):
the UNet with SDXL-inpainting's config (9 input channels, blocks 320/640/1280,
transformer depths 1/2/10, cross-attention 2048, text-time embedding), the SDXL VAE,
and both text encoders at SDXL's sizes (CLIP ViT-L and OpenCLIP bigG widths and
depths, 49408-token embeddings). Their tokenizer is the tiny backbone's byte-level
one, since CLIP's vocabulary would need a download; tokenising is not what costs.
Random weights cost exactly what trained ones cost, so the figures hold for the
real model. A step is `trainer.training_loss` as training runs it (VAE encodes, text
encoding, the stage-2 reference pass, the UNet forward and backward through the
frozen backbone), then gradient clipping and AdamW on the adapter parameters.

    python benchmarks/train_sdxl_gpu.py                    # 1024 px, bf16, both stages, with/without checkpointing
    python benchmarks/train_sdxl_gpu.py --batch-size 2 --steps 5
    python benchmarks/train_sdxl_gpu.py --device cpu --resolution 128 --steps 1   # a functional check, ~4 min

Each case runs in its own process so that its peak memory is its own; a case that
runs out of memory is reported as failed and the others still run. Needs a CUDA GPU:
the frozen weights alone are 7 GB in bf16, the trainable adapter with its AdamW state
another 3.5-5 GB (205 M parameters for RPA, 307 M for DCA).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

SDXL_INPAINT_UNET = dict(
    sample_size=128,
    in_channels=9,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    norm_num_groups=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)


def build_pipeline(device, dtype):
    """PatchAdapterPipeline with SDXL-inpainting's architecture and random weights, built on `device`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from patch_adapter.pipeline import PatchAdapterPipeline
    from patch_adapter.tiny_world.architecture import tiny_configs
    from patch_adapter.tiny_world.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ids = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype: no fp32 copy of 3.5 B parameters
    try:
        with torch.device(device):
            torch.manual_seed(0)
            components = dict(
                unet=UNet2DConditionModel(**SDXL_INPAINT_UNET),
                vae=AutoencoderKL(**SDXL_VAE),
                text_encoder=CLIPTextModel(CLIPTextConfig(**ids, **CLIP_L)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_BIGG)),
            )
    finally:
        torch.set_default_dtype(default)
    pipe = PatchAdapterPipeline(
        **components,
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(**tiny_configs()["scheduler"]),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(stage: str, checkpointing: bool, args) -> dict:
    """Build, warm up with one step, time `args.steps` steps; returns the figures."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler

    from patch_adapter.adapters import adapter_parameters
    from patch_adapter.training.config import TrainConfig
    from patch_adapter.training.masks import boxes
    from patch_adapter.training.trainer import freeze_backbone, training_loss

    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    cuda = device.type == "cuda"
    pipe = build_pipeline(device, dtype)
    params = freeze_backbone(pipe, {"stage1": "dca", "stage2": "rpa"}[stage])
    for p in params:  # adapters train in fp32 under autocast, as the trainer does
        p.data = p.data.float()
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    config = TrainConfig(stage=stage)

    size, batch = args.resolution, args.batch_size
    generator = torch.Generator().manual_seed(0)
    mask = torch.stack(
        [torch.from_numpy(boxes(np.random.default_rng(i), size, size))[None] for i in range(batch)]
    ).float()
    inputs = {
        "pixels": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1,
        "mask": mask,
        "caption": ["a photo of a wooden bench in a park, soft evening light"] * batch,
        "reference": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1,
    }

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast():  # what accelerate's prepare() wraps the trained UNet's forward in
            loss = training_loss(pipe, pipe.unet, noise_scheduler, inputs, config, generator, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: kernels, allocator, optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    everything = sum(
        p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()
    )
    figures = {
        "stage": stage,
        "gradient_checkpointing": checkpointing,
        "s_per_step": seconds,
        "steps_per_s": 1 / seconds,
        "trainable_params": sum(p.numel() for p in params),
        "backbone_params": everything - sum(p.numel() for p in adapter_parameters(pipe.unet)),
    }
    if cuda:
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["device"] = torch.cuda.get_device_name()
    else:
        figures["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # RSS, KiB -> GiB
        figures["device"] = "cpu (peak = max RSS)"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a functional check")
    parser.add_argument("--resolution", type=int, default=1024, help="square training patch in px (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case, after one warm-up step")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the frozen backbone's dtype")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # "stage1:0": run one case in this process
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "train_sdxl_gpu.py: no CUDA device here. This benchmark measures GPU memory and speed at "
            "SDXL's size; run it on a machine with a GPU, or pass --device cpu --resolution 128 --steps 1 "
            "to check that it runs (slowly, about 12 GB of RAM)."
        )
    if args.resolution % 64:
        sys.exit("train_sdxl_gpu.py: --resolution must be a multiple of 64")

    if args.case:
        stage, checkpointing = args.case.split(":")
        print(json.dumps(run_case(stage, checkpointing == "1", args)))
        return

    rows = []
    for stage in ("stage1", "stage2"):
        for checkpointing in (False, True):
            command = [
                sys.executable,
                __file__,
                "--case",
                f"{stage}:{int(checkpointing)}",
                "--device",
                args.device,
                "--resolution",
                str(args.resolution),
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--dtype",
                args.dtype,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"stage": stage, "gradient_checkpointing": checkpointing, "error": last})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    device = next((r["device"] for r in rows if "device" in r), args.device)
    print(
        f"SDXL-inpainting architecture, random weights, {args.resolution}x{args.resolution}, batch "
        f"{args.batch_size}, backbone {args.dtype} (adapters fp32, autocast), AdamW; device: {device}"
    )
    print(f"{'stage':<8}{'grad ckpt':>10}{'s/step':>9}{'steps/s':>9}{'peak GiB':>10}{'trainable':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['stage']:<8}{'on' if r['gradient_checkpointing'] else 'off':>10}  failed: {r['error']}")
            continue
        print(
            f"{r['stage']:<8}{'on' if r['gradient_checkpointing'] else 'off':>10}{r['s_per_step']:>9.3f}"
            f"{r['steps_per_s']:>9.2f}{r['peak_gib']:>10.2f}{r['trainable_params'] / 1e6:>11.1f}M"
        )
    frozen = next((r["backbone_params"] for r in rows if "backbone_params" in r), 0)
    print(f"frozen backbone: {frozen / 1e9:.2f} B parameters (UNet, VAE, both text encoders)")


if __name__ == "__main__":
    main()
