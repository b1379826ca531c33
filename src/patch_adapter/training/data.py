"""Training data: image-caption records, aspect buckets, stage-2 crops and references.

Layouts read (docs/method.md trains on image-caption sets such as OpenImages and
Photo-Concept-Bucket; docs/training.md shows how to bring them into one of these):

- Hugging Face *imagefolder*: a folder (searched recursively) with ``metadata.jsonl``
  files whose lines hold ``file_name`` and ``text`` (``caption`` is accepted too),
  optionally ``width``/``height`` (skips reading image headers at start) and
  ``mask_file_name`` (an object mask, or a list of them, for the "object" masks);
- images with *sidecar captions*: ``photo.jpg`` + ``photo.txt`` (used when the folder
  has no metadata.jsonl);
- *webdataset* shards: ``.tar`` files whose members ``KEY.jpg|png|webp`` and
  ``KEY.txt`` (or ``KEY.json`` with ``text``/``caption``) form a sample. They are read
  with the standard library's `tarfile` (webdataset itself is not needed): the scan
  notes each image's byte range, and a sample is read by seeking to it.

Unreadable images are never fatal: those whose header cannot be read are left out at
the scan, those that fail to decode later are replaced by the next record; both are
counted (`ScanReport`, the `skipped` field of every batch) and reported at the end.

Randomness: every sample is a function of (seed, epoch, batch, position), through
the sample seed the `BatchStream` hands to the dataset, so the order of workers or
processes and a resume change nothing.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps

from ..image_io import to_float, to_model_range
from ..planning import native_dims
from .masks import random_mask

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError, EOFError)


# --------------------------------------------------------------------------- records


@dataclass
class Record:
    """One training image and its caption (None: no caption was found)."""

    source: str  # the image file, or the .tar shard holding it
    key: str  # how reports name it: the path, or shard:member
    caption: str | None
    offset: int = -1  # tar members: byte range of the image in the shard
    size: int = 0
    width: int = 0  # 0 = not known yet
    height: int = 0
    masks: list = field(default_factory=list)  # object mask files (imagefolder only)

    def read_bytes(self) -> bytes:
        with open(self.source, "rb") as f:
            if self.offset >= 0:
                f.seek(self.offset)
                return f.read(self.size)
            return f.read()

    def open(self) -> PIL.Image.Image:
        """The image, EXIF-rotated, as 8-bit RGB (decoded now, so corrupt data raises here)."""
        with PIL.Image.open(io.BytesIO(self.read_bytes())) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = PIL.Image.fromarray((np.asarray(im, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
            return im.convert("RGB")


@dataclass
class ScanReport:
    """What a scan found: usable records and what was left out, by reason."""

    records: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)  # keys of images whose header could not be read
    missing_captions: int = 0
    too_small: list = field(default_factory=list)  # stage 2: images under the minimum side
    missing_files: list = field(default_factory=list)  # metadata lines naming absent files


def _read_caption_file(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else None


def _records_from_metadata(meta: Path, report: ScanReport) -> list:
    records = []
    folder = meta.parent
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}:{number} is not a JSON line: {err}") from None
        if "file_name" not in row:
            raise ValueError(f"{meta}:{number} has no file_name")
        path = folder / row["file_name"]
        if not path.is_file():
            report.missing_files.append(str(path))
            continue
        caption = row.get("text", row.get("caption"))
        masks = row.get("mask_file_name") or []
        masks = [str(folder / m) for m in ([masks] if isinstance(masks, str) else masks)]
        records.append(
            Record(
                str(path),
                str(path),
                caption,
                width=int(row.get("width", 0) or 0),
                height=int(row.get("height", 0) or 0),
                masks=masks,
            )
        )
    return records


def _records_from_tar(shard: Path) -> list:
    """Group a webdataset shard's members by key (the name up to the first dot)."""
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            sample = samples.setdefault(key, {})
            ext = ext.lower()
            if ext in TAR_IMAGE_SUFFIXES:
                sample["image"] = (member.offset_data, member.size, member.name)
            elif ext == "txt":
                sample["caption"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
            elif ext == "json":
                try:
                    info = json.loads(tar.extractfile(member).read())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    info = {}
                if isinstance(info, dict):
                    if "caption" not in sample and (info.get("text") or info.get("caption")):
                        sample["caption"] = info.get("text") or info.get("caption")
                    sample["width"], sample["height"] = int(info.get("width", 0) or 0), int(info.get("height", 0) or 0)
    records = []
    for key in sorted(samples):
        sample = samples[key]
        if "image" not in sample:
            continue
        offset, size, name = sample["image"]
        records.append(
            Record(
                str(shard),
                f"{shard}:{name}",
                sample.get("caption"),
                offset=offset,
                size=size,
                width=sample.get("width", 0),
                height=sample.get("height", 0),
            )
        )
    return records


def find_records(root) -> ScanReport:
    """All records under `root` (a folder or a .tar shard), in a fixed order; sizes not read yet."""
    root = Path(root)
    report = ScanReport()
    if not root.exists():
        raise FileNotFoundError(f"data {root} does not exist")
    if root.is_file():
        if root.suffix != ".tar":
            raise ValueError(f"data {root} must be a folder or a .tar shard")
        report.records = _records_from_tar(root)
        return report
    metas = sorted(root.rglob("metadata.jsonl"))
    records = []
    for meta in metas:
        records += _records_from_metadata(meta, report)
    if not metas:
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            records.append(Record(str(path), str(path), _read_caption_file(path.with_suffix(".txt"))))
    for shard in sorted(root.rglob("*.tar")):
        records += _records_from_tar(shard)
    report.records = records
    report.missing_captions = sum(r.caption is None for r in records)
    return report


def read_sizes(report: ScanReport, decode: bool = False) -> ScanReport:
    """Fill in every record's size from its header (or decode it all: `decode`); unreadable ones leave."""
    kept = []
    for record in report.records:
        if record.width and record.height and not decode:
            kept.append(record)
            continue
        try:
            if decode:
                record.width, record.height = record.open().size
            else:
                with PIL.Image.open(io.BytesIO(record.read_bytes())) as im:
                    record.width, record.height = im.size
                    # EXIF orientations that swap the sides; Pillow decodes a whole PNG to find its
                    # EXIF, so PNGs (rarely rotated) keep their stored sides and the scan stays fast
                    if im.format != "PNG" and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                        record.width, record.height = im.height, im.width
        except UNREADABLE_ERRORS:
            report.unreadable.append(record.key)
            continue
        kept.append(record)
    report.records = kept
    return report


def scan_dataset(root, min_side: int = 0, decode: bool = False) -> ScanReport:
    """Records with known sizes; those below `min_side` (shorter side) are left out as too small."""
    report = read_sizes(find_records(root), decode=decode)
    if min_side:
        small = [r for r in report.records if min(r.width, r.height) < min_side]
        report.too_small = [r.key for r in small]
        report.records = [r for r in report.records if min(r.width, r.height) >= min_side]
    return report


def check_dataset(root, native: int = 1024, decode: bool = True) -> dict:
    """Counts, sizes, missing captions and images too small for stage 2 (shorter side < 2 x native)."""
    report = scan_dataset(root, decode=decode)
    sides = np.array([min(r.width, r.height) for r in report.records]) if report.records else np.zeros(0)
    pixels = np.array([r.width * r.height for r in report.records]) if report.records else np.zeros(0)
    summary = {
        "images": len(report.records) + len(report.unreadable),
        "readable": len(report.records),
        "unreadable": len(report.unreadable),
        "unreadable_files": report.unreadable[:20],
        "missing_files": len(report.missing_files),
        "missing_captions": sum(r.caption is None for r in report.records),
        "empty_captions": sum(r.caption == "" for r in report.records),
        "with_object_masks": sum(bool(r.masks) for r in report.records),
        "shorter_side": (
            {"min": int(sides.min()), "median": int(np.median(sides)), "max": int(sides.max())} if len(sides) else {}
        ),
        "megapixels_median": round(float(np.median(pixels)) / 1e6, 3) if len(pixels) else 0.0,
        "stage1_usable": int((sides >= native // 2).sum()),
        "stage2_min_side": 2 * native,
        "stage2_usable": int((sides >= 2 * native).sum()),
        "too_small_for_stage2": int((sides < 2 * native).sum()),
    }
    return summary


# --------------------------------------------------------------------------- toy data


def make_toy_dataset(root, count: int = 8, size=256, seed: int = 0, captions: str = "metadata") -> Path:
    """Write `count` deterministic procedural scenes (PNG) and their captions.

    size: a side or (width, height); captions: "metadata" (metadata.jsonl) or
    "sidecar" (.txt next to each image). For tests and the README's quick start.
    """
    from PIL import ImageDraw

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    width, height = (size, size) if isinstance(size, int) else size
    colors = {
        "red": (200, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 70, 200),
        "yellow": (230, 200, 40),
        "white": (235, 235, 235),
        "purple": (130, 50, 160),
    }
    names = list(colors)
    lines = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        sky, ground = rng.choice(["blue", "white", "purple"]), rng.choice(["green", "yellow", "red"])
        horizon = int(height * rng.uniform(0.4, 0.7))
        y = np.arange(height, dtype=np.float32)[:, None, None]
        top = np.array(colors[sky], np.float32) * (0.6 + 0.4 * y / height)
        bottom = np.array(colors[ground], np.float32) * (0.8 + 0.2 * np.sin(y / 3.0))
        pixels = np.where(y < horizon, top, bottom) * np.ones((1, width, 1), np.float32)
        pixels += rng.normal(0, 6, size=pixels.shape)  # fine grain, the detail stage 2 must keep
        im = PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        shapes = []
        for _ in range(int(rng.integers(1, 4))):
            color = names[int(rng.integers(0, len(names)))]
            kind = "circle" if rng.random() < 0.5 else "square"
            r = int(min(width, height) * rng.uniform(0.08, 0.2))
            cx, cy = int(rng.uniform(r, width - r)), int(rng.uniform(r, height - r))
            box = (cx - r, cy - r, cx + r, cy + r)
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colors[color])
            shapes.append(f"a {color} {kind}")
        text = f"{' and '.join(shapes)} in front of a {sky} sky over {ground} ground"
        name = f"scene_{i:04d}.png"
        im.save(root / name)
        if captions == "sidecar":
            (root / name).with_suffix(".txt").write_text(text)
        else:
            lines.append(json.dumps({"file_name": name, "text": text, "width": width, "height": height}))
    if captions != "sidecar":
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- buckets and batches


def make_buckets(native: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of at most native**2 pixels, sides multiples of `step`, aspect within bounds."""
    area = native * native
    buckets = set()
    for width in range(step, int(native * max_aspect) + step, step):
        height = max(step, int(area / width) // step * step)
        if 1 / max_aspect <= width / height <= max_aspect:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, purpose, ...), independent for every tuple."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class BatchStream:
    """The endless, deterministic stream of one process's batches.

    Epoch e shuffles each bucket's records with the seed (seed, e), cuts them into
    full batches (the last one wraps around), and shuffles the batches; process p of
    P takes every P-th one. A batch is a list of (record index, sample seed, bucket).
    `start` is the data position: micro-batches this process has already consumed,
    so a resumed run continues with the exact next batch without replaying any.
    accelerate's `BatchSamplerShard` shards the same way; we keep it here because of
    that exact, replay-free resume. `repeat` > 0 cycles through the first `repeat`
    batches only (the `overfit_batches` debugging mode).
    """

    def __init__(
        self,
        groups: dict,
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        start: int = 0,
        repeat: int = 0,
    ):
        self.groups = {b: list(v) for b, v in sorted(groups.items()) if v}
        if not self.groups:
            raise ValueError("no usable training images")
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.start = start
        self.repeat = repeat

    def epoch_batches(self, epoch: int) -> list:
        rng = np.random.default_rng([self.seed, 7, epoch])
        batches = []
        for bucket, indices in self.groups.items():
            order = rng.permutation(indices)
            count = -(-len(order) // self.batch_size)
            wrapped = np.resize(order, count * self.batch_size)  # repeats from the start to fill the last batch
            batches += [
                (bucket, wrapped[i * self.batch_size : (i + 1) * self.batch_size].tolist()) for i in range(count)
            ]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        while len(batches) < self.num_processes:
            batches += batches
        return batches[: len(batches) // self.num_processes * self.num_processes]

    def __iter__(self):
        position = self.start
        cache_epoch, batches = None, None
        while True:
            if batches is None:
                batches = self.epoch_batches(0)
            per_epoch = len(batches) // self.num_processes
            epoch, j = divmod(position % self.repeat if self.repeat else position, per_epoch)
            if epoch != cache_epoch:
                batches, cache_epoch = self.epoch_batches(epoch), epoch
            number = j * self.num_processes + self.process_index
            bucket, indices = batches[number]
            yield [(index, sample_seed(self.seed, 11, epoch, number, k), bucket) for k, index in enumerate(indices)]
            position += 1


# --------------------------------------------------------------------------- samples


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) float blurred with a separable Gaussian (edges replicated)."""
    if sigma <= 0:
        return pixels
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = pixels
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
    return out.astype(np.float32)


def synthesize_reference(image: np.ndarray, box: tuple, native: int, rng: np.random.Generator, config) -> np.ndarray:
    """What stage 1 would give at `box` of `image` (H, W, 3) uint8: float (h, w, 3) in [0, 1].

    The whole image is downscaled to the native pixel count and upsampled back
    (bicubic, only inside the box), then degraded at random so that RPA learns to
    use the reference without copying it: a small misalignment, a blur, a colour
    shift (docs/method.md, stage 2 training, our choice).
    """
    from ..resampling import resize_image, sample_region

    height, width = image.shape[:2]
    low_w, low_h = native_dims(width, height, native)
    low = torch.from_numpy(resize_image(image, (low_h, low_w))).permute(2, 0, 1)[None]  # (1, 3, h, w)
    top, left, bottom, right = box
    if rng.random() < config.reference_shift:
        dy, dx = (int(v) for v in rng.integers(-config.reference_shift_pixels, config.reference_shift_pixels + 1, 2))
        top, left, bottom, right = top + dy, left + dx, bottom + dy, right + dx
    reference = sample_region(low, (height, width), (top, left, bottom, right))
    if rng.random() < config.reference_blur:
        reference = gaussian_blur(reference, float(rng.uniform(0.3, config.reference_blur_sigma)))
    if rng.random() < config.reference_color:
        s = config.reference_color_strength
        gain = 1 + rng.uniform(-s, s, size=3)
        offset = rng.uniform(-s, s, size=3)
        reference = reference * gain.astype(np.float32) + offset.astype(np.float32)
    return np.clip(reference, 0, 1).astype(np.float32)


def _to_model(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float [0, 1] or uint8 -> (3, H, W) float32 in [-1, 1]."""
    if pixels.dtype == np.uint8:
        pixels = to_float(pixels)
    return to_model_range(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float())


class TrainingData(torch.utils.data.Dataset):
    """Samples for one stage. Indexed by (record index, sample seed, bucket), from a BatchStream.

    A sample: ``pixels`` (3, H, W) in [-1, 1], ``mask`` (1, H, W) (1 = fill), ``caption``
    ("" when dropped for classifier-free guidance), ``reference`` (stage 2: (3, H, W)
    in [-1, 1], the degraded stage-1 look inside the mask, the original outside),
    ``skipped`` (keys of records that failed to decode and were replaced).
    """

    def __init__(self, records: list, config, native: int):
        self.records = records
        self.config = config
        self.native = native

    def __len__(self):
        return len(self.records)

    def load(self, index: int):
        """The record's image, or the next readable one; returns (image, record, skipped keys)."""
        skipped = []
        for attempt in range(min(len(self.records), 64)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return record.open(), record, skipped
            except UNREADABLE_ERRORS:
                skipped.append(record.key)
        raise RuntimeError(f"64 images in a row could not be decoded (first: {skipped[0]}); is the data corrupt?")

    def object_masks(self, record, image_size) -> list:
        masks = []
        for path in record.masks:
            try:
                with PIL.Image.open(path) as im:
                    m = im.convert("L")
                    if m.size != image_size:
                        m = m.resize(image_size, PIL.Image.Resampling.NEAREST)
                    masks.append(np.asarray(m) > 127)
            except UNREADABLE_ERRORS:
                continue
        return masks

    def __getitem__(self, item):
        index, seed, bucket = item
        rng = np.random.default_rng(seed)
        image, record, skipped = self.load(index)
        objects = self.object_masks(record, image.size) if record.masks else []
        if self.config.stage == "stage1":
            sample = self.stage1_sample(image, objects, bucket, rng)
        else:
            sample = self.stage2_sample(image, objects, rng)
        caption = record.caption or ""
        sample["caption"] = "" if rng.random() < self.config.caption_dropout else caption
        sample["skipped"] = skipped
        return sample

    def _masks_and_flip(self, pixels, objects, rng, extra=None):
        height, width = pixels.shape[:2]
        mask, _ = random_mask(rng, height, width, self.config.mask_mix, objects)
        if self.config.random_flip and rng.random() < 0.5:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]
            extra = extra[:, ::-1] if extra is not None else None
        return pixels, mask, extra

    def stage1_sample(self, image, objects, bucket, rng) -> dict:
        """Resize to cover the bucket, random crop to it (object masks follow)."""
        bw, bh = bucket
        scale = max(bw / image.width, bh / image.height)
        size = (max(bw, round(image.width * scale)), max(bh, round(image.height * scale)))
        image = image.resize(size, PIL.Image.Resampling.LANCZOS)
        top = int(rng.integers(0, size[1] - bh + 1))
        left = int(rng.integers(0, size[0] - bw + 1))
        pixels = np.asarray(image)[top : top + bh, left : left + bw]
        objects = [
            np.asarray(PIL.Image.fromarray(m).resize(size, PIL.Image.Resampling.NEAREST))[
                top : top + bh, left : left + bw
            ]
            for m in objects
        ]
        pixels, mask, _ = self._masks_and_flip(pixels, objects, rng)
        return {"pixels": _to_model(pixels), "mask": torch.from_numpy(mask.astype(np.float32)[None].copy())}

    def stage2_sample(self, image, objects, rng) -> dict:
        """A native-size crop at full resolution and its synthesised reference."""
        n = self.native
        full = np.asarray(image)
        height, width = full.shape[:2]
        top = int(rng.integers(0, height - n + 1))
        left = int(rng.integers(0, width - n + 1))
        crop = full[top : top + n, left : left + n]
        objects = [m[top : top + n, left : left + n] for m in objects]
        reference = synthesize_reference(full, (top, left, top + n, left + n), n, rng, self.config)
        crop, mask, reference = self._masks_and_flip(crop, objects, rng, reference)
        original = to_float(crop)
        reference = np.where(mask[..., None], reference, original)  # the original outside the mask, as at inference
        return {
            "pixels": _to_model(original),
            "mask": torch.from_numpy(mask.astype(np.float32)[None].copy()),
            "reference": _to_model(reference),
        }


def collate(samples: list) -> dict:
    batch = {"caption": [s["caption"] for s in samples], "skipped": [k for s in samples for k in s["skipped"]]}
    for key in ("pixels", "mask", "reference"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


def group_by_bucket(records: list, config, native: int) -> tuple[dict, list]:
    """Stage 1: record indices by aspect bucket; stage 2: one group (native x native crops)."""
    if config.stage == "stage2":
        return {(native, native): list(range(len(records)))}, [(native, native)]
    side = config.resolution or native
    step = config.bucket_step or max(32, native // 16)
    buckets = make_buckets(side, step, config.max_aspect)
    groups: dict = {}
    for i, r in enumerate(records):
        groups.setdefault(nearest_bucket(r.width, r.height, buckets), []).append(i)
    return groups, buckets
