"""Images per hour of `patch-adapter batch` with the tiny backbone, one process against several.

Writes --count random images of --size px with a centred box mask (a quarter of each side),
then runs the batch command on them once per entry of --processes: one process as a plain
command, more through `accelerate launch --multi_gpu` (with ACCELERATE_USE_CPU=true unless
--gpu). The CPU threads (--threads, default all cores) are shared out among the processes.

    python benchmarks/batch_throughput.py                          # 512 px, 8 images, 1 and 2 processes
    python benchmarks/batch_throughput.py --size 2048 --count 4 --steps 4

Two figures per run: `wall` counts the whole command (Python start, model loading, every
image) and `batch` is the command's own summary (model loading and images, not imports).
On a shared machine both move with the load of the others: run it alone for real figures.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, count: int, size: int) -> None:
    from patch_adapter.image_io import save_image

    folder.mkdir(parents=True)
    alpha = np.full((size, size, 1), 255, np.uint8)
    alpha[size * 3 // 8 : size * 5 // 8, size * 3 // 8 : size * 5 // 8] = 0  # transparent = fill
    rng = np.random.default_rng(0)
    for i in range(count):
        save_image(folder / f"img{i:04d}.png", np.dstack([rng.integers(0, 256, (size, size, 3), np.uint8), alpha]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(images: Path, out: Path, processes: int, threads: int, steps: int, gpu: bool) -> tuple[float, float]:
    """(wall seconds, images/hour from the batch's summary) of one batch command."""
    batch = [
        "-m",
        "patch_adapter.cli",
        "batch",
        "--images",
        str(images),
        "--prompt",
        "a bench",
        "-o",
        str(out),
        "--steps",
        str(steps),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes)), "TRANSFORMERS_VERBOSITY": "error"}
    if processes == 1:
        command = [sys.executable, *batch]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(free_port()),
            *batch,
        ]
        if not gpu:
            env["ACCELERATE_USE_CPU"] = "true"
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the batch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = re.search(r"\(([\d.]+) images/hour\)", done.stderr)
    return wall, float(found[1]) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument("--count", type=int, default=8, help="images per run (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--processes", default="1,2", help="process counts to compare (default 1,2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (default: cores)")
    parser.add_argument("--gpu", action="store_true", help="one process per GPU instead of CPU processes")
    args = parser.parse_args()
    print("| size | processes | images | steps | wall s | images/hour (wall) | images/hour (batch) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images, args.count, args.size)
        for processes in (int(p) for p in args.processes.split(",")):
            wall, rate = run(images, Path(tmp) / f"out{processes}", processes, args.threads, args.steps, args.gpu)
            print(
                f"| {args.size}x{args.size} | {processes} | {args.count} | {args.steps} | {wall:.1f} | "
                f"{args.count * 3600 / wall:.0f} | {rate:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
