"""Quality benchmark: every method on the same seeded insert/remove tasks.

    python benchmarks/quality.py --count 40 --size 512x512 --json out/quality/quality.json
    python benchmarks/quality.py --count 4 --size 256x256 --steps 4 --json /tmp/q/q.json   # a smoke run

Every finished (task, method) record is appended at once to a `.jsonl` beside the JSON
(its first line holds the settings); run the same command again after an interruption
and it skips what is there. A larger --count or more --methods extend an earlier run.
At the end it writes the JSON (settings, records, summary), a markdown table and a
chart, and prints the table; `--summarize-only` does just that for the records there.
`--workers K` runs K processes (one pipeline each) over the (task, method) pairs; on a
2-core machine use --workers 2 with --threads 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

WORKER: dict = {}  # per process: the settings, the pipeline, the last task built


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, not {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    from patch_adapter.evaluation.benchmark import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="selects the tasks; each task's own seed drives the noise")
    parser.add_argument("--count", type=int, default=20, help="tasks, alternately insert and remove")
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="WIDTHxHEIGHT of the tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (refine steps the same)")
    parser.add_argument("--model", default="tiny", help="backbone: tiny, a diffusers folder, a file or a hub id")
    parser.add_argument(
        "--adapter",
        default=None,
        help="a Patch-Adapter .safetensors file (default: the one the model folder ships, if any)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=Path("out/quality/quality.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="default: the JSON's path with .md")
    parser.add_argument("--plot", type=Path, default=None, help="default: the JSON's path with .png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own pipeline")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="make no new results: summarize the records already in the .jsonl (a partial run, or "
        "methods run with different counts; each row's n says how many tasks it has)",
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return args


# --- workers -------------------------------------------------------------------------


def start_worker(settings: dict, threads: int) -> None:
    """Load this process's pipeline (a pool initializer, or called once in-process)."""
    import torch

    from patch_adapter.pipeline import PatchAdapterPipeline

    torch.set_num_threads(threads)
    pipe = PatchAdapterPipeline.from_pretrained(
        settings["model"], adapter=settings["adapter"], device=settings["device"]
    )
    pipe.set_progress_bar_config(disable=True)
    WORKER.update(settings=settings, pipe=pipe, task=None)


def run_item(item: tuple[int, str]) -> dict:
    """Record of task `index` inpainted by `method`; the noise seed is the task's own, for every method."""
    from patch_adapter.evaluation.benchmark import benchmark_task, run_method

    index, method = item
    settings, pipe = WORKER["settings"], WORKER["pipe"]
    if WORKER["task"] is None or WORKER["task"][0] != index:
        width, height = settings["size"]
        WORKER["task"] = (index, benchmark_task(settings["seed"], index, width, height, pipe.native_size))
    task = WORKER["task"][1]
    return {"index": index, **run_method(pipe, task, method, settings["steps"], seed=task.seed)}


def run_items(items: list[tuple[int, str]], settings: dict, threads: int, workers: int):
    """Yield records as they finish, from this process or from a pool of spawned ones."""
    if not items:
        return
    if workers <= 1:
        start_worker(settings, threads)
        yield from map(run_item, items)
        return
    import multiprocessing

    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned workers before torch loads
    with multiprocessing.get_context("spawn").Pool(workers, start_worker, (settings, threads)) as pool:
        yield from pool.imap_unordered(run_item, items)


# --- records -------------------------------------------------------------------------


def weights_digest(model: str, adapter: str | None) -> str | None:
    """A hash of every file of a local model (folder or single file) and of the adapter file.

    It goes into the run's settings, so that resuming after the weights changed (a new
    `make train-tiny`, another checkpoint under the same path) is refused instead of
    mixing two backbones' records in one table. A hub id has no local files: None.
    """
    from patch_adapter.backbone import source_kind

    kind, root = source_kind(model)
    if kind == "folder":
        files = [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()]
        files = [(name, p) for name, p in files if not name.startswith(".")]  # e.g. a hub cache's .cache/
    else:
        files = [(root.name, root)] if kind == "single_file" else []
    if adapter:
        files.append(("adapter", Path(adapter).expanduser()))
    if not files:
        return None
    digest = hashlib.sha1()
    for name, path in files:
        digest.update(name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def read_records(path: Path, settings: dict) -> dict[tuple[int, str], dict]:
    """Records already in the .jsonl, by (index, method); refuses a file made with other settings."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    if not lines:
        return {}
    header = json.loads(lines[0]).get("settings") or {}
    if header != settings:
        changed = ", ".join(
            f"{k} {header.get(k)!r} there, {settings.get(k)!r} now"
            for k in settings | header
            if header.get(k) != settings.get(k)
        )
        sys.exit(
            f"{path} holds records made with other settings ({changed}; 'weights' is a digest of the model's "
            f"and adapter's files): choose another --json or delete it"
        )
    from patch_adapter.evaluation.benchmark import METHODS, method_fingerprint

    records, stale = {}, Counter()
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption
            continue
        method = record["method"]
        if method not in METHODS or record.get("method_settings") != method_fingerprint(method):
            stale[method] += 1  # made with other settings of its method: made again, never mixed in
            continue
        records[(record["index"], method)] = record
    if stale:
        print(
            f"{path}: set aside {sum(stale.values())} records made with other method settings than today's "
            f"({', '.join(f'{m} {n}' for m, n in sorted(stale.items()))}); they do not count, and a run makes them again",
            file=sys.stderr,
        )
    return records


def append_line(path: Path, data: dict) -> None:
    """One JSON line, on disk before the next record starts."""
    with open(path, "a") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, text: str) -> None:
    from patch_adapter.image_io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text.encode())


def describe(settings: dict, count: int) -> str:
    width, height = settings["size"]
    return (
        f"{count} tasks at {width}x{height}, seed {settings['seed']}, {settings['steps']} steps, "
        f"model {settings['model']}" + (f", adapter {settings['adapter']}" if settings["adapter"] else "")
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    from patch_adapter.evaluation.benchmark import STATS, markdown_table, plot_summary, summarize

    started = time.perf_counter()
    settings = {
        "seed": args.seed,
        "size": list(args.size),
        "steps": args.steps,
        "model": args.model,
        "adapter": args.adapter,
        "device": args.device,
        "weights": weights_digest(args.model, args.adapter),
    }
    log = args.json.with_suffix(".jsonl")
    done = read_records(log, settings)
    if not log.exists() or not log.read_text().strip():
        log.parent.mkdir(parents=True, exist_ok=True)
        append_line(log, {"settings": settings})
    items = (
        [] if args.summarize_only else [(i, m) for i in range(args.count) for m in args.methods if (i, m) not in done]
    )
    print(
        f"{describe(settings, args.count)}: {len(items)} of {args.count * len(args.methods)} results to make"
        f" ({args.workers} worker(s), {args.threads} thread(s) each)",
        file=sys.stderr,
    )
    for number, record in enumerate(run_items(items, settings, args.threads, args.workers), start=1):
        append_line(log, record)
        done[(record["index"], record["method"])] = record
        elapsed = time.perf_counter() - started
        print(
            f"[{number}/{len(items)}] task {record['index']} ({record['kind']}, {record['mask_kind']}, "
            f"{record['placement']}) {record['method']}: {record['seconds']:.1f} s, "
            f"prompt followed {record['prompt_followed']}; eta {elapsed / number * (len(items) - number):.0f} s",
            file=sys.stderr,
            flush=True,
        )

    order = {m: i for i, m in enumerate(args.methods)}
    records = sorted(
        (r for (i, m), r in done.items() if i < args.count and m in order),
        key=lambda r: (r["index"], order[r["method"]]),
    )
    summary = summarize(records)
    table = markdown_table(summary)
    seconds = time.perf_counter() - started
    result = {
        "settings": settings,
        "count": args.count,
        "methods": args.methods,
        "stats": {s.name: {"field": s.field, "kinds": list(s.kinds), "how": s.how, "label": s.label} for s in STATS},
        "summary": summary,
        "records": records,
        "seconds_this_run": seconds,
    }
    write_atomically(args.json, json.dumps(result, indent=1))
    markdown = args.markdown or args.json.with_suffix(".md")
    write_atomically(markdown, f"Quality benchmark: {describe(settings, args.count)}; mean [95% interval]\n\n{table}\n")
    plot_summary(summary, args.plot or args.json.with_suffix(".png"))
    print(table)
    print(
        f"\n{len(items)} results made in {seconds:.0f} s; pipeline time of all {len(records)} records: "
        f"{sum(r['seconds'] for r in records):.0f} s; wrote {args.json}, {markdown}"
    )


if __name__ == "__main__":
    main()
