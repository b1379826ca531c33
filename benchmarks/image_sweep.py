"""Load every picture of a folder with ``load_image`` and compare it with Pillow's own decode.

Meant for Pillow's test images (``Tests/images`` of a Pillow checkout: fuzzed, truncated,
animated and odd files among ordinary ones):

    python benchmarks/image_sweep.py path/to/Pillow/Tests/images

Each file is counted once: exact (the same pixels and alpha as Pillow, upright), refused
(an ImageInputError, with its reason), crash (any other exception: a bug), differs (a
bug here or in Pillow: listed), or not compared (16-bit colour, which Pillow reads as 8 bit;
32-bit modes). Pillow's tRNS colour of a 16-bit grey PNG is turned into alpha here too.
"""

from __future__ import annotations

import argparse
import collections
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from patch_adapter.image_io import ImageInputError, load_image

SUFFIXES = {".png", ".apng", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".mpo"}


def pillow_decode(path: Path):
    """(rgb, alpha) as Pillow decodes the file, upright; None where Pillow keeps more than 8 bits."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16"):
            grey = np.asarray(im).astype(np.uint16)
            key = im.info.get("transparency")
            alpha = None if key is None else np.where(grey == key, 0, 65535).astype(np.uint16)
            return np.repeat(grey[:, :, None], 3, axis=2), alpha
        if im.mode in ("I", "F"):
            return None
        if im.has_transparency_data:
            rgba = np.asarray(im.convert("RGBA"))
            return rgba[:, :, :3], rgba[:, :, 3]
        return np.asarray(im.convert("RGB")), None


def classify(path: Path) -> tuple[str, str]:
    try:
        loaded = load_image(path)
    except ImageInputError as exc:
        return "refused", str(exc).replace(str(path), "FILE")
    except Exception as exc:  # noqa: BLE001 - a crash is what this sweep looks for
        return "crash", f"{type(exc).__name__}: {exc}"
    try:
        reference = pillow_decode(path)
    except Exception:  # noqa: BLE001 - Pillow cannot read what tifffile can (16-bit LA)
        reference = None
    if reference is None or (loaded.bit_depth == 16 and reference[0].dtype != np.uint16):
        return "not compared", ""
    rgb, alpha = reference
    same = rgb.shape == loaded.pixels.shape and np.array_equal(rgb, loaded.pixels)
    same_alpha = (alpha is None) == (loaded.alpha is None) and (alpha is None or np.array_equal(alpha, loaded.alpha))
    if same and same_alpha:
        return "exact", ""
    return "differs", f"{'colour' if not same else ''} {'alpha' if not same_alpha else ''}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("tifffile").setLevel(logging.ERROR + 10)  # damaged files are the point
    results = collections.defaultdict(list)
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    for path in files:
        kind, why = classify(path)
        results[kind].append((path.name, why))
    print(f"{len(files)} files: " + ", ".join(f"{len(v)} {k}" for k, v in sorted(results.items())))
    for kind in ("crash", "differs"):
        for name, why in results.get(kind, []):
            print(f"  {kind}: {name}: {why}")
    reasons = collections.Counter(why.split(";")[0][:80] for _, why in results.get("refused", []))
    for why, count in reasons.most_common():
        print(f"  refused x{count}: {why}")


if __name__ == "__main__":
    main()
