"""Every kind of file Pillow, tifffile and a hand-made PNG encoder write comes back exactly.

A generated corpus of mode x format x bit depth x orientation x layout: each file is written
from known pixels, and ``load_image`` must return those pixels (turned upright by Pillow's
own transpose, an implementation independent of ours) bit for bit, alpha included, or
refuse the file with a reason. Lossy JPEG is compared with Pillow's decode instead.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from patch_adapter.image_io import ImageInputError, load_image, load_mask, read_image_size

RNG = np.random.default_rng(7)
HEIGHT, WIDTH = 20, 36  # not square, so a missing or doubled 90-degree turn shows
ORIENTATIONS = range(1, 9)
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(plane: np.ndarray, orientation: int) -> np.ndarray:
    """One (H, W) plane as a viewer shows it, turned by Pillow (not by patch_adapter)."""
    if orientation == 1:
        return plane
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane)).transpose(TRANSPOSE[orientation])).astype(
        plane.dtype
    )


def expected(rgb: np.ndarray, alpha: np.ndarray | None, orientation: int):
    channels = [upright(np.ascontiguousarray(rgb[:, :, c]), orientation) for c in range(3)]
    return np.stack(channels, axis=2), None if alpha is None else upright(alpha, orientation)


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def values(dtype, *shape):
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)


def assert_loads_as(path, rgb, alpha, orientation=1):
    image = load_image(path)
    assert read_image_size(path) == image.size  # planning from the header agrees
    want_rgb, want_alpha = expected(rgb, alpha, orientation)
    assert image.pixels.dtype == rgb.dtype
    np.testing.assert_array_equal(image.pixels, want_rgb)
    if want_alpha is None:
        assert image.alpha is None
    else:
        assert image.alpha is not None, "transparency was dropped"
        np.testing.assert_array_equal(image.alpha, want_alpha)


# --------------------------------------------------------------------------- 8 bit, Pillow


def pillow_source(mode: str):
    """A PIL image of `mode` and the RGB + alpha it must load as (from Pillow's own convert)."""
    if mode == "P":
        im = Image.fromarray(values(np.uint8, HEIGHT, WIDTH) % 16, "L").convert("P")
        im.putpalette(values(np.uint8, 48).tolist())
    elif mode == "1":
        im = Image.fromarray(values(np.uint8, HEIGHT, WIDTH) > 127)
    else:
        bands = Image.getmodebands(mode)
        im = Image.fromarray(values(np.uint8, HEIGHT, WIDTH, bands).squeeze(), mode)
    rgba = np.asarray(im.convert("RGBA"))
    has_alpha = "A" in mode
    return im, rgba[:, :, :3].copy(), (rgba[:, :, 3].copy() if has_alpha else None)


PNG8 = ["1", "L", "LA", "P", "RGB", "RGBA"]
TIFF8 = ["1", "L", "LA", "P", "RGB", "RGBA"]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("mode", PNG8)
def test_png_8bit(tmp_path, mode, orientation):
    im, rgb, alpha = pillow_source(mode)
    path = tmp_path / "x.png"
    im.save(path, exif=exif_bytes(orientation))
    assert_loads_as(path, rgb, alpha, orientation)


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_png_8bit_trns_colour_becomes_alpha(tmp_path, mode):
    im, rgb, _ = pillow_source(mode)
    key = im.getpixel((3, 2))
    path = tmp_path / "t.png"
    im.save(path, transparency=key)
    stored = np.asarray(im)
    hit = stored == key if stored.ndim == 2 else np.all(stored == key, axis=2)
    assert_loads_as(path, rgb, np.where(hit, 0, 255).astype(np.uint8))


def test_png_palette_with_an_alpha_per_entry(tmp_path):
    im, rgb, _ = pillow_source("P")
    levels = bytes(range(0, 256, 17))  # 16 entries, 16 alpha levels
    path = tmp_path / "p.png"
    im.save(path, transparency=levels)
    alpha = np.frombuffer(levels, np.uint8)[np.asarray(im)]
    assert_loads_as(path, rgb, alpha)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_webp_lossless(tmp_path, mode, orientation):
    im, rgb, alpha = pillow_source(mode)
    path = tmp_path / "x.webp"
    im.save(path, lossless=True, exact=True, exif=exif_bytes(orientation))
    assert_loads_as(path, rgb, alpha, orientation)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("compression", ["raw", "tiff_lzw", "tiff_adobe_deflate"])
@pytest.mark.parametrize("mode", TIFF8)
def test_tiff_8bit(tmp_path, mode, compression, orientation):
    im, rgb, alpha = pillow_source(mode)
    path = tmp_path / "x.tif"
    im.save(path, compression=compression, tiffinfo={0x0112: orientation})
    assert_loads_as(path, rgb, alpha, orientation)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_matches_pillows_decode(tmp_path, mode, orientation):
    im, _, _ = pillow_source(mode)
    path = tmp_path / "x.jpg"
    im.save(path, exif=exif_bytes(orientation), quality=90)
    with Image.open(path) as ref:
        decoded = np.asarray(ref.convert("RGB"))
    assert_loads_as(path, decoded, None, orientation)


# --------------------------------------------------------------------------- 16-bit PNG


def png_file(path, data: np.ndarray, colour_type: int, chunks: bytes = b"", late: bytes = b"") -> None:
    """A PNG written by hand (filter 0 rows): an encoder independent of libpng and Pillow.

    `chunks` go before the image data, `late` after it (where eXIf may legally be).
    """
    height, width = data.shape[:2]
    depth = 16 if data.dtype == np.uint16 else 8
    rows = data.astype(">u2" if depth == 16 else "u1").reshape(height, -1).tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunks
        + chunk(b"IDAT", zlib.compress(raw))
        + late
        + chunk(b"IEND", b"")
    )


def exif_chunk(orientation):
    body = exif_bytes(orientation)
    body = body[6:] if body.startswith(b"Exif\x00\x00") else body
    return struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))


PNG16 = {  # colour type: (channels, has alpha)
    0: (1, False),  # grey
    2: (3, False),  # RGB
    4: (2, True),  # grey + alpha
    6: (4, True),  # RGBA
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("colour_type", sorted(PNG16))
def test_png_16bit(tmp_path, colour_type, orientation):
    channels, has_alpha = PNG16[colour_type]
    data = values(np.uint16, HEIGHT, WIDTH, channels)
    path = tmp_path / "x.png"
    png_file(path, data, colour_type, exif_chunk(orientation) if orientation > 1 else b"")
    colours = channels - 1 if has_alpha else channels
    rgb = np.repeat(data[:, :, :1], 3, axis=2) if colours == 1 else data[:, :, :3]
    assert_loads_as(path, rgb, data[:, :, -1] if has_alpha else None, orientation)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_exif_after_the_image_data_is_applied_once(tmp_path, dtype):
    data = values(dtype, HEIGHT, WIDTH, 3)
    path = tmp_path / "late.png"
    png_file(path, data, 2, late=exif_chunk(6))
    assert_loads_as(path, data, None, 6)
    assert read_image_size(path) == (HEIGHT, WIDTH)  # turned, from the header alone


@pytest.mark.parametrize("colour_type", [0, 2])
def test_png_16bit_trns_colour_becomes_alpha(tmp_path, colour_type):
    channels = PNG16[colour_type][0]
    data = values(np.uint16, HEIGHT, WIDTH, channels)
    key = data[2, 3].copy()
    data[5:9, 10:20] = key
    path = tmp_path / "t.png"
    png_file(path, data, colour_type, _chunk(b"tRNS", key.astype(">u2").tobytes()))
    alpha = np.where(np.all(data == key, axis=2), 0, 65535).astype(np.uint16)
    rgb = np.repeat(data, 3, axis=2) if channels == 1 else data
    assert_loads_as(path, rgb, alpha)
    # the tRNS colour is a valid mask source too
    np.testing.assert_array_equal(load_mask(None, load_image(path)), alpha == 0)


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --------------------------------------------------------------------------- 16-bit TIFF


TIFF_LAYOUTS = {
    "contig-strips": {"planarconfig": "contig", "rowsperstrip": 3},
    "planar-strips": {"planarconfig": "separate", "rowsperstrip": 3},
    "planar-tiles": {"planarconfig": "separate", "tile": (16, 16)},
    "contig-lzw": {"planarconfig": "contig", "compression": "lzw"},
    "planar-deflate-predictor": {"planarconfig": "separate", "compression": "zlib", "predictor": True},
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("layout", sorted(TIFF_LAYOUTS))
@pytest.mark.parametrize("kind", ["grey", "grey+alpha", "rgb", "rgba"])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_tiff_tifffile(tmp_path, kind, layout, orientation, dtype):
    channels = {"grey": 1, "grey+alpha": 2, "rgb": 3, "rgba": 4}[kind]
    data = values(dtype, HEIGHT, WIDTH, channels)
    options = dict(TIFF_LAYOUTS[layout])
    stored = np.moveaxis(data, 2, 0) if options["planarconfig"] == "separate" else data
    if channels == 1:
        stored = data[:, :, 0]
        options.pop("planarconfig")
    path = tmp_path / "x.tif"
    tifffile.imwrite(
        path,
        stored,
        photometric="minisblack" if channels < 3 else "rgb",
        extrasamples=[2] if channels in (2, 4) else None,
        extratags=[(0x0112, "H", 1, orientation, True)],
        **options,
    )
    has_alpha = channels in (2, 4)
    colours = data[:, :, : channels - has_alpha]
    rgb = np.repeat(colours, 3, axis=2) if colours.shape[2] == 1 else colours
    assert_loads_as(path, rgb, data[:, :, -1] if has_alpha else None, orientation)


# --------------------------------------------------------------------------- refusals


def test_refused_files_name_the_problem(tmp_path):
    rgb = values(np.uint8, HEIGHT, WIDTH, 3)
    cases = {}
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    for name, options in {"anim.png": {}, "anim.webp": {"lossless": True}, "pages.tif": {}}.items():
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **options)
        cases[name] = "frames|animated|pages"
    deep = [Image.fromarray(np.full((8, 8), v, np.uint16)) for v in (1000, 60000)]
    deep[0].save(tmp_path / "anim16.png", save_all=True, append_images=deep[1:])
    cases["anim16.png"] = "animated PNG"
    tifffile.imwrite(tmp_path / "premultiplied.tif", values(np.uint8, 8, 8, 4), photometric="rgb", extrasamples=[1])
    cases["premultiplied.tif"] = "premultiplied"
    tifffile.imwrite(tmp_path / "unspecified.tif", values(np.uint16, 8, 8, 4), photometric="rgb", extrasamples=[0])
    cases["unspecified.tif"] = "no declared meaning"
    tifffile.imwrite(tmp_path / "float.tif", RNG.random((8, 8, 3), dtype=np.float32), photometric="rgb")
    cases["float.tif"] = "bits per channel|floating"
    tifffile.imwrite(tmp_path / "signed.tif", values(np.uint16, 8, 8, 3).astype(np.int16), photometric="rgb")
    cases["signed.tif"] = "signed"
    for name, message in cases.items():
        with pytest.raises(ImageInputError, match=message):
            load_image(tmp_path / name)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_cmyk_tiff_matches_pillow_or_is_refused(tmp_path, compression, orientation):
    """CMYK goes through Pillow, whose uncompressed TIFF reader scrambles orientations 5-8."""
    cmyk = values(np.uint8, HEIGHT, WIDTH, 4)
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(
        path, cmyk, photometric="separated", compression=compression, extratags=[(0x0112, "H", 1, orientation, True)]
    )
    rgb = np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB"))
    if compression is None and orientation >= 5:
        with pytest.raises(ImageInputError, match="scrambled"):
            load_image(path)
    else:
        assert_loads_as(path, rgb, None, orientation)


def test_mpo_first_frame_is_the_picture(tmp_path):
    rgb = values(np.uint8, 32, 48, 3)
    path = tmp_path / "camera.mpo"
    Image.fromarray(rgb).save(path, "MPO", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    with Image.open(path) as ref:
        assert ref.format == "MPO" and ref.n_frames == 2
        first = np.asarray(ref.convert("RGB"))
    np.testing.assert_array_equal(load_image(path).pixels, first)


@pytest.mark.parametrize("name", ["x.tif", "x.png", "x16.png"])
def test_damaged_files_are_refused_never_crash(tmp_path, name):
    """Flipped bytes anywhere: a decoded picture or an ImageInputError, never another exception."""
    source = tmp_path / name
    if name == "x.tif":
        tifffile.imwrite(
            source, values(np.uint16, HEIGHT, WIDTH, 3), photometric="rgb", planarconfig="separate", compression="zlib"
        )
    elif name == "x.png":
        Image.fromarray(values(np.uint8, HEIGHT, WIDTH, 4)).save(source)
    else:
        png_file(source, values(np.uint16, HEIGHT, WIDTH, 3), 2)
    good = source.read_bytes()
    rng = np.random.default_rng(11)
    for trial in range(25):
        data = bytearray(good)
        for at in rng.integers(0, len(data), size=3):
            data[at] = int(rng.integers(0, 256))
        damaged = tmp_path / f"damaged{trial}{source.suffix}"
        damaged.write_bytes(bytes(data))
        for read in (load_image, read_image_size):
            try:
                read(damaged)
            except ImageInputError:
                pass
