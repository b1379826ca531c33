"""Tests for patch_adapter.image_io: small images made on the fly, no big files."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from patch_adapter import image_io
from patch_adapter.image_io import (
    MAX_IMAGE_PIXELS,
    ImageInputError,
    LoadedImage,
    MaskSizeError,
    atomic_write,
    check_image_size,
    from_float,
    from_model_range,
    load_image,
    load_mask,
    read_image_size,
    read_metadata,
    save_image,
    to_float,
    to_model_range,
)

RNG = np.random.default_rng(1234)


def random_rgb(height: int, width: int, dtype=np.uint8) -> np.ndarray:
    high = np.iinfo(dtype).max
    return RNG.integers(0, high, size=(height, width, 3), dtype=dtype, endpoint=True)


def blocky_rgb(height: int = 32, width: int = 48) -> np.ndarray:
    """Flat 16x16 blocks: survives JPEG almost unchanged, so values can be compared."""
    blocks = RNG.integers(0, 256, size=(height // 16, width // 16, 3)).astype(np.uint8)
    return np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def loaded(pixels: np.ndarray, alpha: np.ndarray | None = None) -> LoadedImage:
    return LoadedImage(pixels=pixels, alpha=alpha, path=None, format=None, icc_profile=None)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "suffix, save_options, exact",
    [
        (".png", {}, True),
        (".tif", {}, True),
        (".webp", {"lossless": True}, True),
        (".jpg", {"quality": 95}, False),
    ],
)
def test_load_8bit_formats(tmp_path, suffix, save_options, exact):
    pixels = blocky_rgb()
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path, **save_options)

    image = load_image(path)

    assert image.pixels.dtype == np.uint8
    assert image.pixels.shape == (32, 48, 3)
    assert image.size == (48, 32)
    assert (image.bit_depth, image.max_value) == (8, 255)
    assert image.alpha is None
    assert image.path == str(path)
    if exact:
        np.testing.assert_array_equal(image.pixels, pixels)
    else:
        assert np.abs(image.pixels.astype(int) - pixels).mean() < 3


def test_loaded_pixels_are_writable(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(blocky_rgb()).save(path)
    image = load_image(path)
    image.pixels[0, 0] = 0  # the pipeline edits in place; a read-only buffer would fail here
    assert image.pixels.flags.writeable


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgb_round_trip_is_bit_exact(tmp_path, suffix):
    pixels = random_rgb(20, 30, np.uint16)
    pixels[0, 0] = (0, 65535, 1)  # extremes, and a value 8 bits would lose
    path = tmp_path / f"deep{suffix}"

    save_image(path, pixels)
    image = load_image(path)

    assert image.pixels.dtype == np.uint16
    assert image.bit_depth == 16 and image.max_value == 65535
    np.testing.assert_array_equal(image.pixels, pixels)


def test_16bit_rgba_png_keeps_alpha(tmp_path):
    rgba = RNG.integers(0, 65536, size=(10, 12, 4), dtype=np.uint16)
    path = tmp_path / "deep_alpha.png"

    save_image(path, rgba)
    image = load_image(path)

    np.testing.assert_array_equal(image.pixels, rgba[:, :, :3])
    np.testing.assert_array_equal(image.alpha, rgba[:, :, 3])


def test_16bit_grey_png_becomes_16bit_rgb(tmp_path):
    grey = RNG.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)  # Pillow writes mode I;16

    image = load_image(path)

    assert image.pixels.dtype == np.uint16
    for channel in range(3):
        np.testing.assert_array_equal(image.pixels[:, :, channel], grey)


def test_palette_with_transparency_gives_alpha(tmp_path):
    index = np.zeros((6, 8), dtype=np.uint8)
    index[:, 4:] = 1
    im = Image.fromarray(index, "P")
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    path = tmp_path / "palette.png"
    im.save(path, transparency=1)

    image = load_image(path)

    np.testing.assert_array_equal(image.pixels[0, 0], (255, 0, 0))
    assert image.alpha is not None
    assert (image.alpha[:, :4] == 255).all() and (image.alpha[:, 4:] == 0).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(path)  # pure red in ink terms

    image = load_image(path)

    assert image.pixels.shape == (8, 16, 3)
    red, green, blue = image.pixels[4, 8].astype(int)
    assert red > 200 and green < 50 and blue < 50


def test_exif_orientation_6_rotates_jpeg(tmp_path):
    # Left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to view".
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)

    image = load_image(path)

    assert image.pixels.shape == (64, 32, 3)  # width and height swapped
    assert image.pixels[8, 16, 0] > 200 and image.pixels[8, 16, 2] < 50  # top was left: red
    assert image.pixels[56, 16, 2] > 200 and image.pixels[56, 16, 0] < 50  # bottom: blue
    assert read_image_size(path) == (32, 64)


def test_exif_orientation_applied_to_16bit_png(tmp_path):
    """OpenCV's IMREAD_UNCHANGED ignores EXIF: the loader must rotate, exactly once."""
    pixels = random_rgb(6, 10, np.uint16)
    path = tmp_path / "deep_rotated.png"
    save_image(path, pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_payload = exif.tobytes()[len(b"Exif\x00\x00") :]
    data = path.read_bytes()
    path.write_bytes(data[:33] + png_chunk(b"eXIf", exif_payload) + data[33:])

    image = load_image(path)

    np.testing.assert_array_equal(image.pixels, np.rot90(pixels, -1))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_pillow(orientation):
    pixels = random_rgb(5, 7)
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(im))

    np.testing.assert_array_equal(image_io._apply_orientation(pixels, orientation), expected)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_not_an_image_is_an_input_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not pixels")
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(path)


def test_folder_is_an_input_error(tmp_path):
    with pytest.raises(ImageInputError, match="folder"):
        load_image(tmp_path)


def test_unsupported_format_is_an_input_error(tmp_path):
    path = tmp_path / "anim.gif"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ImageInputError, match="GIF"):
        load_image(path)


def test_truncated_file_is_an_input_error(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(random_rgb(64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageInputError, match="could not be decoded"):
        load_image(path)


# --------------------------------------------------------------------------- size guard


def test_max_pixels_guard_refuses_before_decoding(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(random_rgb(100, 100)).save(path)

    with pytest.raises(ImageInputError) as info:
        load_image(path, max_pixels=5000)

    message = str(info.value)
    assert "100x100" in message and "5,000" in message and "max_pixels=" in message
    assert load_image(path, max_pixels=10_000).size == (100, 100)  # exactly at the limit


def test_pillow_bomb_error_becomes_input_error_and_limit_is_restored(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(random_rgb(100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow errors above 2x = 2000

    with pytest.raises(ImageInputError, match="max_pixels="):
        load_image(path, max_pixels=2000)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_load_raises_pillow_limit_only_temporarily(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(random_rgb(8, 8)).save(path)
    before = Image.MAX_IMAGE_PIXELS
    load_image(path)
    assert Image.MAX_IMAGE_PIXELS == before


def test_check_image_size_admits_16k_and_refuses_larger():
    assert MAX_IMAGE_PIXELS == 300_000_000
    check_image_size(16384, 16384)  # 268M pixels: must not raise
    with pytest.raises(ImageInputError, match="20000x20000"):
        check_image_size(20000, 20000)


def test_16k_png_header_passes_the_guard_without_decoding(tmp_path):
    """A header-only PNG claiming 16384x16384: Pillow's own default limit would refuse it."""
    ihdr = struct.pack(">IIBBBBB", 16384, 16384, 8, 2, 0, 0, 0)
    path = tmp_path / "huge_header.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b""))

    assert read_image_size(path) == (16384, 16384)
    with pytest.raises(ImageInputError, match="16384x16384"):
        read_image_size(path, max_pixels=16384 * 16384 - 1)


# --------------------------------------------------------------------------- masks


def test_alpha_becomes_mask_transparent_is_fill():
    alpha = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    image = loaded(np.zeros((1, 4, 3), np.uint8), alpha)

    np.testing.assert_array_equal(load_mask(None, image), [[True, True, False, False]])


def test_alpha_mask_from_rgba_png(tmp_path):
    rgba = np.full((8, 8, 4), 255, dtype=np.uint8)
    rgba[2:5, 3:6, 3] = 0
    path = tmp_path / "erased.png"
    Image.fromarray(rgba, "RGBA").save(path)

    mask = load_mask(None, load_image(path))

    expected = np.zeros((8, 8), bool)
    expected[2:5, 3:6] = True
    np.testing.assert_array_equal(mask, expected)


def test_no_alpha_and_no_mask_is_an_input_error():
    image = loaded(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ImageInputError, match="pass a mask"):
        load_mask(None, image)


def test_grey_mask_thresholds_at_exactly_50_percent(tmp_path):
    grey = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    path = tmp_path / "mask.png"
    Image.fromarray(grey, "L").save(path)
    image = loaded(np.zeros((1, 4, 3), np.uint8))

    np.testing.assert_array_equal(load_mask(path, image), [[False, False, True, True]])


def test_16bit_grey_mask_thresholds_at_50_percent(tmp_path):
    grey = np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "mask16.png"
    Image.fromarray(grey).save(path)
    image = loaded(np.zeros((1, 4, 3), np.uint8))

    np.testing.assert_array_equal(load_mask(path, image), [[False, False, True, True]])


def test_colour_mask_uses_luminance():
    rgb = np.array([[[255, 0, 0], [0, 255, 0]]], dtype=np.uint8)  # luminance 76 and 150
    image = loaded(np.zeros((1, 2, 3), np.uint8))

    np.testing.assert_array_equal(load_mask(Image.fromarray(rgb), image), [[False, True]])


def test_transparent_pixels_of_a_mask_file_are_keep(tmp_path):
    la = np.zeros((1, 3, 2), dtype=np.uint8)
    la[..., 0] = 255  # all white
    la[..., 1] = (255, 0, 1)  # opaque, fully transparent, barely visible
    path = tmp_path / "mask_alpha.png"
    Image.fromarray(la, "LA").save(path)
    image = loaded(np.zeros((1, 3, 3), np.uint8))

    np.testing.assert_array_equal(load_mask(path, image), [[True, False, True]])


def test_numpy_masks():
    image = loaded(np.zeros((1, 3, 3), np.uint8))
    floats = np.array([[0.4999, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(load_mask(floats, image), [[False, True, True]])
    bools = np.array([[True, False, True]])
    np.testing.assert_array_equal(load_mask(bools, image), bools)
    np.testing.assert_array_equal(load_mask(np.array([[127, 128, 0]], np.uint8), image), [[False, True, False]])
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        load_mask(np.array([[0.0, 2.0, 1.0]]), image)
    with pytest.raises(ImageInputError, match="astype"):
        load_mask(np.array([[0, 1, 1]], dtype=np.int64), image)


def test_mask_size_mismatch_names_both_sizes(tmp_path):
    path = tmp_path / "small_mask.png"
    Image.new("L", (100, 80), 255).save(path)
    image = loaded(np.zeros((160, 200, 3), np.uint8))

    with pytest.raises(MaskSizeError) as info:
        load_mask(path, image)

    assert isinstance(info.value, ImageInputError)
    message = str(info.value)
    assert "100x80" in message and "200x160" in message and "resize the mask" in message


def test_mask_file_exif_orientation_is_applied(tmp_path):
    grey = np.zeros((4, 6), dtype=np.uint8)
    grey[:, :3] = 255  # left half fill
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated_mask.jpg"
    Image.fromarray(grey, "L").save(path, exif=exif, quality=100)
    image = loaded(np.zeros((6, 4, 3), np.uint8))

    mask = load_mask(path, image)

    assert mask[:3].all() and not mask[3:].any()  # left became top


# --------------------------------------------------------------------------- floats


def test_float_round_trip_is_exact_for_every_value():
    for dtype in (np.uint8, np.uint16):
        values = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
        as_float = to_float(values)
        assert as_float.dtype == np.float32
        assert as_float.min() == 0.0 and as_float.max() == 1.0
        np.testing.assert_array_equal(from_float(as_float, dtype), values)


def test_from_float_clips_and_rounds_half_to_even():
    halves = np.array([0.5, 1.5, 2.5, 3.5]) / 255
    assert (halves * 255 == [0.5, 1.5, 2.5, 3.5]).all()  # precondition: exact halves
    np.testing.assert_array_equal(from_float(halves, np.uint8), [0, 2, 2, 4])
    clipped = from_float(np.array([-0.2, 1.3], dtype=np.float32), np.uint16)
    np.testing.assert_array_equal(clipped, [0, 65535])
    assert clipped.dtype == np.uint16
    with pytest.raises(ValueError, match="NaN"):
        from_float(np.array([np.nan]), np.uint8)


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".PNG"])
def test_save_then_load_8bit(tmp_path, suffix):
    pixels = blocky_rgb()
    path = tmp_path / "nested" / "folder" / f"out{suffix}"  # parent created on demand

    save_image(path, pixels)
    image = load_image(path)

    assert image.pixels.shape == pixels.shape
    if suffix.lower() in (".png", ".tif", ".tiff", ".webp"):  # WebP is written lossless
        np.testing.assert_array_equal(image.pixels, pixels)
    else:  # JPEG is lossy
        assert np.abs(image.pixels.astype(int) - pixels).mean() < 6


def test_save_embeds_icc_profile(tmp_path):
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, pixels in [("8.png", blocky_rgb()), ("16.png", random_rgb(4, 4, np.uint16))]:
        save_image(tmp_path / name, pixels, icc_profile=profile)
        assert load_image(tmp_path / name).icc_profile == profile


XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'


@pytest.mark.parametrize(
    "name, dtype, alpha",
    [
        ("8.png", np.uint8, True),
        ("16.png", np.uint16, True),
        ("8.webp", np.uint8, True),
        ("8.jpg", np.uint8, False),
        ("8.tif", np.uint8, True),
        ("16.tif", np.uint16, True),
    ],
)
def test_icc_exif_xmp_and_alpha_survive_a_round_trip(tmp_path, name, dtype, alpha):
    """The source's metadata goes back out, its orientation reset (the pixels are upright)."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "PatchCam"
    exif[0x0112] = 6
    pixels = random_rgb(6, 10, dtype)
    source = tmp_path / "source.png"
    png_exif = exif.tobytes()
    save_image(source, pixels, icc_profile=profile, exif=png_exif, xmp=XMP)
    loaded_source = load_image(source)  # turned upright by orientation 6
    assert loaded_source.size == (6, 10)
    channels = loaded_source.channels
    if alpha:
        channels = np.dstack([loaded_source.pixels, random_rgb(10, 6, dtype)[:, :, 0]])
    save_image(
        tmp_path / name, channels, icc_profile=loaded_source.icc_profile, exif=loaded_source.exif, xmp=loaded_source.xmp
    )
    with Image.open(tmp_path / name) as written:  # Pillow's reading, not ours
        written_exif = written.getexif()
    result = load_image(tmp_path / name)
    assert result.icc_profile == profile
    assert XMP in (result.xmp or b"")
    if not name.endswith(".tif"):  # TIFF keeps ICC and XMP; its EXIF is its own IFD
        assert written_exif.get(0x010F) == "PatchCam" and written_exif.get(0x0112, 1) == 1
    if name.endswith(".jpg"):
        return
    np.testing.assert_array_equal(result.channels, channels)


def test_a_mask_drawn_only_in_transparency_is_refused(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:5, 2:5, 3] = 255  # black but opaque: the user meant "this area"
    Image.fromarray(rgba).save(tmp_path / "mask.png")
    with pytest.raises(ImageInputError, match="only transparency"):
        load_mask(tmp_path / "mask.png", loaded(random_rgb(8, 8)))


def test_unknown_extension_lists_supported(tmp_path):
    with pytest.raises(ImageInputError, match=r"\.png.*\.tif"):
        save_image(tmp_path / "out.bmp", blocky_rgb())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_16bit_to_lossy_format_is_refused(tmp_path, suffix):
    with pytest.raises(ImageInputError, match=r"\.png or \.tif"):
        save_image(tmp_path / f"out{suffix}", random_rgb(4, 4, np.uint16))
    assert not list(tmp_path.iterdir())


def test_webp_side_limit_is_checked_before_writing(tmp_path):
    too_wide = np.zeros((1, 16384, 3), np.uint8)  # 16384 is the 16K target width
    with pytest.raises(ImageInputError, match="16383"):
        save_image(tmp_path / "out.webp", too_wide)
    assert not list(tmp_path.iterdir())


def test_save_refuses_float_pixels(tmp_path):
    with pytest.raises(ImageInputError, match="from_float"):
        save_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.float32))


def test_save_refuses_to_overwrite_protected_input(tmp_path):
    source = tmp_path / "input.png"
    Image.fromarray(blocky_rgb()).save(source)
    original = source.read_bytes()
    same_file_other_spelling = tmp_path / "sub" / ".." / "input.png"
    (tmp_path / "sub").mkdir()

    for target in (source, same_file_other_spelling):
        with pytest.raises(ImageInputError, match="refusing to overwrite the input"):
            save_image(target, random_rgb(32, 48), protect=[source])
    with pytest.raises(ImageInputError, match="overwrite_input=True"):
        save_image(source, random_rgb(32, 48), protect=str(source))  # a single path

    assert source.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png", "sub"]

    save_image(source, np.zeros((32, 48, 3), np.uint8), protect=[source], overwrite_input=True)
    assert (load_image(source).pixels == 0).all()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.png"
    save_image(path, blocky_rgb())
    save_image(path, random_rgb(32, 48))  # replace an existing file
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    save_image(path, blocky_rgb())
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(path, random_rgb(32, 48))

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, durable):
    path = tmp_path / "notes.bin"
    with atomic_write(str(path), durable=durable) as f:  # a str path is accepted too
        f.write(b"first")
    with pytest.raises(RuntimeError):
        with atomic_write(path, durable=durable) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.bin"]


def test_model_range_round_trip():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(to_model_range(x), x * 2 - 1)
    np.testing.assert_allclose(from_model_range(to_model_range(x)), x, atol=1e-7)
    np.testing.assert_array_equal(from_model_range(np.array([-3.0, 3.0])), [0.0, 1.0])  # clipped


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_metadata_round_trip(tmp_path, dtype):
    metadata = {"prompt": "a red fox, snow", "steps": 30, "seed": 7, "tiles": [1, 2]}
    path = tmp_path / "out.png"

    save_image(path, random_rgb(8, 8, dtype), metadata=metadata)

    assert read_metadata(path) == metadata
    with Image.open(path) as im:
        assert json.loads(im.info["patch_adapter"]) == metadata
        assert im.info["parameters"] == "prompt: a red fox, snow, steps: 30, seed: 7, tiles: [1, 2]"
    assert not (tmp_path / "out.png.json").exists()  # embedded, no sidecar
    np.testing.assert_array_equal(load_image(path).pixels.dtype, dtype)


def test_non_latin1_metadata_in_16bit_png(tmp_path):
    metadata = {"prompt": "桜の木 \u2014 cherry tree"}
    path = tmp_path / "out.png"
    save_image(path, random_rgb(4, 4, np.uint16), metadata=metadata)
    assert read_metadata(path) == metadata


def test_metadata_for_non_png_goes_to_sidecar(tmp_path):
    metadata = {"prompt": "a boat"}
    path = tmp_path / "out.jpg"
    save_image(path, blocky_rgb(), metadata=metadata)
    assert json.loads((tmp_path / "out.jpg.json").read_text()) == metadata
    assert read_metadata(path) == metadata


def test_read_metadata_without_metadata_is_empty(tmp_path):
    path = tmp_path / "plain.png"
    save_image(path, blocky_rgb())
    assert read_metadata(path) == {}


def test_a_grey_or_cmyk_profile_is_not_carried_onto_rgb_pixels(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    grey_profile = srgb[:16] + b"GRAY" + srgb[20:]  # the header's colour-space field
    Image.fromarray(random_rgb(4, 4)[:, :, 0]).save(tmp_path / "grey.png", icc_profile=grey_profile)
    Image.fromarray(random_rgb(4, 4)).save(tmp_path / "rgb.png", icc_profile=srgb)
    assert load_image(tmp_path / "grey.png").icc_profile is None
    assert load_image(tmp_path / "rgb.png").icc_profile == srgb


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_xmp_orientation_is_reset_with_the_pixels_upright(tmp_path, dtype):
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6" '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/"/></x:xmpmeta>'
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = random_rgb(4, 6, dtype)
    save_image(tmp_path / "x.png", pixels, exif=exif.tobytes(), xmp=xmp)
    image = load_image(tmp_path / "x.png")
    np.testing.assert_array_equal(image.pixels, np.rot90(pixels, -1))
    assert b'tiff:Orientation="6"' not in image.xmp  # reset (16 bit) or removed (Pillow, 8 bit)
