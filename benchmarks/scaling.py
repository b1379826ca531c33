"""How the cost of an inpaint scales with the image size and the mask area.

Prints two tables (time and peak memory on this machine's CPU, tiny backbone) and the
UNet TFLOPs of one 4K inpaint with the full SDXL-inpainting architecture, counted on
the meta device (no weights needed):

    python benchmarks/scaling.py              # everything (about 10-15 minutes on 2 cores)
    python benchmarks/scaling.py --quick      # fewer steps, no 50% mask (about 2 minutes)
    python benchmarks/scaling.py --flops-only

Each timed case runs in its own process, so peak memory (max RSS) is that case's
alone. Times include loading the image into the pipeline and compositing, not the
model load.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

SIZES = {"1K": 1024, "2K": 2048, "4K": 4096, "8K": 8192}
AREAS = (0.01, 0.10, 0.50)
METHODS = ("patch-adapter", "tiled")


def square_mask(side: int, mask_side: int, seed: int = 0):
    """A mask_side x mask_side square at a fixed place (away from the borders), as a bool array."""
    import numpy as np

    mask = np.zeros((side, side), dtype=bool)
    top = left = min(side // 3, side - mask_side)
    mask[top : top + mask_side, left : left + mask_side] = True
    return mask


def run_case(method: str, side: int, mask_side: int, steps: int) -> dict:
    """One inpaint in this process; returns seconds, UNet forwards and peak RSS."""
    import numpy as np
    import torch

    from patch_adapter import PatchAdapterPipeline

    torch.manual_seed(0)
    pipe = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    mask = square_mask(side, mask_side)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = pipe(
        prompt="a wooden bench",
        image=image,
        mask_image=mask,
        method=method,
        num_inference_steps=steps,
        refine_steps=steps,
        refine_strength=0.6,
        generator=torch.Generator().manual_seed(0),
    )
    seconds = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before the check below copies the image
    assert np.array_equal(result.arrays[0][~mask], image[~mask])
    return {
        "seconds": seconds,
        "unet_forwards": result.plan.unet_forwards,
        "patches": len(result.plan.tiles),
        "peak_rss_mb": peak_rss / 1024,
        "rss_before_mb": loaded_rss / 1024,
    }


def timed_in_subprocess(method: str, side: int, mask_side: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps([method, side, mask_side, steps])],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"case {method} {side} {mask_side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sdxl_inpaint_unet_config() -> dict:
    from patch_adapter.backbone import sdxl_inpaint_configs

    return sdxl_inpaint_configs()["unet"]


def unet_tflop(unet, latent_hw, batch: int, attention_kwargs=None) -> float:
    """TFLOPs of one UNet forward on meta tensors (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = latent_hw
    with torch.device("meta"):
        sample = torch.zeros(batch, 9, h, w)
        text = torch.zeros(batch, 77, 2048)
        added = {"text_embeds": torch.zeros(batch, 1280), "time_ids": torch.zeros(batch, 6)}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, 999, text, added_cond_kwargs=added, cross_attention_kwargs=attention_kwargs)
    return counter.get_total_flops() / 1e12


def sdxl_flops(side: int = 4096, mask_side: int = 1024, steps: int = 30, refine_strength: float = 0.6) -> list[dict]:
    """UNet TFLOPs of one side x side inpaint per method, with SDXL-inpainting's architecture."""
    import torch
    from diffusers import UNet2DConditionModel

    from patch_adapter.adapters import ReferenceBank, install_adapters
    from patch_adapter.planning import make_plan
    from patch_adapter.settings import InpaintSettings

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_inpaint_unet_config())
    plain = {
        "native (1024^2)": unet_tflop(unet, (128, 128), batch=2),
        f"full size ({side}^2)": unet_tflop(unet, (side // 8, side // 8), batch=2),
    }
    install_adapters(unet)
    with torch.device("meta"):
        dca_mask = torch.zeros(1, 1, 128, 128)
    with_dca = unet_tflop(unet, (128, 128), batch=2, attention_kwargs={"dca_mask": dca_mask})
    bank = ReferenceBank()
    with bank.record():
        reference_pass = unet_tflop(unet, (128, 128), batch=1, attention_kwargs={"rpa_bank": bank})
    with_rpa = unet_tflop(unet, (128, 128), batch=2, attention_kwargs={"rpa_bank": bank})  # stage 2: no DCA

    mask = square_mask(side, mask_side)
    rows = []
    for method in ("direct", "resize", "crop", "tiled", "two-stage", "patch-adapter"):
        plan = make_plan(
            InpaintSettings(
                method=method,
                num_inference_steps=steps,
                refine_strength=refine_strength,
                tile_size=1024,
                tile_overlap=256,
            ),
            (side, side),
            mask,
            1024,
        )
        native = plain["native (1024^2)"]
        if method == "direct":
            total = plan.stage1_steps * plain[f"full size ({side}^2)"]
        elif method == "patch-adapter":
            total = plan.stage1_steps * with_dca + len(plan.tiles) * (plan.stage2_steps * with_rpa + reference_pass)
        else:
            total = (plan.stage1_steps + len(plan.tiles) * plan.stage2_steps) * native
        rows.append({"method": method, "unet_forwards": plan.unet_forwards, "patches": len(plan.tiles), "tflop": total})
    print(
        f"SDXL-inpainting UNet, one forward with classifier-free guidance (batch 2): "
        f"{plain['native (1024^2)']:.1f} TFLOP at 1024^2, {plain[f'full size ({side}^2)']:.1f} TFLOP at {side}^2; "
        f"with DCA (stage 1) {with_dca:.1f}, with RPA (stage 2) {with_rpa:.1f}, reference pass (batch 1) {reference_pass:.1f}"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, no 50%% mask, no 8K")
    parser.add_argument("--flops-only", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="steps of the whole-image pass and of the patches")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
        return

    figures = {"sdxl": sdxl_flops()}
    print(
        "\nUNet TFLOPs of one 4096x4096 inpaint, 1024x1024 mask, 30 steps, refine strength 0.6, "
        "guidance on (SDXL-inpainting architecture, counted on the meta device)"
    )
    print("| method | UNet forwards | patches | TFLOP |\n| --- | ---: | ---: | ---: |")
    for row in figures["sdxl"]:
        print(f"| {row['method']} | {row['unet_forwards']} | {row['patches']} | {row['tflop']:.0f} |")
    if args.flops_only:
        return

    steps = 4 if args.quick else args.steps
    sizes = {k: v for k, v in SIZES.items() if not (args.quick and k == "8K")}
    areas = AREAS[:2] if args.quick else AREAS
    print(
        f"\nTiny backbone on this CPU, {steps} steps (patches: refine strength 0.6), guidance on; "
        f"each case in a fresh process"
    )
    print("\nFixed 512x512 mask, growing image:")
    print(
        "| image | method | patches | UNet forwards | seconds | peak RSS MB (before the call) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: |"
    )
    figures["sizes"] = []
    for name, side in sizes.items():
        for method in METHODS:
            r = timed_in_subprocess(method, side, 512, steps)
            figures["sizes"].append({"image": name, "method": method, **r})
            print(
                f"| {name} | {method} | {r['patches']} | {r['unet_forwards']} | {r['seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) |",
                flush=True,
            )
    print("\n4096x4096 image, growing mask:")
    print(
        "| mask area | method | patches | UNet forwards | seconds | peak RSS MB (before the call) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: |"
    )
    figures["areas"] = []
    for area in areas:
        mask_side = int(round(math.sqrt(area) * 4096))
        for method in METHODS:
            r = timed_in_subprocess(method, 4096, mask_side, steps)
            figures["areas"].append({"area": area, "method": method, **r})
            print(
                f"| {area:.0%} | {method} | {r['patches']} | {r['unet_forwards']} | {r['seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) |",
                flush=True,
            )
    by = {(r["image"], r["method"]): r["seconds"] for r in figures["sizes"]}
    if ("8K", "patch-adapter") in by:
        print(
            f"\npatch-adapter 8K / 2K time for the same mask: {by[('8K', 'patch-adapter')] / by[('2K', 'patch-adapter')]:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
