"""SDXL-size inference on a GPU: seconds per stage, peak memory, TFLOP/s, and the memory estimate.

Builds the full SDXL-inpainting architecture with random weights (no download: timing
and memory do not depend on the weights) and inpaints

- a 4096x4096 picture with a 25% mask (a centred square), 30 steps, guidance 7.5, with
  patch-adapter, two-stage, tiled and crop;
- an 8192x8192 picture with a 5% mask, with patch-adapter;

in fp16 and bf16. For each run it prints the seconds of stage 1, stage 2 and the
whole call, the peak CUDA memory against the plan's estimate, the UNet TFLOP counted
on the meta device and the achieved TFLOP/s against the device's dense peak.

    python benchmarks/sdxl_inference.py                       # everything above
    python benchmarks/sdxl_inference.py --dtypes bf16 --cases 4k --methods patch-adapter
    python benchmarks/sdxl_inference.py --channels-last --compile   # the speed options

Without CUDA it exits with status 2 and says so; `--estimate-only` needs no GPU: it
prints the memory estimate of each case (patch batch and bank placement chosen for
`--budget-gib`), traced on the meta device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

CASES = {"4k": (4096, 0.25, ("patch-adapter", "two-stage", "tiled", "crop")), "8k": (8192, 0.05, ("patch-adapter",))}
PEAK_TFLOPS = {  # dense fp16/bf16 tensor-core peak, per the vendors' data sheets
    "H200": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
    "RTX 6000 Ada": 364.0,
}


def device_peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def build_pipeline(dtype):
    import torch
    from diffusers import EulerDiscreteScheduler

    from patch_adapter import PatchAdapterPipeline
    from patch_adapter.backbone import build_sdxl_components
    from patch_adapter.tiny_world.tokenizer import tiny_tokenizer

    torch.manual_seed(0)
    components = build_sdxl_components(dtype, device="cuda")
    for model in components.values():  # random weights small enough to keep activations finite
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.02)
    tokenizer = tiny_tokenizer()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = PatchAdapterPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StageTimer:
    """Seconds spent in stage 1 and stage 2 of a call (CUDA synchronised at each boundary)."""

    def __init__(self, pipe):
        self.pipe, self.seconds = pipe, {"stage 1": 0.0, "stage 2": 0.0}

    @contextlib.contextmanager
    def wrapped(self):
        import torch

        originals = {"stage 1": self.pipe._stage1_at, "stage 2": self.pipe._refine_patches}

        def timed(name, fn):
            def run(*args, **kwargs):
                torch.cuda.synchronize()
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    torch.cuda.synchronize()
                    self.seconds[name] += time.perf_counter() - started

            return run

        self.pipe._stage1_at = timed("stage 1", originals["stage 1"])
        self.pipe._refine_patches = timed("stage 2", originals["stage 2"])
        try:
            yield self
        finally:
            del self.pipe._stage1_at, self.pipe._refine_patches


def counted_tflop(plan, dtype) -> float:
    """UNet TFLOP of a plan, counted with the SDXL architecture on the meta device (as scaling.py does)."""
    import torch

    from patch_adapter.adapters import ReferenceBank, install_adapters
    from patch_adapter.backbone import build_sdxl_components
    from scaling import unet_tflop

    unet = build_sdxl_components(dtype)["unet"]
    install_adapters(unet)
    total = 0.0
    if plan.stage1_size is not None:
        w, h = plan.stage1_size
        with torch.device("meta"):
            mask = torch.zeros(1, 1, h // 8, w // 8)
        total += plan.stage1_steps * unet_tflop(unet, (h // 8, w // 8), 2, {"dca_mask": mask})
    if plan.tiles:
        tile = (plan.tiles[0].height, plan.tiles[0].width)
        with torch.device("meta"):
            mask = torch.zeros(1, 1, *tile)
        bank = ReferenceBank()
        if plan.reference_passes:
            with bank.record():
                total += plan.reference_passes * unet_tflop(unet, tile, 1, {"rpa_bank": bank})
        per_step = unet_tflop(unet, tile, 2, {"dca_mask": mask, "rpa_bank": bank if bank.features else None})
        total += len(plan.tiles) * plan.stage2_steps * per_step
    return total


def run_case(pipe, side: int, area: float, method: str, steps: int, dtype_name: str, peak: float | None) -> dict:
    import numpy as np
    import torch

    image = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    mask = square_case(side, area)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    timer = StageTimer(pipe)
    with timer.wrapped():
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = pipe(
            prompt="a wooden bench",
            image=image,
            mask_image=mask,
            method=method,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
        )
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    assert np.array_equal(result.arrays[0][~mask], image[~mask]), "pixels outside the mask changed"
    plan = result.plan
    tflop = counted_tflop(plan, pipe.unet.dtype)
    unet_seconds = timer.seconds["stage 1"] + timer.seconds["stage 2"]
    row = {
        "image": f"{side}x{side}",
        "mask": f"{area:.0%}",
        "method": method,
        "dtype": dtype_name,
        "patches": len(plan.tiles),
        "seconds": seconds,
        "stage1_s": timer.seconds["stage 1"],
        "stage2_s": timer.seconds["stage 2"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "estimate_gib": plan.memory.peak / 2**30 if plan.memory is not None else None,
        "patch_batch": plan.memory.patch_batch_size if plan.memory is not None else None,
        "banks": plan.memory.bank_placement if plan.memory is not None else None,
        "tflop": tflop,
        "tflops": tflop / max(unet_seconds, 1e-9),
    }
    row["of_peak"] = row["tflops"] / peak if peak else None
    return row


def square_case(side: int, area: float):
    import numpy as np

    mask_side = int(round(side * area**0.5))
    mask = np.zeros((side, side), dtype=bool)
    start = (side - mask_side) // 2
    mask[start : start + mask_side, start : start + mask_side] = True
    return mask


def print_estimates(cases, methods, budget_gib: float, steps: int) -> None:
    """The plan's memory estimate per case on a CUDA device of `budget_gib`, without one."""
    import types

    import torch

    from patch_adapter.backbone import build_sdxl_components
    from patch_adapter.pipeline import choose_stage2_memory
    from patch_adapter.planning import make_plan
    from patch_adapter.settings import InpaintSettings

    backbone = types.SimpleNamespace(**build_sdxl_components(torch.float16), vae_scale_factor=8)
    from patch_adapter.adapters import install_adapters

    install_adapters(backbone.unet)
    print(f"memory estimates, SDXL-inpainting fp16 on a CUDA device with {budget_gib:g} GiB (traced on meta):")
    for case in cases:
        side, area, case_methods = CASES[case]
        for method in methods or case_methods:
            mask = square_case(side, area)
            plan = make_plan(
                InpaintSettings(
                    method=method, num_inference_steps=steps, refine_strength=0.6, tile_size=1024, tile_overlap=256
                ),
                (side, side),
                mask,
                1024,
            )
            plan.settings = plan.settings.replace(max_memory=int(budget_gib * 2**30))
            choose_stage2_memory(backbone, plan, "cuda")
            print(f"{side}x{side}, {area:.0%} mask, {method}, {len(plan.tiles)} patches: {plan.memory.describe()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--cases", default="4k,8k", help="comma list of 4k (25%% mask), 8k (5%% mask)")
    parser.add_argument("--methods", default=None, help="restrict the methods (default: each case's own)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--channels-last", action="store_true", help="the UNet in channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (a warm-up run compiles)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--estimate-only", action="store_true", help="print memory estimates; no GPU needed")
    parser.add_argument("--budget-gib", type=float, default=80.0, help="device memory for --estimate-only")
    args = parser.parse_args(argv)

    import torch

    if args.estimate_only:
        print_estimates(
            args.cases.split(","), args.methods.split(",") if args.methods else None, args.budget_gib, args.steps
        )
        return 0
    if not torch.cuda.is_available():
        print(
            "sdxl_inference.py needs a CUDA GPU: none is visible to torch here (torch.cuda.is_available() is "
            "False). Run it on a machine with one; `make bench` measures the CPU.",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = device_peak_tflops(name)
    print(
        f"device: {name} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), "
        f"dense peak {peak or 'unknown'} TFLOP/s; torch {torch.__version__}"
    )
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        pipe = build_pipeline(dtype)
        if args.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if args.compile:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")
        for case in args.cases.split(","):
            side, area, methods = CASES[case]
            for method in args.methods.split(",") if args.methods else methods:
                if args.compile:  # compile for this case's shapes outside the timing
                    run_case(pipe, side, area, method, 2, dtype_name, peak)
                row = run_case(pipe, side, area, method, args.steps, dtype_name, peak)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del pipe
        torch.cuda.empty_cache()
    print(
        "\n| image | mask | method | dtype | patches | s | stage 1 s | stage 2 s | peak GiB | estimate GiB "
        "| TFLOP | TFLOP/s | of peak |\n" + "| --- " * 13 + "|"
    )
    for r in rows:
        of_peak = f"{r['of_peak']:.0%}" if r["of_peak"] else "-"
        estimate = f"{r['estimate_gib']:.1f}" if r["estimate_gib"] is not None else "-"
        print(
            f"| {r['image']} | {r['mask']} | {r['method']} | {r['dtype']} | {r['patches']} | {r['seconds']:.1f} | "
            f"{r['stage1_s']:.1f} | {r['stage2_s']:.1f} | {r['peak_gib']:.1f} | {estimate} | {r['tflop']:.0f} | "
            f"{r['tflops']:.0f} | {of_peak} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
