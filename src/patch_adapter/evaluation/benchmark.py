"""The quality benchmark: every method on the same known-truth tasks.

Each method of docs/method.md, and Patch-Adapter without each adapter, inpaints the same
seeded insert/remove tasks with the same backbone, steps and noise seed. Every result
is scored against the task's truth (`scoring.score_result`), and `summarize` turns the
records into one mean and 95% interval per method and statistic, for a table and a
chart. Only `run_method` needs a model; the rest is pure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..settings import METHODS as PIPELINE_METHODS
from ..settings import InpaintSettings
from ..tiling import Tile
from ..validation import LATENT_FACTOR
from .scoring import score_result
from .tasks import MASK_KINDS, PLACEMENTS, TASK_KINDS, Task, make_task, task_record

METHODS: dict[str, InpaintSettings] = {name: InpaintSettings(method=name) for name in PIPELINE_METHODS} | {
    "no-dca": InpaintSettings(dca_scale=0.0),
    "no-rpa": InpaintSettings(rpa_scale=0.0),
    "untrained": InpaintSettings(),  # both adapters at their initial weights (see UNTRAINED)
}
"""Benchmark name -> its settings: every pipeline method, then the ablations."""

UNTRAINED = {"untrained"}
"""Methods run with the adapters at their initial weights: what an SDXL user without trained adapters gets."""


def method_fingerprint(method: str) -> str:
    """A digest of the settings `method` runs with, adapter reset included.

    Every record carries it, so a resumed run re-makes the records of a method whose
    settings changed since (a new default refine strength, say) instead of mixing two
    versions of the method in one row.
    """
    fields = dataclasses.asdict(METHODS[method]) | {"untrained": method in UNTRAINED}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# --- tasks ---------------------------------------------------------------------------


def benchmark_task(seed: int, index: int, width: int, height: int, native: int) -> Task:
    """Task `index` of the benchmark with this seed, built on its own (workers need no list).

    Tasks come in pairs: 2p is an insert and 2p + 1 the removal from the same scene
    pair (same task seed, mask kind and placement), so the two kinds can be compared
    case by case. Pair p takes mask kind p % 3 and placement p % 4: any 3 consecutive
    pairs hold every mask kind, any 4 every placement, and any 12 every combination
    (3 and 4 are coprime). Its task seed is drawn from (seed, p) alone, so a run with a
    larger count extends a smaller one instead of replacing it.
    """
    pair = index // 2
    task_seed = int(np.random.SeedSequence([seed, pair]).generate_state(1)[0])
    return make_task(
        TASK_KINDS[index % 2],
        task_seed,
        width,
        height,
        native=native,
        mask_kind=MASK_KINDS[pair % len(MASK_KINDS)],
        placement=PLACEMENTS[pair % len(PLACEMENTS)],
    )


def benchmark_tasks(seed: int, count: int, width: int, height: int, native: int) -> list[Task]:
    """The first `count` tasks of the benchmark (half insert, half remove), deterministic for a seed."""
    return [benchmark_task(seed, index, width, height, native) for index in range(count)]


# --- one result ----------------------------------------------------------------------


def tile_borders(tiles: list[Tile], factor: int = LATENT_FACTOR) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Pixel rows and columns where the plan's patches start or end (tiles are in latents)."""
    rows = sorted({edge * factor for t in tiles for edge in (t.top, t.bottom)})
    cols = sorted({edge * factor for t in tiles for edge in (t.left, t.right)})
    return tuple(rows), tuple(cols)


def finite_or_none(value):
    """Floats that JSON cannot hold (NaN: nothing to measure; inf: a perfect fill's PSNR) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_method(pipe, task: Task, method: str, steps: int, seed: int) -> dict:
    """Inpaint `task` with a benchmark method and score it: one JSON-ready record.

    The record holds the task's settings (not its scenes), the method, every score of
    `score_result`, sharpness_gap (the fill's sharpness minus the truth's on the same
    mask, so flat inserted objects are not read as blur), the plan's size and the
    seconds of the pipeline call. Tile seams are scored on the plan's patch borders;
    methods without patches get None there.
    """
    import torch

    from ..adapters import initial_adapters

    adapters = initial_adapters(pipe.unet) if method in UNTRAINED else contextlib.nullcontext()
    started = time.perf_counter()
    with adapters:
        output = pipe(
            prompt=task.prompt,
            image=task.image,
            mask_image=task.mask,
            generator=torch.Generator().manual_seed(seed),
            settings=METHODS[method].replace(num_inference_steps=steps),
        )
    seconds = time.perf_counter() - started
    rows, cols = tile_borders(output.plan.tiles, pipe.vae_scale_factor)
    scores = score_result(task, output.arrays[0], rows, cols)
    scores["sharpness_gap"] = scores["sharpness"] - scores["sharpness_truth"]
    scores["single_object"] = scores["objects"] == 1
    settings = {key: value for key, value in task_record(task).items() if key not in ("scene", "truth_scene")}
    record = {
        **settings,
        "method": method,
        "method_settings": method_fingerprint(method),
        "steps": steps,
        "generator_seed": seed,
        **scores,
        "patches": len(output.plan.tiles),
        "unet_forwards": output.plan.unet_forwards,
        "seconds": seconds,
    }
    return {key: finite_or_none(value) for key, value in record.items()}


# --- summary -------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """One summary statistic: a record field, over the tasks of some kinds, aggregated one way."""

    name: str
    field: str
    kinds: tuple[str, ...]  # task kinds whose records count
    how: str  # "mean" (bootstrap interval), "proportion" (Wilson interval) or "max" (no interval)
    label: str


STATS: tuple[Stat, ...] = (
    Stat("insert_accuracy", "prompt_followed", ("insert",), "proportion", "insert prompt accuracy"),
    Stat("remove_accuracy", "prompt_followed", ("remove",), "proportion", "remove prompt accuracy"),
    Stat("insert_single_object", "single_object", ("insert",), "proportion", "single-object rate (insert)"),
    Stat("insert_objects", "objects", ("insert",), "mean", "objects drawn (insert)"),
    Stat("insert_objects_truth", "objects_truth", ("insert",), "mean", "objects drawn, truth"),
    Stat("remove_psnr", "psnr", ("remove",), "mean", "remove PSNR (dB)"),
    Stat("remove_ssim", "ssim", ("remove",), "mean", "remove SSIM"),
    Stat("remove_sharpness", "sharpness", ("remove",), "mean", "remove sharpness"),
    Stat("remove_sharpness_truth", "sharpness_truth", ("remove",), "mean", "remove sharpness, truth"),
    Stat("sharpness_gap", "sharpness_gap", TASK_KINDS, "mean", "sharpness - truth's"),
    Stat("seam", "seam", TASK_KINDS, "mean", "mask seam"),
    Stat("seam_truth", "seam_truth", TASK_KINDS, "mean", "mask seam, truth"),
    Stat("tile_seam", "tile_seam", TASK_KINDS, "mean", "tile seam"),
    Stat("tile_seam_truth", "tile_seam_truth", TASK_KINDS, "mean", "tile seam, truth"),
    Stat("outside_max_abs", "outside_max_abs", TASK_KINDS, "max", "outside change, max"),
    Stat("seconds", "seconds", TASK_KINDS, "mean", "seconds per task"),
)
"""What `summarize` reports per method. Truth rows say what a perfect fill scores on the same masks."""

CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(
    values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (fixed seed: the same records give the same table).

    No normality assumed: seam ratios and PSNR are skewed, and the samples are small.
    """
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sensible at 0/n and n/n, where the normal one collapses."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def stat_values(records: list[dict], stat: Stat) -> np.ndarray:
    """The stat's values over its records, None and non-finite values left out; booleans as 0/1."""
    values = [record.get(stat.field) for record in records if record["kind"] in stat.kinds]
    values = [float(v) for v in values if v is not None]
    return np.array([v for v in values if math.isfinite(v)], dtype=np.float64)


def summarize_stat(values: np.ndarray, how: str) -> dict:
    """{"value", "low", "high", "n"}; value and bounds are None without values, bounds None for "max"."""
    n = int(values.size)
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    if how == "max":
        return {"value": float(values.max()), "low": None, "high": None, "n": n}
    if how == "proportion":
        low, high = wilson_interval(int(values.sum()), n)
    elif how == "mean":
        low, high = bootstrap_interval(values)
    else:
        raise ValueError(f"unknown aggregation {how!r}")
    return {"value": float(values.mean()), "low": low, "high": high, "n": n}


def summarize(records: list[dict], stats: tuple[Stat, ...] = STATS) -> dict[str, dict[str, dict]]:
    """Per method (METHODS order, then any other in order of appearance): per stat, its summary."""
    names = [m for m in METHODS if any(r["method"] == m for r in records)]
    names += [m for m in dict.fromkeys(r["method"] for r in records) if m not in METHODS]
    summary = {}
    for method in names:
        own = [r for r in records if r["method"] == method]
        summary[method] = {stat.name: summarize_stat(stat_values(own, stat), stat.how) for stat in stats}
    return summary


# --- reports -------------------------------------------------------------------------


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_cell(entry: dict) -> str:
    """ "value [low, high]", or the value alone where there is no interval."""
    if entry["low"] is None:
        return format_number(entry["value"])
    return f"{format_number(entry['value'])} [{format_number(entry['low'])}, {format_number(entry['high'])}]"


def markdown_table(summary: dict[str, dict[str, dict]], stats: tuple[Stat, ...] = STATS) -> str:
    """One row per statistic, one column per method: mean [95% interval]; a last row counts the tasks."""
    methods = list(summary)
    lines = ["| statistic | " + " | ".join(methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for stat in stats:
        lines.append(f"| {stat.label} | " + " | ".join(format_cell(summary[m][stat.name]) for m in methods) + " |")
    lines.append("| tasks (n) | " + " | ".join(str(summary[m]["seconds"]["n"]) for m in methods) + " |")
    return "\n".join(lines)


PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
PANEL_WIDTH, ROW_HEIGHT, LABEL_WIDTH, VALUE_WIDTH, TITLE_HEIGHT = 320, 14, 92, 44, 18


def draw_panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], stat: Stat, summary: dict) -> None:
    """One horizontal bar chart: a bar per method from 0 to its value, whiskers over its interval."""
    x0, y0 = origin
    draw.text((x0 + 4, y0 + 3), stat.label, fill=(0, 0, 0))
    entries = [summary[m][stat.name] for m in summary]
    ends = [0.0] + [v for e in entries for v in (e["value"], e["low"], e["high"]) if v is not None]
    low, high = min(ends), max(ends)
    high = high if high > low else low + 1.0
    left, width = x0 + LABEL_WIDTH, PANEL_WIDTH - LABEL_WIDTH - VALUE_WIDTH

    def x(value: float) -> int:
        return int(round(left + (value - low) / (high - low) * width))

    for row, (method, entry) in enumerate(zip(summary, entries, strict=True)):
        top = y0 + TITLE_HEIGHT + row * ROW_HEIGHT
        middle = top + ROW_HEIGHT // 2
        draw.text((x0 + 4, top + 1), method, fill=(0, 0, 0))
        if entry["value"] is None:
            continue
        colour = PALETTE[row % len(PALETTE)]
        draw.rectangle(
            (min(x(0.0), x(entry["value"])), top + 3, max(x(0.0), x(entry["value"])), top + ROW_HEIGHT - 3), fill=colour
        )
        if entry["low"] is not None:
            draw.line((x(entry["low"]), middle, x(entry["high"]), middle), fill=(0, 0, 0))
            for end in (entry["low"], entry["high"]):
                draw.line((x(end), middle - 3, x(end), middle + 3), fill=(0, 0, 0))
        draw.text((left + width + 4, top + 1), format_number(entry["value"]), fill=(0, 0, 0))
    draw.line((x(0.0), y0 + TITLE_HEIGHT, x(0.0), y0 + TITLE_HEIGHT + len(entries) * ROW_HEIGHT), fill=(90, 90, 90))


def plot_summary(summary: dict[str, dict[str, dict]], path, stats: tuple[Stat, ...] = STATS, columns: int = 3) -> Path:
    """A PNG (PIL only, no plotting library): one small bar chart per statistic, 95% intervals as whiskers."""
    panel_height = TITLE_HEIGHT + len(summary) * ROW_HEIGHT + 8
    rows = -(-len(stats) // columns)
    sheet = Image.new("RGB", (columns * PANEL_WIDTH, rows * panel_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, stat in enumerate(stats):
        draw_panel(draw, ((i % columns) * PANEL_WIDTH, (i // columns) * panel_height), stat, summary)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
