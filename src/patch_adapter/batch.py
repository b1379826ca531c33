"""`patch-adapter batch`: many images through one loaded model, resumable, split across processes.

    patch-adapter batch --images DIR [--masks DIR] --prompt TEXT -o OUTDIR [inpaint flags]
    patch-adapter batch --manifest items.csv|items.jsonl -o OUTDIR [inpaint flags]
    accelerate launch --multi_gpu --num_processes N -m patch_adapter.cli batch ...   (CPUs: ACCELERATE_USE_CPU=true)

Each item's result is what `patch-adapter inpaint` writes for the same settings. Rerunning
the command skips items whose outputs are complete; `OUTDIR/batch_report.jsonl` records every
item. Exit codes: 0 nothing failed, 1 some items failed, 2 the command itself is wrong.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .image_io import (
    SUPPORTED_EXTENSIONS,
    ImageInputError,
    atomic_write,
    load_image,
    load_mask,
    read_metadata,
    remove_stale_temp_files,
)
from .validation import check_integer

REPORT_NAME = "batch_report.jsonl"
PATH_COLUMNS = ("image", "mask", "output")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
# What a skipped output is compared on, to warn when it was made otherwise: these flags, and every
# InpaintSettings field but those that only change speed and memory
COMPARED_FLAGS = ("model", "adapter", "prompt", "negative_prompt", "seed")
MEMORY_SETTINGS = ("patch_batch_size", "max_memory", "reference_banks")


@dataclass
class Item:
    """One image to inpaint, with its own settings (the flags, overridden by its manifest row)."""

    index: int
    name: str  # how messages and the report call it: the image's file name or "<manifest> line N"
    image: Path
    mask: Path | None
    settings: argparse.Namespace
    outputs: list[Path]
    problem: str | None = None  # known before any model runs; the item fails with it

    def settings_dict(self) -> dict:
        return {key: getattr(self.settings, key) for key in setting_names()}


class RowParser(argparse.ArgumentParser):
    """The settings flags, parsing one manifest row: errors are raised, not printed with an exit."""

    def error(self, message):
        raise ValueError(message)


def add_batch_parser(subparsers) -> None:
    from .cli import add_model_options, add_settings_options  # cli imports this module

    p = subparsers.add_parser(
        "batch",
        help="inpaint a folder or a manifest of images with one loaded model, resumably",
        description="Inpaint many images with the model loaded once per process. Items whose outputs exist are "
        "skipped, failures are recorded in OUTDIR/batch_report.jsonl and the batch goes on. Under "
        "`accelerate launch` the items are split across the processes. Exit code 0: nothing failed, "
        "1: some items failed, 2: the command is wrong.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--manifest",
        help="CSV (with a header line) or JSONL, one row per image: columns image "
        "(required), mask, output and any setting flag's name (prompt, "
        "negative_prompt, seed, method, steps, ...), which beats the flag. "
        "image and mask are relative to the manifest's folder, output to OUTDIR",
    )
    source.add_argument("--images", help="folder of images (PNG, JPEG, WebP, TIFF; not its subfolders)")
    p.add_argument(
        "--masks",
        help="with --images: folder of masks, matched to the images by file stem; without "
        "it each image's alpha channel is its mask (transparent = fill)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help=f"folder for the results (<image stem>_inpainted.png unless a row names its output) and {REPORT_NAME}",
    )
    p.add_argument("--overwrite", action="store_true", help="redo items whose outputs exist")
    add_settings_options(p)
    add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # None: no --prompt given, so an item without its own prompt fails (--prompt '' fills without one)
    p.set_defaults(func=run_batch, prompt=None)


# --------------------------------------------------------------------------- items


def read_items(args) -> list[Item]:
    """The batch's items from a manifest or folders; any error in the command raises ValueError (exit 2)."""
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"-o {outdir} is a file; give a folder for the results")
    if args.manifest:
        if args.masks:
            raise ValueError("--masks goes with --images; a manifest names each image's mask in its mask column")
        items = manifest_items(Path(args.manifest), args, outdir)
    else:
        items = folder_items(Path(args.images), Path(args.masks) if args.masks else None, args, outdir)
    check_outputs(items)
    return items


def settings_parser() -> RowParser:
    from .cli import add_settings_options

    parser = RowParser(prog="manifest", add_help=False, allow_abbrev=False)
    add_settings_options(parser)
    return parser


@lru_cache(maxsize=1)
def setting_names() -> tuple[str, ...]:
    """The per-image settings (prompt, seed, steps, ...): the manifest columns besides the paths."""
    return tuple(vars(settings_parser().parse_args([])))


def item_settings(args, values: dict, parser: RowParser, native: int) -> argparse.Namespace:
    """The flags with a row's values on top, converted and checked by the flags' own definitions."""
    from .cli import settings_from_args

    argv = []
    for key, value in values.items():
        if isinstance(value, (bool, list, dict)):
            raise ValueError(f"{key}: {json.dumps(value)} is not a number or a text")
        argv.append(f"--{key.replace('_', '-')}={value}")
    s = parser.parse_args(argv, namespace=argparse.Namespace(**vars(args)))  # sets only what argv names
    check_integer("num_images", s.num_images, 1)
    s.inpaint = settings_from_args(s).resolved(native)  # checked here, before any model loads
    return s


def manifest_items(manifest: Path, args, outdir: Path) -> list[Item]:
    from .cli import add_model_options, native_size_of, output_paths

    if manifest.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest {manifest} must be a .csv or a .jsonl file")
    if not manifest.is_file():
        raise ValueError(f"manifest {manifest} does not exist; check the path")
    parser = settings_parser()
    model_parser = argparse.ArgumentParser(add_help=False)
    add_model_options(model_parser)
    model_columns = set(vars(model_parser.parse_args([])))
    known = (*PATH_COLUMNS, *setting_names())
    base = manifest.parent
    native = native_size_of(args.model)
    rows = csv_rows(manifest) if manifest.suffix.lower() == ".csv" else jsonl_rows(manifest)
    items = []
    for line, row in rows:
        where = f"{manifest.name} line {line}"
        values = {}
        for key, value in row.items():
            column = str(key).strip().replace("-", "_")
            if column in model_columns:
                raise ValueError(
                    f"{where}: {column} is set for the whole batch (one model per process): "
                    f"use --{column.replace('_', '-')} instead of a column"
                )
            if column not in known:
                raise ValueError(f"{where}: unknown column {key!r}; the columns are {', '.join(known)}")
            if value is not None and str(value).strip():  # an empty cell: the flag's value
                values[column] = value
        if "image" not in values:
            raise ValueError(f"{where}: no image; every row needs one")
        paths = {key: values.pop(key) for key in PATH_COLUMNS if key in values}
        try:
            settings = item_settings(args, values, parser, native)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        image = base / str(paths["image"])
        target = str(outdir / str(paths["output"])) if "output" in paths else str(outdir) + os.sep
        items.append(
            Item(
                index=len(items),
                name=where,
                image=image,
                mask=base / str(paths["mask"]) if "mask" in paths else None,
                settings=settings,
                outputs=output_paths(target, str(image), settings.num_images),
                problem=None
                if settings.prompt is not None
                else "no prompt: give one in the prompt column or with --prompt (--prompt '' fills without one)",
            )
        )
    if not items:
        raise ValueError(f"manifest {manifest} has no rows")
    return items


def csv_rows(path: Path):
    """(line number, row) of a CSV with a header line; utf-8-sig reads what spreadsheets export."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "image" not in [name.strip() for name in reader.fieldnames]:
            raise ValueError(
                f"{path.name} line 1: no image column; the header line must name the columns, e.g. image,mask,prompt"
            )
        for row in reader:
            if None in row:
                raise ValueError(
                    f"{path.name} line {reader.line_num}: more cells than columns (quote cells that hold commas)"
                )
            yield reader.line_num, row


def jsonl_rows(path: Path):
    """(line number, object) of a JSON-lines file; blank lines are allowed."""
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path.name} line {line}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path.name} line {line}: each line must be a JSON object, "
                    'e.g. {"image": "a.png", "prompt": "a bench"}'
                )
            yield line, row


def folder_items(images: Path, masks: Path | None, args, outdir: Path) -> list[Item]:
    from .cli import native_size_of, output_paths

    for folder, flag in ((images, "--images"), (masks, "--masks")):
        if folder is not None and not folder.is_dir():
            raise ValueError(f"{flag} {folder} is not a folder")
    if outdir.resolve() == images.resolve():
        raise ValueError("-o must not be the --images folder: the results would be read as inputs next time")
    if masks is not None and masks.resolve() == images.resolve():
        raise ValueError(
            "--masks must be another folder than --images: masks are matched to images by file stem, "
            "so each image would be its own mask"
        )
    if args.prompt is None:
        raise ValueError("give the prompt for all images with --prompt TEXT (--prompt '' fills without one)")
    settings = item_settings(args, {}, settings_parser(), native_size_of(args.model))
    by_stem: dict[str, list[Path]] = {}
    for mask in image_files(masks) if masks else []:
        by_stem.setdefault(mask.stem, []).append(mask)
    items = []
    for image in image_files(images):
        candidates = by_stem.get(image.stem, [])
        problem = None
        if masks and not candidates:
            problem = f"no mask named {image.stem}.* in {masks} (masks are matched to images by file stem)"
        elif len(candidates) > 1:
            problem = f"several masks for {image.name}: {', '.join(p.name for p in candidates)}; keep one"
        items.append(
            Item(
                index=len(items),
                name=image.name,
                image=image,
                mask=candidates[0] if len(candidates) == 1 else None,
                settings=settings,
                outputs=output_paths(str(outdir) + os.sep, str(image), settings.num_images),
                problem=problem,
            )
        )
    if not items:
        raise ValueError(f"no images in {images} (looked for {', '.join(SUPPORTED_EXTENSIONS)})")
    return items


def image_files(folder: Path) -> list[Path]:
    """The folder's image files by name, hidden files (temporaries) left out."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in SUPPORTED_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def check_outputs(items: list[Item]) -> None:
    """Two items writing one file, an output that is some item's input or has no image extension: refuse."""
    inputs = {p.resolve(): item for item in items for p in (item.image, item.mask) if p is not None}
    writers: dict[Path, Item] = {}
    for item in items:
        for path in item.outputs:
            if path.suffix.lower() not in SUPPORTED_EXTENSIONS:  # found now, not after the item's compute
                raise ValueError(
                    f"{item.name}: cannot tell the format of the output {path} from its extension; "
                    f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
                )
            key = path.resolve()
            if key in inputs:
                raise ValueError(
                    f"{item.name}: the output {path} is an input of {inputs[key].name}; "
                    "refusing to overwrite an input, name another output"
                )
            if key in writers:
                raise ValueError(
                    f"{item.name} and {writers[key].name} would both write {path}; give them "
                    "different outputs (or images different stems)"
                )
            writers[key] = item


# --------------------------------------------------------------------------- resume


def existing_outputs(item: Item) -> list[str] | None:
    """None when an output is missing or incomplete, else the settings the outputs differ in (mostly none).

    An output counts as complete once it carries its metadata: writes are atomic and the metadata of
    non-PNG formats is written last, to a sidecar.
    """
    expected = {key: getattr(item.settings, key) for key in COMPARED_FLAGS}
    expected |= {key: value for key, value in item.settings.inpaint.as_dict().items() if key not in MEMORY_SETTINGS}
    differing = set()
    for path in item.outputs:
        try:
            metadata = read_metadata(path)
        except ImageInputError:
            return None
        if not metadata:
            return None
        differing |= {key for key, value in expected.items() if key in metadata and metadata[key] != value}
    return sorted(differing)


def clean_temporaries(items: list[Item]) -> int:
    """Remove what a killed run's atomic writes left; run while no process writes yet."""
    by_folder: dict[Path, set[str]] = {}
    for item in items:
        for path in item.outputs:
            by_folder.setdefault(path.parent, set()).add(path.name)
    return sum(len(remove_stale_temp_files(folder, names)) for folder, names in by_folder.items())


# --------------------------------------------------------------------------- running


def run_batch(args) -> int:
    """Read the items, sort out what is left to do, split it across the processes, report once."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    started = time.perf_counter()
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > state.num_processes:  # each process would do every item
        raise ValueError(
            f"{launched} processes were launched but accelerate sees {state.num_processes}: "
            "on CPUs, set ACCELERATE_USE_CPU=true"
        )
    items = read_items(args)  # every process reads the same items and fails alike, before any work
    outdir = Path(args.output)
    main = state.is_main_process
    pending, skipped = sort_out(items, args, state)
    if main:
        print(
            f"batch: {len(items)} items, {len(skipped)} with complete outputs skipped, {len(pending)} to do "
            f"on {state.num_processes} process{'es' if state.num_processes > 1 else ''}",
            file=sys.stderr,
        )
        warn_other_settings(skipped)

    try:
        with state.split_between_processes(pending) as mine:
            records = run_items(mine, args, state)
    except KeyboardInterrupt:
        print("batch: interrupted; finished outputs are kept: rerun the same command to do the rest", file=sys.stderr)
        return 130
    if state.num_processes > 1:
        records = gather_object(records)
    if not main:
        return 0  # the main process reports and exits 1 for the batch: one failure notice from the launcher
    records += [record(item, "skipped", settings_differ=differing or None) for item, differing in skipped]
    records.sort(key=lambda r: r["index"])
    for r in records:
        del r["index"]
    write_report(outdir / REPORT_NAME, records)
    return summarize(records, time.perf_counter() - started, outdir / REPORT_NAME)


def sort_out(items: list[Item], args, state) -> tuple[list[Item], list[tuple[Item, list[str]]]]:
    """(items to do, skipped items with the settings their outputs differ in), the same for every process.

    Only the main process looks at the outputs, before any is written, and tells the others: machines
    whose views of a shared folder lag behind still split the same list.
    """
    from accelerate.utils import broadcast_object_list

    found = None  # per item: None to do, else the settings its existing outputs differ in
    if state.is_main_process:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        removed = clean_temporaries(items)
        if removed:
            print(f"batch: removed {removed} temporary file(s) an interrupted run left", file=sys.stderr)
        found = [None if args.overwrite else existing_outputs(item) for item in items]
    if state.num_processes > 1:
        found = broadcast_object_list([found])[0]
    pending = [item for item, differing in zip(items, found, strict=True) if differing is None]
    skipped = [(item, differing) for item, differing in zip(items, found, strict=True) if differing is not None]
    return pending, skipped


def run_items(items: list[Item], args, state) -> list[dict]:
    """This process's share: the model is loaded once, and a failing item is recorded, not raised."""
    from tqdm.auto import tqdm

    from .cli import load_pipeline

    if not items:
        return []
    quiet = args.quiet or not state.is_main_process
    pipe = load_pipeline(args, device=state.device if state.num_processes > 1 and args.device == "auto" else None)
    pipe.set_progress_bar_config(disable=quiet, leave=False)
    records = []
    bar = tqdm(items, desc="batch", unit="image", disable=quiet, position=0)
    for item in bar:
        started = time.perf_counter()
        try:
            note = run_item(pipe, item)
        except Exception as err:  # noqa: BLE001 - one bad item must not stop the batch
            message = failure_message(err)
            tqdm.write(f"batch: failed: {item.name}: {message}", file=sys.stderr)
            records.append(
                record(
                    item, "failed", error=message, seconds=time.perf_counter() - started, process=state.process_index
                )
            )
        else:
            if note:
                tqdm.write(f"batch: note: {item.name}: {note}", file=sys.stderr)
            records.append(
                record(item, "done", seconds=time.perf_counter() - started, process=state.process_index, note=note)
            )
    return records


def run_item(pipe, item: Item) -> str | None:
    """The steps of `patch-adapter inpaint`, through the same helpers, so the bytes are the same.

    Returns a note worth reading in the report: an empty mask gives back the input unchanged.
    """
    from .cli import output_metadata, pipeline_kwargs, save_results

    if item.problem:
        raise ImageInputError(item.problem)
    loaded = load_image(item.image)
    mask = load_mask(item.mask, loaded, threshold=item.settings.mask_threshold)
    result = pipe(image=loaded, mask_image=mask, **pipeline_kwargs(item.settings))
    protect = [item.image] + ([item.mask] if item.mask else [])
    save_results(
        item.outputs, result, output_metadata(item.settings, pipe, result), loaded, protect, overwrite_input=False
    )
    return "the mask is empty: the output is the input unchanged" if result.plan.empty_mask else None


def failure_message(err: Exception) -> str:
    """The message for the report: ours say what to do; out-of-memory gets the fix; anything else its trace."""
    import torch

    from .cli import USER_ERRORS

    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # let the next item start from a clean pool
        return (
            f"out of memory ({type(err).__name__}); lower --patch-batch-size, use --cpu-offload or "
            "--dtype fp16, or run fewer processes per GPU"
        )
    if isinstance(err, USER_ERRORS):
        return str(err)
    traceback.print_exc()
    return f"{type(err).__name__}: {err}"


def record(item: Item, status: str, error: str | None = None, seconds: float = 0.0, **extra) -> dict:
    """One line of the report."""
    return {
        "index": item.index,
        "item": item.name,
        "status": status,
        "error": error,
        "seconds": round(seconds, 3),
        "image": str(item.image),
        "mask": str(item.mask) if item.mask else None,
        "outputs": [str(p) for p in item.outputs],
        "settings": item.settings_dict(),
        **{key: value for key, value in extra.items() if value is not None},
    }


def warn_other_settings(skipped) -> None:
    """A rerun with a changed prompt must not pass old results off silently as the new ones."""
    stale = [(item, differing) for item, differing in skipped if differing]
    if stale:
        item, differing = stale[0]
        print(
            f"batch: warning: {len(stale)} skipped item(s) were made with other settings (e.g. {item.name}: "
            f"{', '.join(differing)}); pass --overwrite to redo them",
            file=sys.stderr,
        )


def write_report(path: Path, records: list[dict]) -> None:
    with atomic_write(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def summarize(records: list[dict], seconds: float, report: Path) -> int:
    """Print the counts and throughput; exit code 1 if any item failed."""
    counts = {status: sum(r["status"] == status for r in records) for status in ("done", "skipped", "failed")}
    rate = counts["done"] * 3600 / seconds if seconds > 0 else 0.0
    print(
        f"batch: {counts['done']} done, {counts['skipped']} skipped (outputs exist; --overwrite redoes them), "
        f"{counts['failed']} failed in {seconds:.1f} s ({rate:.0f} images/hour); report: {report}",
        file=sys.stderr,
    )
    failed = [r for r in records if r["status"] == "failed"]
    for r in failed[:10]:
        print(f"  failed: {r['item']}: {r['error']}", file=sys.stderr)
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more in the report", file=sys.stderr)
    return 1 if failed else 0
