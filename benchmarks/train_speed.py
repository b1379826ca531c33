"""Training speed and peak memory of both stages with the tiny backbone.

Prints, per stage: optimizer steps per second (median over the logged steps after a
warm-up) and peak memory (max RSS of the process on CPU; torch.cuda.max_memory_allocated
on a GPU). Each stage runs in its own process, so its peak is its own.

    python benchmarks/train_speed.py                     # 40 steps per stage, batch 1
    python benchmarks/train_speed.py --steps 100 --batch-size 4 --gradient-checkpointing

--threads sets torch's CPU threads (default 1: on small shared VMs two threads can
be far slower than one; try yours).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 5  # logged steps left out of the median (first calls allocate and warm caches)


def run_stage(
    stage: str, data: str, output: str, steps: int, batch_size: int, checkpointing: bool, threads: int
) -> dict:
    """Train `stage` in this process; returns its figures."""
    import torch

    from patch_adapter.training.config import resolve_config
    from patch_adapter.training.trainer import train

    torch.set_num_threads(threads)
    config = resolve_config(
        stage,
        overrides=dict(
            model="tiny",
            data=data,
            output=output,
            max_steps=steps,
            batch_size=batch_size,
            gradient_checkpointing=checkpointing,
            dataloader_num_workers=0,
            report_to="none",
            validation_steps=-1,
            checkpointing_steps=10**9,
            lr_warmup_steps=0,
        ),
    )
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    rates = [json.loads(line)["steps_per_s"] for line in (Path(output) / "train_log.jsonl").read_text().splitlines()]
    figures = {
        "stage": stage,
        "steps": result.steps,
        "batch_size": batch_size,
        "gradient_checkpointing": checkpointing,
        "threads": threads,
        "steps_per_s": statistics.median(rates[WARMUP:] or rates),
        "images_per_s": statistics.median(rates[WARMUP:] or rates) * batch_size,
        "wall_s_incl_setup": round(seconds, 2),
    }
    if torch.cuda.is_available():
        figures["device"] = torch.cuda.get_device_name()
        figures["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        figures["device"] = "cpu"
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage", choices=["stage1", "stage2"], help=argparse.SUPPRESS)  # one stage, in a child
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:  # the child: one stage, figures as JSON on the last line
        with tempfile.TemporaryDirectory() as out:
            figures = run_stage(
                args.stage, args.data, out, args.steps, args.batch_size, args.gradient_checkpointing, args.threads
            )
        print(json.dumps(figures))
        return

    from patch_adapter.training.data import make_toy_dataset

    with tempfile.TemporaryDirectory() as root:
        data = make_toy_dataset(Path(root) / "data", count=16, size=320)  # 320 px: stage 2 crops 128 px patches
        rows = []
        for stage in ("stage1", "stage2"):
            command = [
                sys.executable,
                __file__,
                "--stage",
                stage,
                "--data",
                str(data),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
            ]
            if args.gradient_checkpointing:
                command.append("--gradient-checkpointing")
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"tiny backbone (native 128 px), {args.steps} steps, batch {args.batch_size}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, device {rows[0]['device']}, "
        f"{args.threads} thread(s)"
    )
    print(f"{'stage':<8}{'steps/s':>9}{'images/s':>10}{'peak RSS MiB':>14}{'peak GPU MiB':>14}{'wall s':>8}")
    for r in rows:
        gpu = f"{r['peak_gpu_mib']:.1f}" if "peak_gpu_mib" in r else "-"
        print(
            f"{r['stage']:<8}{r['steps_per_s']:>9.2f}{r['images_per_s']:>10.2f}{r['peak_rss_mib']:>14.1f}"
            f"{gpu:>14}{r['wall_s_incl_setup']:>8.1f}"
        )


if __name__ == "__main__":
    main()
