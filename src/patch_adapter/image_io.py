"""Reading and writing the very large images (4K-16K) and masks that patch_adapter inpaints.

Everything here is plain file/array handling: no torch. Pixels travel as numpy arrays,
``(H, W, 3)`` RGB in ``uint8`` or ``uint16`` plus an optional alpha plane of the same
dtype; 16-bit files stay 16-bit end to end.

One decoder of record per format and bit depth, each checked bit for bit in the tests:

* PNG, JPEG, WebP at 8 bit: Pillow, which handles every mode and transparency form.
* 16-bit PNG: OpenCV (libpng); a grey tRNS colour, which OpenCV ignores, becomes alpha here.
* TIFF (grey, palette, RGB, + alpha; 1-16 bit): tifffile, for every layout. OpenCV garbles
  planar 16-bit TIFFs and turns oriented ones itself; Pillow cannot open 16-bit grey + alpha
  and scrambles uncompressed files turned by orientation 5-8.
* TIFF in other colour spaces (CMYK, YCbCr), 8 bit only: Pillow, as for a JPEG of that kind.

EXIF orientation is applied exactly once, here. What cannot be decoded exactly (animated
or multi-page files, premultiplied alpha, 12- or 32-bit samples) is refused with the reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "SUPPORTED_EXTENSIONS",
    "ImageInputError",
    "MaskSizeError",
    "LoadedImage",
    "check_image_size",
    "read_image_size",
    "load_image",
    "load_mask",
    "to_float",
    "from_float",
    "to_model_range",
    "from_model_range",
    "save_image",
    "atomic_write",
    "remove_stale_temp_files",
    "read_metadata",
    "loaded_from_pil",
    "check_output_path",
    "LOSSY_FORMATS",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Largest image, in pixels, that :func:`load_image` opens by default. It admits
#: 16384x16384 (268,435,456 pixels), the biggest size this package targets, and refuses
#: anything larger as a guard against decompression bombs (a tiny file whose header claims
#: a gigantic size). Pass ``max_pixels=`` to :func:`load_image` to raise it for one call.
MAX_IMAGE_PIXELS = 300_000_000

#: Output extensions understood by :func:`save_image`, and the format each one means.
SUPPORTED_EXTENSIONS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

# Pillow's name for each readable format. MPO is what Pillow calls many phone-camera
# JPEGs (a JPEG with extra embedded pictures); its first frame is an ordinary JPEG.
_READABLE_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "TIFF"}

_JPEG_QUALITY = 95
_JPEG_MAX_SIDE = 65535  # the JPEG header stores each side in 16 bits
_WEBP_MAX_SIDE = 16383  # libwebp's limit: a 16384-pixel side does not fit
_METADATA_KEY = "patch_adapter"
_PARAMETERS_KEY = "parameters"
_XMP_PNG_KEY = "XML:com.adobe.xmp"
_ORIENTATION_TAG = ExifTags.Base.Orientation
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IHDR_END = 33  # signature (8) + IHDR chunk: length (4) + type (4) + data (13) + CRC (4)
_TEMP_TOKEN_BYTES = 6
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{%d}\.tmp" % (2 * _TEMP_TOKEN_BYTES))


class ImageInputError(ValueError):
    """An image, mask or output path that cannot be used; the message says how to fix it."""


class MaskSizeError(ImageInputError):
    """The mask does not have the same width and height as the image it belongs to."""


@dataclass
class LoadedImage:
    """Pixels of an image file plus what is needed to write a faithful result back."""

    pixels: np.ndarray  # (H, W, 3) uint8 or uint16 RGB
    alpha: np.ndarray | None  # (H, W), same dtype as pixels, or None when opaque
    path: str | None
    format: str | None  # Pillow's format name, e.g. "PNG", "JPEG"
    icc_profile: bytes | None
    exif: bytes | None = None  # EXIF block with the orientation reset: the pixels are upright
    xmp: bytes | None = None

    @property
    def channels(self) -> np.ndarray:
        """(H, W, 3), or (H, W, 4) with alpha last: what is composited into and written back."""
        if self.alpha is None:
            return self.pixels
        return np.concatenate([self.pixels, self.alpha[:, :, None]], axis=2)

    @property
    def bit_depth(self) -> int:
        """Bits per channel (8 or 16), so callers can pick an output format that keeps them."""
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), in the same order as PIL's ``Image.size``."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    @property
    def max_value(self) -> int:
        """Value of a full-intensity channel: 255 for 8-bit, 65535 for 16-bit."""
        return 65535 if self.bit_depth == 16 else 255


# --------------------------------------------------------------------------- size guard


def check_image_size(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an image whose header claims more than ``max_pixels``, before decoding any of it."""
    if width <= 0 or height <= 0:
        raise ImageInputError(f"image header claims a size of {width}x{height}; the file is corrupt, re-export it")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageInputError(
            f"image is {width}x{height} = {pixels:,} pixels, more than the limit of "
            f"{max_pixels:,} pixels (a guard against decompression bombs); if you trust this "
            f"file, raise the limit with load_image(path, max_pixels={pixels})"
        )


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Let Pillow open what we admit: its own limit (~89M pixels) would refuse 16384x16384.

    Our limit is enforced by :func:`check_image_size` on the header, before decoding. Pillow's
    limit is only ever raised here, never lowered, and is restored on exit. ``None`` lifts it
    for calls that decode no pixels at all.
    """
    previous = Image.MAX_IMAGE_PIXELS
    if max_pixels is None or previous is None:
        Image.MAX_IMAGE_PIXELS = None
    else:
        Image.MAX_IMAGE_PIXELS = max(previous, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _require_file(path: PathLike) -> str:
    """Fail with a clear message before Pillow does with a confusing one."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageInputError(f"{name} does not exist; check the path and the working directory")
    if os.path.isdir(name):
        raise ImageInputError(f"{name} is a folder, not an image file; pass the path of a file")
    return name


def _open_header(path: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and apply the size guard; the caller must close it."""
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise ImageInputError(f"{path} is not an image file that can be read; use PNG, JPEG, WebP or TIFF") from None
    except Image.DecompressionBombError as exc:
        raise ImageInputError(
            f"{path} is too large to open safely ({exc}); the limit is {max_pixels:,} pixels: "
            "if you trust this file, pass a larger max_pixels= to load_image"
        ) from None
    except OSError as exc:
        raise ImageInputError(f"cannot read {path}: {exc}; check that it is readable") from None
    try:
        if im.format not in _READABLE_FORMATS:
            raise ImageInputError(
                f"{path} is a {im.format} image, which is not supported; convert it to PNG, JPEG, WebP or TIFF"
            )
        check_image_size(im.width, im.height, max_pixels)
    except BaseException:
        im.close()
        raise
    return im


def read_image_size(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) as :func:`load_image` would return it, read from the header only.

    Lets callers plan (tiles, memory) for a 16K image without decoding it. EXIF rotations
    by 90 degrees are taken into account, so the size matches the loaded pixels.
    """
    name = _require_file(path)
    try:
        if _is_tiff(name):
            with _tiff_page(name, max_pixels) as page:
                width, height = page.imagewidth, page.imagelength
                orientation = _tiff_orientation(page)
        else:
            with _pillow_pixel_limit(max_pixels), _open_header(name, max_pixels) as im:
                width, height = im.size
                orientation = _exif_orientation(im)
    except ImageInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in load_image
        raise ImageInputError(
            f"the header of {name} cannot be read ({type(exc).__name__}: {exc}); re-export it"
        ) from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height


# --------------------------------------------------------------------------- loading


def load_image(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> LoadedImage:
    """Read a PNG, JPEG, WebP or TIFF as upright RGB (+ alpha), keeping 16 bits where present.

    Greyscale, palette, CMYK, LA and RGBA inputs become RGB, with ``alpha`` set where the file
    has transparency (an alpha channel or a tRNS colour, at 8 or 16 bit). EXIF orientation is
    applied, so pixels are the way a viewer shows them. Files over ``max_pixels`` pixels are
    refused from their header, before decoding; so are files that cannot be decoded exactly.
    """
    name = _require_file(path)
    try:
        if _is_tiff(name):
            loaded = _load_tiff(name, max_pixels)
            if loaded is not None:
                return loaded
        return _load_with_pillow(name, max_pixels)
    except ImageInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile file can make any decoder fail any way
        raise ImageInputError(
            f"{name} could not be decoded ({type(exc).__name__}: {exc}); the file may be "
            "truncated or corrupt, re-export it"
        ) from None


def _load_with_pillow(name: str, max_pixels: int) -> LoadedImage:
    """PNG, JPEG, WebP, and the TIFF kinds tifffile does not cover (CMYK, YCbCr), at 8 bit."""
    with _pillow_pixel_limit(max_pixels), _open_header(name, max_pixels) as im:
        _refuse_inexact(im, name)
        if _bits_per_sample(im, name) > 8:
            pixels, alpha = _decode_16bit_png(im, name)
        else:
            pixels, alpha = _decode_8bit(im)
        icc_profile, exif, xmp = _kept_metadata(im)
        return LoadedImage(
            pixels=pixels,
            alpha=alpha,
            path=name,
            format=im.format,
            icc_profile=icc_profile,
            exif=exif,
            xmp=xmp,
        )


def loaded_from_pil(im: Image.Image) -> LoadedImage:
    """A PIL image as a LoadedImage, by the same rules as a file: upright, 16 bits kept."""
    upright = ImageOps.exif_transpose(im)  # a copy: the caller's image is left alone
    pixels, alpha = _pil_to_arrays(upright)
    icc_profile, exif, xmp = _kept_metadata(upright)
    return LoadedImage(
        pixels=pixels,
        alpha=alpha,
        path=None,
        format=im.format,
        icc_profile=icc_profile,
        exif=exif,
        xmp=xmp,
    )


def _refuse_inexact(im: Image.Image, path: str) -> None:
    """Refuse, from the header, files whose pixels could not come back as they are."""
    frames = getattr(im, "n_frames", 1)
    if im.format == "PNG" and im.custom_mimetype == "image/apng":
        raise ImageInputError(
            f"{path} is an animated PNG: which frame to inpaint is ambiguous (viewers show "
            "different ones); export the frame you want as a plain PNG"
        )
    # MPO (phone-camera JPEG) frames after the first are previews or depth maps by design.
    if frames > 1 and im.format != "MPO":
        kind = "pages" if im.format == "TIFF" else "frames"
        raise ImageInputError(
            f"{path} has {frames} {kind}; only the first would be inpainted and the rest "
            f"lost: export the one you want as a single-image {im.format} file"
        )
    if im.format == "TIFF" and im.tag_v2.get(338):  # ExtraSamples: tifffile reads those
        raise ImageInputError(f"{path} combines extra channels with a {im.mode} colour space; save it as RGB(A)")


def _kept_metadata(im: Image.Image) -> tuple[bytes | None, bytes | None, bytes | None]:
    """ICC profile, EXIF (orientation reset, as the pixels are upright) and XMP to write back."""
    icc_profile = _rgb_profile(im.info.get("icc_profile"))
    exif = None
    # A TIFF's EXIF is its own IFD (strip offsets and all): nothing to carry over.
    if im.info.get("exif") and im.format != "TIFF":
        tags = Image.Exif()
        with contextlib.suppress(Exception):  # unreadable EXIF: not worth refusing the picture
            tags.load(im.info["exif"])
            if _ORIENTATION_TAG in tags:
                tags[_ORIENTATION_TAG] = 1
            exif = tags.tobytes()
    return icc_profile, exif, _upright_xmp(im.info.get("xmp") or im.info.get(_XMP_PNG_KEY))


def _upright_xmp(xmp: Any) -> bytes | None:
    """XMP as bytes with its tiff:Orientation set to 1, like the EXIF: the pixels are upright."""
    if not xmp:
        return None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    xmp = re.sub(rb'(tiff:Orientation=["\'])\d(["\'])', rb"\g<1>1\g<2>", bytes(xmp))
    return re.sub(rb"(<tiff:Orientation>)\d(</tiff:Orientation>)", rb"\g<1>1\g<2>", xmp)


def _rgb_profile(icc_profile: Any) -> bytes | None:
    """The ICC profile if it describes RGB: a grey or CMYK one does not fit the RGB we return."""
    if not icc_profile:
        return None
    icc_profile = bytes(icc_profile)
    return icc_profile if icc_profile[16:20] == b"RGB " else None  # header: colour space


def _bits_per_sample(im: Image.Image, path: str) -> int:
    """Bits per channel stored in the file; Pillow's mode hides it (16-bit RGB opens as "RGB")."""
    if im.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(_PNG_IHDR_END)
        return header[24]  # IHDR bit depth
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (1,))  # BitsPerSample
        bits = max(bits) if isinstance(bits, tuple) else int(bits)
        if bits > 8:
            raise ImageInputError(
                f"{path} is a {bits}-bit {im.mode} TIFF, which cannot be decoded exactly; "
                "convert it to 16-bit RGB or grey, or to 8 bit"
            )
        return bits
    return 8


def _decode_8bit(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode with Pillow, upright, as RGB + optional alpha."""
    im.load()
    ImageOps.exif_transpose(im, in_place=True)
    return _pil_to_arrays(im)


def _pil_to_arrays(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn any Pillow mode we accept into (H, W, 3) RGB plus (H, W) alpha or None."""
    if im.mode.startswith("I;16"):
        grey = np.asarray(im).astype(np.uint16)  # I;16B is big-endian: make it native
        return np.repeat(grey[:, :, None], 3, axis=2), _trns_alpha(grey, im.info.get("transparency"))
    if im.mode in ("I", "F"):
        raise ImageInputError(f"{im.mode!r} (32-bit) images are not supported; convert to 8- or 16-bit first")
    if im.mode in ("RGBa", "La"):
        raise ImageInputError(
            f"{im.mode!r} images have premultiplied alpha, which cannot be returned unchanged; "
            "convert them to RGBA or LA first"
        )
    if im.has_transparency_data:
        rgba = np.asarray(im.convert("RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return np.array(rgb), None  # np.array, not asarray: Pillow's buffer is read-only


def _trns_alpha(pixels: np.ndarray, colour: Any) -> np.ndarray | None:
    """A tRNS colour (grey value or RGB triple) as an alpha plane: 0 there, opaque elsewhere."""
    if colour is None or isinstance(colour, bytes):
        return None
    top = np.iinfo(pixels.dtype).max
    if pixels.ndim == 2:
        hit = pixels == int(colour)
    else:
        hit = np.all(pixels == np.asarray(colour, dtype=pixels.dtype), axis=2)
    return np.where(hit, 0, top).astype(pixels.dtype)


def _decode_16bit_png(im: Image.Image, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a 16-bit PNG with OpenCV (libpng), then apply EXIF orientation ourselves."""
    cv2 = _import_cv2()
    # imdecode rather than imread: works for any path (non-ASCII names on Windows).
    decoded = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise OSError("OpenCV could not decode it")
    if decoded.dtype != np.uint16:
        raise ImageInputError(f"{path} decoded as {decoded.dtype}, not 16-bit; convert it to an 8- or 16-bit PNG")
    if decoded.ndim == 2:  # OpenCV turns an RGB tRNS colour into alpha, but not a grey one
        alpha = _trns_alpha(decoded, im.info.get("transparency"))
        pixels = np.repeat(decoded[:, :, None], 3, axis=2)
    else:
        pixels, alpha = _split_opencv_channels(decoded, path)
    return _oriented(pixels, alpha, _exif_orientation(im))


def _png_chunk_data(path: str, kind: bytes) -> bytes | None:
    """The first ``kind`` chunk's data, found by hopping from chunk header to chunk header."""
    with open(path, "rb") as f:
        f.seek(len(_PNG_SIGNATURE))
        while len(head := f.read(8)) == 8:
            length, name = struct.unpack(">I4s", head)
            if name == kind:
                return f.read(length)
            if name == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return None


# --------------------------------------------------------------------------- TIFF

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_TIFFFILE_PHOTOMETRIC = {0: "miniswhite", 1: "minisblack", 2: "rgb", 3: "palette"}


def _is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


@contextlib.contextmanager
def _tiff_page(path: str, max_pixels: int) -> Iterator[Any]:
    """The one page of a TIFF, header checked: size guard, a single page."""
    import tifffile  # only TIFFs need it

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ImageInputError(f"{path} is not a TIFF that can be read ({exc}); re-export it") from None
    with tif:
        pages = len(tif.pages)
        if pages > 1:
            raise ImageInputError(
                f"{path} has {pages} pages; only the first would be inpainted and the rest "
                "lost: export the one you want as a single-page TIFF"
            )
        if pages == 0:
            raise ImageInputError(f"{path} holds no image (no TIFF page); re-export it")
        page = tif.pages.first
        check_image_size(page.imagewidth, page.imagelength, max_pixels)
        yield page


def _tiff_orientation(page: Any) -> int:
    orientation = page.tags.valueof(274, 1)
    return orientation if orientation in range(1, 9) else 1


def _load_tiff(path: str, max_pixels: int) -> LoadedImage | None:
    """Decode a grey, palette or RGB TIFF (+ alpha) with tifffile; None for the other kinds.

    tifffile reads every layout (chunky or planar, strips or tiles, any predictor) exactly,
    where OpenCV garbles planar files and Pillow misreads uncompressed files turned by
    orientation 5-8 and planar grey + alpha. The orientation is applied here, once.
    """
    with _tiff_page(path, max_pixels) as page:
        photometric = int(page.photometric)
        bits = int(page.bitspersample)
        if photometric not in _TIFFFILE_PHOTOMETRIC:
            if bits > 8:
                raise ImageInputError(
                    f"{path} is a {bits}-bit {page.photometric.name} TIFF, which cannot be "
                    "decoded exactly; convert it to 16-bit RGB or grey"
                )
            if int(page.compression) == 1 and _tiff_orientation(page) in (5, 6, 7, 8):
                raise ImageInputError(
                    f"{path} is an uncompressed {page.photometric.name} TIFF turned by "
                    f"orientation {_tiff_orientation(page)}, which Pillow decodes scrambled; "
                    "save it upright, or LZW/Deflate-compressed"
                )
            return None  # CMYK, YCbCr (JPEG-in-TIFF) ...: Pillow, like a JPEG of that kind
        _check_tiff_samples(page, path, photometric)
        data = page.asarray()
        colormap = page.colormap if photometric == 3 else None
        orientation = _tiff_orientation(page)
        icc_profile = page.tags.valueof(34675) or None
        xmp = page.tags.valueof(700) or None
    samples = int(page.samplesperpixel)
    if samples > 1 and int(page.planarconfig) == 2:  # separate planes: (S, H, W)
        data = np.moveaxis(data, 0, -1)
    data = data.reshape(page.imagelength, page.imagewidth, samples)
    colours = 3 if photometric == 2 else 1
    pixels = _tiff_colours(data[:, :, :colours], photometric, bits, colormap)
    alpha = None
    if samples > colours:  # unassociated alpha, checked above
        alpha = _tiff_colours(data[:, :, colours:], 1, bits, None)[:, :, 0]
    pixels, alpha = _oriented(pixels, alpha, orientation)
    return LoadedImage(
        pixels=pixels,
        alpha=alpha,
        path=path,
        format="TIFF",
        icc_profile=_rgb_profile(icc_profile),
        xmp=_upright_xmp(xmp),
    )


def _check_tiff_samples(page: Any, path: str, photometric: int) -> None:
    """Refuse what would not come back unchanged: premultiplied or unnamed extra channels."""
    extra = tuple(int(e) for e in page.extrasamples)
    if 1 in extra:
        raise ImageInputError(
            f"{path} has premultiplied (associated) alpha, which cannot be returned "
            "unchanged; save it with unassociated alpha"
        )
    colours = 3 if photometric == 2 else 1
    if int(page.samplesperpixel) - colours != len(extra) or len(extra) > 1 or 0 in extra:
        raise ImageInputError(
            f"{path} has {page.samplesperpixel} samples per pixel for {page.photometric.name} "
            "(extra channels of no declared meaning would be lost); save it as grey, "
            "grey + alpha, RGB or RGBA"
        )
    if int(page.sampleformat) != 1:
        raise ImageInputError(
            f"{path} stores signed or floating-point samples ({page.sampleformat.name}); "
            "convert it to unsigned 8- or 16-bit"
        )
    if int(page.bitspersample) not in (1, 2, 4, 8, 16):
        raise ImageInputError(
            f"{path} has {page.bitspersample} bits per channel, which cannot be returned "
            "exactly; convert it to an 8- or 16-bit TIFF or PNG"
        )


def _tiff_colours(data: np.ndarray, photometric: int, bits: int, colormap: Any) -> np.ndarray:
    """tifffile's samples as (H, W, 3) RGB, the way Pillow expands them at 8 bit."""
    if photometric == 3:  # palette: 16-bit colormap entries, high byte at <= 8 bit (as Pillow)
        table = np.asarray(colormap, dtype=np.uint16).T
        if bits <= 8:
            table = (table >> 8).astype(np.uint8)
        return np.ascontiguousarray(table[data[:, :, 0].astype(np.intp)])  # 1-bit comes as bool
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if bits < 8:  # 1, 2, 4-bit grey, scaled to 0-255
        data = (data.astype(np.uint16) * 255 // ((1 << bits) - 1)).astype(np.uint8)
    if photometric == 0:  # white is zero
        data = np.iinfo(data.dtype).max - data
    if data.shape[2] == 1:
        data = np.repeat(data, 3, axis=2)
    return np.ascontiguousarray(data)


def _oriented(pixels: np.ndarray, alpha: np.ndarray | None, orientation: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels and alpha turned upright, for decoders that ignore the orientation tag."""
    pixels = _apply_orientation(pixels, orientation)
    if alpha is not None:
        alpha = _apply_orientation(np.ascontiguousarray(alpha), orientation)
    return pixels, alpha


def _split_opencv_channels(decoded: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """OpenCV gives grey, BGR or BGRA (grey+alpha arrives as BGRA); return RGB + alpha."""
    if decoded.ndim == 2:
        return np.repeat(decoded[:, :, None], 3, axis=2), None
    channels = decoded.shape[2]
    if channels == 1:
        return np.repeat(decoded, 3, axis=2), None
    if channels == 3:
        return np.ascontiguousarray(decoded[:, :, ::-1]), None
    if channels == 4:
        return np.ascontiguousarray(decoded[:, :, 2::-1]), np.ascontiguousarray(decoded[:, :, 3])
    raise ImageInputError(f"{path} has {channels} channels, which is not supported; convert it to RGB or RGBA")


def _exif_orientation(im: Image.Image) -> int:
    """EXIF orientation (1-8) from the header; 1 when absent or invalid."""
    if im.format == "PNG" and "exif" not in im.info:
        # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the
        # image data; hop to it instead, and keep it where Pillow's load() would put it.
        late_exif = _png_chunk_data(im.filename, b"eXIf") if im.filename else None
        if not late_exif:
            return 1
        im.info["exif"] = b"Exif\x00\x00" + late_exif
    try:
        orientation = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except (TypeError, ValueError):
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Numpy twin of ``ImageOps.exif_transpose`` for arrays Pillow cannot hold (16-bit RGB)."""
    transforms = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
        6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90 degrees clockwise)
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # TRANSVERSE
        8: lambda a: np.rot90(a, 1),  # ROTATE_90 (90 degrees counter-clockwise)
    }
    transform = transforms.get(orientation)
    if transform is None:
        return array
    return np.ascontiguousarray(transform(array))


def _import_cv2() -> Any:
    """OpenCV is needed only for 16-bit RGB files; say how to get it if it is missing."""
    try:
        import cv2
    except ImportError:
        raise ImageInputError(
            "16-bit PNG/TIFF files need OpenCV; install it with `pip install opencv-python-headless`"
        ) from None
    return cv2


# --------------------------------------------------------------------------- masks


def load_mask(
    source: PathLike | Image.Image | np.ndarray | None,
    image: LoadedImage,
    threshold: float = 0.5,
) -> np.ndarray:
    """The area to inpaint, as an (H, W) bool array: True = fill, False = keep.

    ``source`` may be:

    * ``None``: use the image's own alpha channel; transparent pixels
      (alpha < threshold * max) are filled. An image without alpha is an error.
    * a path or a PIL image: white/light = fill, black = keep; grey is thresholded at 50%
      by default (luminance >= threshold * max fills, so 128 of 255 fills and 127 keeps).
      Colour masks are reduced to luminance first. Fully transparent pixels of a mask with
      alpha count as keep. EXIF orientation is applied to mask files, as to images.
    * a numpy array: bool as is; uint8, uint16 or float in [0, 1] thresholded like grey.

    The mask must have exactly the image's size, otherwise :class:`MaskSizeError`.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}; 0.5 is the usual value")
    if source is None:
        return _mask_from_alpha(image, threshold)
    if hasattr(source, "detach") and hasattr(source, "cpu"):  # a torch tensor, without importing torch
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        mask = _mask_from_array(source, threshold)
    elif isinstance(source, Image.Image):
        pixels, alpha = _pil_to_arrays(ImageOps.exif_transpose(source))
        mask = _mask_from_pixels(pixels, alpha, threshold)
    elif isinstance(source, (str, os.PathLike)):
        image_pixels = image.pixels.shape[0] * image.pixels.shape[1]
        loaded = load_image(source, max_pixels=max(MAX_IMAGE_PIXELS, image_pixels))
        mask = _mask_from_pixels(loaded.pixels, loaded.alpha, threshold)
    else:
        raise ImageInputError(
            f"a mask must be a path, a PIL image, a numpy array or a torch tensor, not "
            f"{type(source).__name__}; e.g. np.asarray(mask) for a nested list"
        )
    _check_mask_size(mask, image)
    return mask


def _mask_from_alpha(image: LoadedImage, threshold: float) -> np.ndarray:
    """Transparent = fill: the convention of editors that erase the area to repaint."""
    if image.alpha is None:
        raise ImageInputError(
            f"{image.path or 'the image'} has no alpha channel, so no mask can be taken from "
            "it; pass a mask (white = fill, black = keep), or erase the area to fill so it "
            "is transparent and save as PNG"
        )
    return image.alpha < threshold * image.max_value


def _mask_from_pixels(pixels: np.ndarray, alpha: np.ndarray | None, threshold: float) -> np.ndarray:
    """Light = fill; fully transparent = keep (a mask painted on a transparent layer)."""
    max_value = 65535 if pixels.dtype == np.uint16 else 255
    mask = _luminance_at_least(pixels, threshold * max_value)
    if alpha is not None:
        mask &= alpha > 0
        if not mask.any() and alpha.min() != alpha.max():
            raise ImageInputError(
                "the mask has no light pixel, only transparency: masks are read from their "
                "brightness (white = fill); paint the area white on black, or to use "
                "transparency as the mask, erase that area in the image itself and give no mask"
            )
    return mask


def _luminance_at_least(pixels: np.ndarray, cutoff: float) -> np.ndarray:
    """(luminance >= cutoff) for RGB, in row stripes so a 16K mask needs no 16K int copy.

    Integer Rec. 601 weights, like Pillow's "L" conversion, so a grey value maps to itself
    exactly and the documented threshold boundary holds to the unit. Grey stripes (the usual
    mask) skip the arithmetic.
    """
    height, width = pixels.shape[:2]
    out = np.empty((height, width), dtype=bool)
    rows = max(1, (1 << 20) // max(1, width))
    for top in range(0, height, rows):
        stripe = pixels[top : top + rows]
        red, green, blue = stripe[..., 0], stripe[..., 1], stripe[..., 2]
        if np.array_equal(red, green) and np.array_equal(green, blue):
            out[top : top + rows] = red >= cutoff
            continue
        red, green, blue = (c.astype(np.int32) for c in (red, green, blue))  # 65535*1000 fits
        lum = (red * 299 + green * 587 + blue * 114 + 500) // 1000
        out[top : top + rows] = lum >= cutoff
    return out


def _mask_from_array(array: np.ndarray, threshold: float) -> np.ndarray:
    """Accept the array types a caller is likely to have; refuse ambiguous ones loudly."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ImageInputError(
            f"a mask array must be 2-D (H, W), got shape {array.shape}; pass one channel, e.g. mask[..., 0]"
        )
    if array.dtype == np.bool_:
        return array.copy()
    if array.dtype == np.uint8:
        return array >= threshold * 255
    if array.dtype == np.uint16:
        return array >= threshold * 65535
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ImageInputError(
                f"a float mask must hold values in [0, 1], got [{low}, {high}]; divide by its maximum (e.g. 255) first"
            )
        return array >= threshold
    raise ImageInputError(
        f"a mask array must be bool, uint8, uint16 or float in [0, 1], got {array.dtype}; "
        "convert it, e.g. mask.astype(bool) for a 0/1 array"
    )


def _check_mask_size(mask: np.ndarray, image: LoadedImage) -> None:
    """A mask of another size would silently inpaint the wrong area: refuse it."""
    mask_h, mask_w = mask.shape
    image_w, image_h = image.size
    if (mask_w, mask_h) == (image_w, image_h):
        return
    hint = ""
    if (mask_h, mask_w) == (image_w, image_h):
        hint = " (it looks rotated by 90 degrees: check the EXIF orientation of both files)"
    raise MaskSizeError(
        f"mask is {mask_w}x{mask_h} but the image is {image_w}x{image_h}{hint}: the mask "
        "must cover the image pixel for pixel; resize the mask to the image size"
    )


# --------------------------------------------------------------------------- float pixels


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 -> float32 in [0, 1], the pipeline's working representation (float32 is copied as it is)."""
    if pixels.dtype == np.float32:  # float inputs (diffusers takes them) stay float, exactly
        return pixels.copy()
    max_value = _integer_max(pixels.dtype)
    out = pixels.astype(np.float32)
    out /= max_value
    return out


def from_float(x: np.ndarray, dtype: Any = np.uint8) -> np.ndarray:
    """float in [0, 1] -> uint8/uint16, clipped and rounded half to even (``np.rint``); float32: clipped only."""
    target = np.dtype(dtype)
    if target == np.float32:
        if np.isnan(x).any():
            raise ValueError("pixels contain NaN; the pipeline produced invalid values upstream")
        return np.clip(np.asarray(x, dtype=np.float32), 0, 1)
    max_value = _integer_max(target)
    x = np.asarray(x)
    work_dtype = np.float64 if x.dtype == np.float64 else np.float32
    scaled = np.multiply(x, max_value, dtype=work_dtype)
    if np.isnan(scaled).any():
        raise ValueError("pixels contain NaN; the pipeline produced invalid values upstream")
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, max_value, out=scaled)
    return scaled.astype(target)


def to_model_range(x):
    """Float pixels in [0, 1] -> [-1, 1], the VAE's input range (diffusers' image processor).

    Arrays or tensors alike; the layout (HWC, NCHW) is the caller's.
    """
    return x * 2 - 1


def from_model_range(x):
    """The VAE's output in [-1, 1] -> float pixels in [0, 1], clipped (arrays or tensors)."""
    return (x / 2 + 0.5).clip(0, 1)


def _integer_max(dtype: np.dtype) -> int:
    """255 or 65535; other dtypes are a bug in the caller, named in the error."""
    if dtype == np.uint8:
        return 255
    if dtype == np.uint16:
        return 65535
    raise TypeError(f"pixels must be uint8 or uint16, got {dtype}")


# --------------------------------------------------------------------------- saving


def save_image(
    path: PathLike,
    pixels: np.ndarray,
    metadata: dict | None = None,
    protect: Iterable[PathLike] = (),
    overwrite_input: bool = False,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
) -> None:
    """Write ``pixels`` ((H, W, 3) RGB or (H, W, 4) RGBA, uint8/uint16) atomically.

    The format follows the extension (.png, .jpg/.jpeg, .webp, .tif/.tiff). PNG and TIFF
    keep 16 bits and alpha; WebP is written lossless (8 bit, alpha kept, at most 16383
    pixels per side), so these three give back every pixel exactly. JPEG (quality 95, no
    chroma subsampling) is 8-bit, lossy and has no alpha. The file is written to a temporary
    file in the same folder, fsynced and renamed over ``path``, so a crash never leaves a
    half-written image; the parent folder is created if missing. ``path`` must not be any
    file in ``protect`` (the inputs) unless ``overwrite_input=True``: a typo must not
    destroy the original.

    ``metadata`` goes into PNG text chunks: ``patch_adapter`` (JSON, read back by
    :func:`read_metadata`) and ``parameters`` (a "key: value, key: value" line for humans),
    for 16-bit PNGs too. Other formats cannot hold it portably, so it is written next to
    the image as ``<path>.json``. ``icc_profile`` and ``xmp`` are embedded in every format;
    ``exif`` (e.g. ``LoadedImage.exif``, orientation already reset) in PNG, JPEG and WebP.
    """
    target = Path(os.fspath(path))
    if not isinstance(pixels, np.ndarray) or pixels.dtype not in (np.uint8, np.uint16):
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise ImageInputError(
            f"pixels to save must be a uint8 or uint16 array, got {dtype}; "
            "convert float pixels with from_float(x, np.uint8)"
        )
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4) or 0 in pixels.shape:
        raise ImageInputError(f"pixels to save must have shape (H, W, 3) or (H, W, 4), got {pixels.shape}")
    bit_depth = 16 if pixels.dtype == np.uint16 else 8
    if bit_depth == 16 and target.suffix.lower() in (".jpg", ".jpeg", ".webp"):
        raise ImageInputError(
            f"{target.name}: {SUPPORTED_EXTENSIONS[target.suffix.lower()]} cannot store 16-bit "
            "pixels; use .png or .tif to keep 16 bits (or convert to 8-bit first)"
        )
    file_format = check_output_path(
        target,
        (pixels.shape[1], pixels.shape[0]),
        bit_depth,
        pixels.shape[2] == 4,
        allow_lossy=True,
        protect=() if overwrite_input else protect,
    )
    metadata_json = None if metadata is None else json.dumps(metadata, sort_keys=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    extras = {"icc_profile": icc_profile, "exif": exif, "xmp": xmp}
    with atomic_write(target) as f:
        if file_format == "TIFF":
            _write_tiff(f, pixels, icc_profile, xmp)
        elif pixels.dtype == np.uint16:
            _write_16bit_png(f, pixels, metadata, metadata_json, extras)
        else:
            _write_8bit(f, pixels, file_format, metadata, metadata_json, extras)
    if metadata_json is not None and file_format != "PNG":
        with atomic_write(_sidecar_path(target)) as f:
            f.write(metadata_json.encode("utf-8"))


#: Output formats that cannot give back the input's pixels exactly.
LOSSY_FORMATS = {"JPEG"}


def check_output_path(
    path: PathLike,
    size: tuple[int, int],
    bit_depth: int,
    has_alpha: bool,
    allow_lossy: bool = False,
    protect: Iterable[PathLike] = (),
) -> str:
    """Every refusal :func:`save_image` would make, made before any work; returns the format.

    Checks the extension, what the format can hold (16 bits, alpha, its side limit), that
    the folder can be written, and that ``path`` is none of ``protect`` (the inputs, however
    they are spelled: links included). ``allow_lossy=False`` also refuses outputs that would
    change pixels outside the mask: JPEG, and 16-bit pixels into an 8-bit format.
    """
    target = Path(os.fspath(path))
    file_format = _format_for(target)
    width, height = size
    lossy_hint = "write .png, .tif or .webp (lossless) instead, or pass --allow-lossy"
    if not allow_lossy and file_format in LOSSY_FORMATS:
        raise ImageInputError(
            f"{target.name}: JPEG is lossy and would change the pixels outside the mask; " + lossy_hint
        )
    if has_alpha and file_format == "JPEG":
        raise ImageInputError(
            f"{target.name}: JPEG has no alpha channel and the transparency would be lost; save as .png, .tif or .webp"
        )
    if not allow_lossy and bit_depth == 16 and file_format in ("JPEG", "WEBP"):
        raise ImageInputError(
            f"{target.name}: {file_format} holds 8 bits and the 16-bit pixels outside the mask "
            "would be rounded; write .png or .tif to keep 16 bits, or pass --allow-lossy"
        )
    max_side = {"JPEG": _JPEG_MAX_SIDE, "WEBP": _WEBP_MAX_SIDE}.get(file_format)
    if max_side is not None and max(width, height) > max_side:
        raise ImageInputError(
            f"{target.name}: {file_format} cannot store a {width}x{height} image (at most "
            f"{max_side} pixels per side); use .png or .tif"
        )
    _refuse_protected(target, protect)
    _check_writable(target)
    return file_format


def _check_writable(target: Path) -> None:
    """The nearest existing folder must accept a new file (the temporary one, then the rename)."""
    if target.is_dir():
        raise ImageInputError(f"{target} is a folder; give a file name such as {target / 'out.png'}")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ImageInputError(f"cannot create {target.parent}: {folder} is not a folder")
    try:  # a real probe: permissions, read-only mounts and full quotas all show here
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".patch_adapter_probe_"):
            pass
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else exc.strerror or exc
        raise ImageInputError(f"cannot write into {folder} ({reason}); choose another output folder") from None


def _format_for(target: Path) -> str:
    """The extension decides the format: one rule, no surprises."""
    file_format = SUPPORTED_EXTENSIONS.get(target.suffix.lower())
    if file_format is None:
        raise ImageInputError(
            f"cannot tell the output format of {target} from its extension; use one of "
            + ", ".join(SUPPORTED_EXTENSIONS)
        )
    return file_format


def _refuse_protected(target: Path, protect: Iterable[PathLike]) -> None:
    """Refuse to overwrite an input file, however its path is spelled."""
    if isinstance(protect, (str, bytes, os.PathLike)):
        protect = [protect]  # a single path, not an iterable of characters
    for item in protect:
        protected = Path(os.fsdecode(item))
        if _same_file(target, protected):
            raise ImageInputError(
                f"refusing to overwrite the input {protected}; choose another output or pass overwrite_input=True"
            )


def _same_file(a: Path, b: Path) -> bool:
    """samefile sees through links and case-insensitive names; resolve() covers missing files."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


@contextlib.contextmanager
def atomic_write(target: PathLike, durable: bool = True) -> Iterator[IO[bytes]]:
    """Yield a file that replaces ``target`` only once completely written (and fsynced).

    The package's one way to write a file that others read: an interrupted write leaves
    the old file or none, never half of one. ``durable=False`` skips the fsyncs, for
    scratch files that need not survive a power loss (the web app's uploads).
    """
    target = Path(os.fsdecode(target))
    temp = target.with_name(f".{target.name}.{secrets.token_hex(_TEMP_TOKEN_BYTES)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, as for a normally created file.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        _fsync_folder(target.parent)


def remove_stale_temp_files(folder: PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that writes of ``names`` into ``folder`` left behind; returns them.

    :func:`atomic_write` removes its temporary file on any exception, but a process killed
    outright (SIGKILL, power loss) cannot. Call this only while nothing is writing these
    names, e.g. before a batch resumes. Metadata sidecars (``<name>.json``) are included.
    """
    wanted = set(names)
    wanted |= {_sidecar_path(Path(name)).name for name in wanted}
    removed = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            match = _TEMP_NAME.fullmatch(entry.name)
            if match and match["name"] in wanted and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; not possible (nor needed) on every platform."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_8bit(
    f: IO[bytes],
    pixels: np.ndarray,
    file_format: str,
    metadata: dict | None,
    metadata_json: str | None,
    extras: dict,
) -> None:
    """Pillow writes 8-bit PNG, JPEG and WebP, metadata included."""
    im = Image.fromarray(np.ascontiguousarray(pixels), "RGBA" if pixels.shape[2] == 4 else "RGB")
    options: dict[str, Any] = {key: value for key, value in extras.items() if value}
    if file_format == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if metadata_json is not None:
            info.add_text(_METADATA_KEY, metadata_json)
            info.add_text(_PARAMETERS_KEY, _parameters_line(metadata or {}))
        if options.get("xmp"):  # Pillow's PNG writer has no xmp= option
            info.add_itxt(_XMP_PNG_KEY, options.pop("xmp").decode("utf-8", "replace"))
        options["pnginfo"] = info
    elif file_format == "JPEG":
        # Inpainted seams are fine detail; chroma subsampling would blur their colour.
        options.update(quality=_JPEG_QUALITY, subsampling=0)
    elif file_format == "WEBP":
        # Lossless, and exact: colour under transparent pixels is kept, not zeroed.
        options.update(lossless=True, exact=True, quality=100)
    im.save(f, format=file_format, **options)


def _write_16bit_png(
    f: IO[bytes], pixels: np.ndarray, metadata: dict | None, metadata_json: str | None, extras: dict
) -> None:
    """OpenCV encodes 16-bit RGB(A) PNG; our text, ICC, EXIF and XMP chunks go after IHDR."""
    cv2 = _import_cv2()
    order = [2, 1, 0, 3] if pixels.shape[2] == 4 else [2, 1, 0]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels[:, :, order]))
    if not ok:
        raise ImageInputError("OpenCV could not encode the pixels as 16-bit PNG")
    data = memoryview(encoded.reshape(-1))
    chunks = b""
    if extras.get("icc_profile"):
        chunks += _png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(extras["icc_profile"]))
    if extras.get("exif"):
        exif = extras["exif"]
        chunks += _png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    if extras.get("xmp"):
        chunks += _png_chunk(b"iTXt", _XMP_PNG_KEY.encode() + b"\x00\x00\x00\x00\x00" + extras["xmp"])
    if metadata_json is not None:
        chunks += _png_text_chunk(_METADATA_KEY, metadata_json)
        chunks += _png_text_chunk(_PARAMETERS_KEY, _parameters_line(metadata or {}))
    f.write(data[:_PNG_IHDR_END])
    f.write(chunks)
    f.write(data[_PNG_IHDR_END:])


def _write_tiff(f: IO[bytes], pixels: np.ndarray, icc_profile: bytes | None, xmp: bytes | None) -> None:
    """tifffile writes every TIFF (8 and 16 bit, unassociated alpha), as it reads them."""
    import tifffile

    tags = []
    if icc_profile:
        tags.append((34675, "B", len(icc_profile), icc_profile, True))
    if xmp:
        tags.append((700, "B", len(xmp), xmp, True))
    encoded = io.BytesIO()  # tifffile wants a named file or a buffer, not a descriptor
    tifffile.imwrite(
        encoded,
        np.ascontiguousarray(pixels),
        photometric="rgb",
        compression="zlib",
        extrasamples=[2] if pixels.shape[2] == 4 else None,
        extratags=tags,
        metadata=None,
    )
    f.write(encoded.getbuffer())


def _parameters_line(metadata: dict) -> str:
    """One "key: value, key: value" line, what image viewers show for "parameters"."""
    return ", ".join(f"{key}: {value}" for key, value in metadata.items())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC over type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_text_chunk(key: str, text: str) -> bytes:
    """tEXt when the text is Latin-1 (as Pillow does), else UTF-8 iTXt."""
    keyword = key.encode("latin-1")
    try:
        return _png_chunk(b"tEXt", keyword + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag and translated key
        return _png_chunk(b"iTXt", keyword + b"\x00\x00\x00\x00\x00" + text.encode("utf-8"))


def _sidecar_path(target: Path) -> Path:
    """Where metadata goes for formats without PNG text chunks."""
    return target.with_name(target.name + ".json")


# --------------------------------------------------------------------------- metadata


def read_metadata(path: PathLike) -> dict:
    """The ``metadata`` dict that :func:`save_image` stored, or ``{}`` if there is none.

    Reads the ``patch_adapter`` PNG text chunk without decoding pixels; for other formats,
    or a PNG without the chunk, reads the ``<path>.json`` sidecar if there is one.
    """
    name = _require_file(path)
    raw: str | bytes | None = None
    with _pillow_pixel_limit(None):
        try:
            with Image.open(name) as im:
                if im.format == "PNG":
                    raw = im.info.get(_METADATA_KEY)
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageInputError(f"cannot read metadata from {name}: {exc}") from None
    sidecar = _sidecar_path(Path(name))
    if raw is None and sidecar.is_file():
        raw = sidecar.read_text(encoding="utf-8")
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ImageInputError(
            f"the patch_adapter metadata of {name} is not valid JSON ({exc}); "
            "the file was edited or written by another tool"
        ) from None
    if not isinstance(value, dict):
        raise ImageInputError(
            f"the patch_adapter metadata of {name} is not a JSON object; the file was edited or written by another tool"
        )
    return value
