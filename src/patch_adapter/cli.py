"""The `patch-adapter` command: a thin front end over the package.

    patch-adapter inpaint IMAGE --mask MASK --prompt TEXT -o OUT [--model tiny|PATH|HUB_ID] ...
    patch-adapter inpaint IMAGE --mask MASK --plan          (print the tile plan, run nothing)

Exit codes: 0 done, 2 bad input (arguments, image, mask, model or adapter file),
1 anything unexpected, 128 + N when stopped by signal N (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np

from . import __version__
from .backbone import BackboneLoadError
from .batch import add_batch_parser
from .image_io import ImageInputError, from_float, load_image, load_mask, save_image, to_float
from .settings import BANK_PLACEMENTS, METHODS, SCHEDULERS, InpaintSettings
from .training.commands import add_data_parser, add_train_parser
from .validation import LATENT_FACTOR, SettingsError, check_device, validate_inpaint_args
from .web import add_serve_parser

USER_ERRORS = (ImageInputError, BackboneLoadError, ValueError, FileNotFoundError)
EIGHT_BIT_SUFFIXES = {".jpg", ".jpeg", ".webp"}
CLEAN_EXIT_SIGNALS = ("SIGTERM", "SIGHUP")  # handled like Ctrl-C: temporary files removed

ADAPTER_HELP = (
    "Patch-Adapter weights (.safetensors); default: those the model folder ships (the tiny backbone "
    "does); none: no trained adapters"
)


def adapter_argument(text: str):
    """--adapter: a file, or "none" (False: not even the adapters the model folder ships)."""
    return False if text.lower() == "none" else text


def add_inpaint_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inpaint",
        help="fill the masked part of an image, following a prompt",
        description="Inpaint IMAGE inside MASK (white = fill) with Patch-Adapter or a baseline. "
        "Pixels outside the mask are returned unchanged, to the bit.",
    )
    p.add_argument("image", help="input image (PNG, JPEG, WebP, TIFF; 8 or 16 bit)")
    p.add_argument(
        "--mask",
        help="mask image of the same size: white = fill, black = keep, grey thresholded at "
        "--mask-threshold. Without it, the image's alpha channel is the mask "
        "(transparent = fill)",
    )
    p.add_argument("-o", "--output", help="output file (.png/.tif keep 16 bits) or folder; required unless --plan")
    p.add_argument("--overwrite-input", action="store_true", help="allow -o to name the input file itself")
    p.add_argument(
        "--allow-lossy",
        action="store_true",
        help="allow outputs that change pixels outside the mask: JPEG, or a 16-bit input written "
        "as 8-bit .webp/.jpg (without it they are refused; .png, .tif and .webp are lossless)",
    )
    add_settings_options(p)
    add_model_options(p)
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the tile plan, UNet evaluation count and memory estimate; run nothing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_inpaint)


def add_model_options(p, with_scheduler: bool = True) -> None:
    """Flags of the model, loaded once: shared by `inpaint`, `batch` and `serve` (whose page picks the sampler)."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (built in, offline), a diffusers folder, a single-file .safetensors checkpoint, "
        "or a hub id (default: tiny)",
    )
    g.add_argument("--config", default=None, help="for a single-file checkpoint: a diffusers folder with its configs")
    g.add_argument("--adapter", default=None, type=adapter_argument, help=ADAPTER_HELP)
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:1, mps or cpu (default: auto)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="weights precision (default: fp16 on cuda, fp32 elsewhere)",
    )
    g.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until used (saves GPU memory)")
    if with_scheduler:
        g.add_argument("--scheduler", default=None, choices=list(SCHEDULERS), help="sampler (default: the model's own)")


def add_settings_options(p) -> None:
    """Flags of one inpaint: shared by `inpaint` and `batch`, whose manifest columns are these names."""
    p.add_argument("--prompt", default="", help="what to put in the mask")
    p.add_argument("--negative-prompt", default=None, help="what to avoid")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="patch-adapter", choices=list(METHODS), help="the method or a baseline")
    g.add_argument("--steps", type=int, default=30, help="denoising steps of the whole-image pass (default 30)")
    g.add_argument("--refine-steps", type=int, default=None, help="denoising steps of the patches (default: --steps)")
    g.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    g.add_argument("--strength", type=float, default=0.9999, help="noise of the whole-image pass (default 0.9999)")
    g.add_argument(
        "--refine-strength",
        type=float,
        default=0.6,
        help="noise the patches start from, 1.0 = pure noise (default 0.6)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--num-images", type=int, default=1, help="how many results (default 1)")
    g.add_argument("--dca-scale", type=float, default=1.0, help="Dual Context Adapter strength in stage 1 (default 1)")
    g.add_argument("--rpa-scale", type=float, default=1.0, help="Reference Patch Adapter strength (default 1)")
    g.add_argument("--tile-size", type=int, default=None, help="patch size in px (default: the native size)")
    g.add_argument("--tile-overlap", type=int, default=None, help="patch overlap in px (default: native / 4)")
    g.add_argument("--mask-dilation", type=int, default=0, help="grow the regenerated region by N px (default 0)")
    g.add_argument(
        "--mask-feather",
        type=int,
        default=0,
        help="blend the fill into the original over N px inside the mask (default 0)",
    )
    g.add_argument("--mask-threshold", type=float, default=0.5, help="grey level that counts as fill (default 0.5)")
    g.add_argument("--crop-margin", type=int, default=None, help="crop baseline: margin around the mask in px")
    g.add_argument(
        "--patch-batch-size",
        type=int,
        default=None,
        help="stage-2 patches per UNet call: faster, more memory (default: the most that fit --max-memory, up to 8)",
    )
    g.add_argument(
        "--max-memory",
        type=memory_size,
        default=None,
        help="memory the inpaint may use on its device, weights included, e.g. 20GiB or 16GB "
        "(default: what the device has free); stage 2 picks its patch batch and where it keeps "
        "reference banks to fit",
    )
    g.add_argument(
        "--reference-banks",
        default="auto",
        choices=("auto",) + BANK_PLACEMENTS,
        help="where stage 2 keeps the reference banks (default auto: the first that fits)",
    )
    g.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="rescale classifier-free guidance, as diffusers' guidance_rescale (default 0)",
    )


#: InpaintSettings field -> the flag's name in an argparse namespace (and a batch manifest column)
SETTINGS_FLAGS = {name: name for name in InpaintSettings.fields()} | {"num_inference_steps": "steps"}


def settings_from_args(args) -> InpaintSettings:
    """The settings flags (or a batch row, or a web form parsed by the same parser) as InpaintSettings.

    A refused setting is named by its flag, as the user wrote it.
    """
    try:
        return InpaintSettings(
            **{field: getattr(args, flag) for field, flag in SETTINGS_FLAGS.items() if hasattr(args, flag)}
        )
    except SettingsError as error:
        message = str(error)
        for field, flag in SETTINGS_FLAGS.items():
            if message.startswith(field + " "):
                raise SettingsError("--" + flag.replace("_", "-") + message[len(field) :]) from None
        raise


def output_paths(output: str, image_path: str, count: int) -> list[Path]:
    """One path per result: OUT, or OUT_0, OUT_1 ... for several; a folder gets <stem>_inpainted.png."""
    out = Path(output)
    if out.is_dir() or output.endswith(("/", "\\")):
        out = out / f"{Path(image_path).stem}_inpainted.png"
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def component_config(model: str, component: str) -> dict | None:
    """A local backbone folder's `component` config (unet, vae, ...) without loading weights; None for a hub id."""
    from .backbone import tiny_weights_dir

    config = (tiny_weights_dir() if model == "tiny" else Path(model)) / component / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def latent_factor_of(model: str) -> int:
    """Pixels per latent of the backbone's VAE without loading weights (for --plan): 8 unless its config says."""
    from .backbone import vae_latent_factor

    config = component_config(model, "vae")
    return vae_latent_factor(config) if config else LATENT_FACTOR  # SDXL


def native_size_of(model: str) -> int:
    """The backbone's native size without loading weights (for --plan)."""
    config = component_config(model, "unet")
    return int(config["sample_size"]) * latent_factor_of(model) if config else 1024  # SDXL


def memory_size(text: str) -> int:
    """--max-memory: a byte count with an optional unit (KB, MB, GB, TB; KiB, MiB, GiB, TiB)."""
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    number = text.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text.strip().lower()[len(number) :].strip()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; write e.g. 20GiB, 16GB or 8000MB") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the memory size must be positive and finite")
    return int(value)


def plan_from_args(args, size: tuple[int, int], mask, native: int, latent_factor: int = LATENT_FACTOR):
    """The plan the pipeline makes for the same flags, without a model."""
    from .planning import make_plan

    return make_plan(settings_from_args(args), size, mask, native, latent_factor)


def plan_only(args, loaded, mask) -> int:
    from .adapters import install_adapters
    from .backbone import backbone_on_meta, resolve_device, resolve_dtype
    from .pipeline import choose_stage2_memory

    factor = latent_factor_of(args.model)
    plan = plan_from_args(args, loaded.size, mask, native_size_of(args.model), factor)
    # the memory estimate traces the backbone's models on the meta device: no weights are read
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("fp16" if device.type == "cuda" else "fp32"))
    backbone = types.SimpleNamespace(**backbone_on_meta(args.model, dtype, config=args.config), vae_scale_factor=factor)
    install_adapters(backbone.unet)
    plan.stage2 = choose_stage2_memory(backbone, plan, device)
    print(plan.describe())
    return 0


def run_inpaint(args) -> int:
    # 1. Inputs and settings first: a wrong mask or setting fails before minutes of model loading
    loaded = load_image(args.image)
    mask = load_mask(args.mask, loaded, threshold=args.mask_threshold)
    if args.plan:
        return plan_only(args, loaded, mask)
    if not args.output:
        raise ValueError("give an output file with -o OUT (or use --plan to only print the plan)")
    paths = output_paths(args.output, args.image, args.num_images)
    validate_inpaint_args(args, loaded, mask, paths, settings_from_args(args))
    if not mask.any():
        print("note: the mask marks no pixel to fill (white = fill); the output will equal the input", file=sys.stderr)
    protect = [] if args.overwrite_input else [args.image] + ([args.mask] if args.mask else [])

    # 2. Model
    started = time.perf_counter()
    pipe = load_pipeline(args)

    # 3. Inpaint
    result = pipe(image=loaded, mask_image=mask, **pipeline_kwargs(args))
    elapsed = time.perf_counter() - started

    # 4. Write, atomically, with the parameters in the file
    save_results(paths, result, output_metadata(args, pipe, result), loaded, protect, args.overwrite_input)
    for path in paths:
        print(f"wrote {path}")
    print(f"{result.plan.unet_forwards} UNet forwards in {elapsed:.1f} s", file=sys.stderr)
    return 0


def load_pipeline(args, device=None):
    """The pipeline the model flags ask for; `device` overrides --device (one GPU per process in a batch)."""
    from .backbone import resolve_device
    from .pipeline import PatchAdapterPipeline

    device = resolve_device(device or args.device)
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if args.quiet:  # the libraries' own loading bars too
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    pipe = PatchAdapterPipeline.from_pretrained(
        args.model,
        adapter=args.adapter,
        device=str(device),
        dtype=dtype,
        cpu_offload=args.cpu_offload,
        config=args.config,
        scheduler=args.scheduler,
    )
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    return pipe


def pipeline_kwargs(args) -> dict:
    """The flags as pipeline keywords (settings, prompts, seeded generator): one mapping for inpaint and batch."""
    import torch

    return dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        settings=settings_from_args(args),
        generator=torch.Generator().manual_seed(args.seed),
        num_images_per_prompt=args.num_images,
    )


def output_metadata(args, pipe, result) -> dict:
    """What a result file records of how it was made (PNG text chunk or .json sidecar): the resolved settings."""
    return {
        "patch_adapter_version": __version__,
        "model": args.model,
        "adapter": args.adapter,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        **result.plan.settings.as_dict(),
        "scheduler": type(pipe.scheduler).__name__,
        "unet_forwards": result.plan.unet_forwards,
    }


def save_results(paths, result, metadata, loaded, protect, overwrite_input) -> None:
    """Write each result atomically, in the input's bit depth where the format holds it, never over an input."""
    for index, (path, pixels) in enumerate(zip(paths, result.arrays, strict=True)):
        if pixels.dtype == np.uint16 and path.suffix.lower() in EIGHT_BIT_SUFFIXES:  # --allow-lossy
            print(
                f"note: {path.suffix} holds 8 bits; the 16-bit result is written as 8-bit "
                f"(use .png or .tif to keep 16 bits)",
                file=sys.stderr,
            )
            pixels = from_float(to_float(pixels), np.uint8)
        save_image(
            path,
            pixels,
            metadata={**metadata, "index": index},
            protect=protect,
            overwrite_input=overwrite_input,
            icc_profile=loaded.icc_profile,
            exif=loaded.exif,
            xmp=loaded.xmp,
        )


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline demo: a procedural scene inpainted by Patch-Adapter and two baselines",
        description="Render a scene at --size, mask a free area, ask for an object there, and inpaint it with "
        "patch-adapter, resize and tiled. Writes each result and comparison.png into OUT.",
    )
    p.add_argument("-o", "--output", required=True, help="folder for the PNGs")
    p.add_argument("--size", type=int, default=512, help="scene side in px (default 512: 4x the tiny native size)")
    p.add_argument("--seed", type=int, default=0, help="scene and sampling seed (default 0)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--model", default="tiny", help="backbone (default: tiny, offline)")
    p.add_argument("--adapter", default=None, type=adapter_argument, help=ADAPTER_HELP)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args) -> int:
    from .evaluation.demo import run_demo
    from .pipeline import PatchAdapterPipeline

    if args.size < 16:
        raise ValueError(f"--size {args.size} is too small; use at least 16 px (the default is 512)")
    check_device(args.device)
    pipe = PatchAdapterPipeline.from_pretrained(args.model, adapter=args.adapter, device=args.device)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    started = time.perf_counter()
    report = run_demo(pipe, Path(args.output), size=args.size, seed=args.seed, steps=args.steps)
    print(f"prompt: {report['prompt']!r} ({time.perf_counter() - started:.1f} s)")
    print("| method | prompt followed | sharpness (truth) | seam (truth) | pixels changed outside the mask |")
    for method, s in report["scores"].items():
        print(
            f"| {method} | {s['prompt_followed']} | {s['sharpness']:.2f} ({s['sharpness_truth']:.2f}) | "
            f"{s['seam']:.2f} ({s['seam_truth']:.2f}) | {s['outside_changed_pixels']} |"
        )
    print(f"wrote {Path(args.output) / 'comparison.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patch-adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"patch-adapter {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_inpaint_parser(subparsers)
    add_batch_parser(subparsers)
    add_train_parser(subparsers)
    add_data_parser(subparsers)
    add_demo_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def main(argv=None) -> int:
    # transformers warns at import about optional image processors we never use
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()  # library chatter would bury our own messages
    transformers_logging.set_verbosity_error()
    try:
        with stop_cleanly_on_signals():
            return args.func(args)
    except USER_ERRORS as err:
        print(f"patch-adapter: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"patch-adapter: stopped by {signal.Signals(signum).name}; no partial file was left", file=sys.stderr)
        return 128 + signum


class Stopped(KeyboardInterrupt):
    """SIGTERM/SIGHUP as an exception, so atomic writes remove their temporary file."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_cleanly_on_signals():
    """The default SIGTERM/SIGHUP action kills the process before `finally` blocks run."""

    def raise_stopped(signum, frame):
        raise Stopped(signum)

    previous = {}
    in_main_thread = threading.current_thread() is threading.main_thread()  # else signal() raises
    for name in CLEAN_EXIT_SIGNALS if in_main_thread else ():
        if hasattr(signal, name):  # no SIGHUP on Windows
            signum = getattr(signal, name)
            previous[signum] = signal.signal(signum, raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
