"""What goes in comes back out: alpha, 16 bits and metadata through the command, settings and
outputs refused before the model loads, signals that leave no temporary file."""

import os
import signal
import warnings

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import box_mask, random_image, seeded
from patch_adapter.cli import main
from patch_adapter.image_io import load_image

FAST = ["--steps", "2", "--strength", "1.0", "--guidance-scale", "1.0", "--quiet", "--device", "cpu"]
H, W = 96, 128


@pytest.fixture
def files(tmp_path):
    """A product shot on a transparent background, with a mask over part of it."""
    rgb = random_image(H, W, seed=5)
    alpha = np.zeros((H, W), np.uint8)
    alpha[20:80, 30:100] = 255  # the object; the rest is transparent
    alpha[40:50, 60:70] = 128
    mask = box_mask(H, W, 30, 40, 70, 90)
    exif = Image.Exif()
    exif[0x010F] = "PatchCam"  # Make
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "shot.png", exif=exif.tobytes())
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path, rgb, alpha, mask


def inpaint(folder, *extra, image="shot.png"):
    return main(["inpaint", str(folder / image), "--mask", str(folder / "mask.png"), *FAST, *extra])


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
def test_alpha_and_metadata_come_back_outside_the_mask(files, suffix):
    folder, rgb, alpha, mask = files
    out = folder / f"out{suffix}"
    assert inpaint(folder, "-o", str(out)) == 0
    with Image.open(out) as written:  # Pillow's decode, not ours
        assert written.mode == "RGBA"
        pixels = np.asarray(written)
        make = written.getexif().get(0x010F) if suffix != ".tif" else "PatchCam"
    np.testing.assert_array_equal(pixels[~mask], np.dstack([rgb, alpha])[~mask])
    assert (pixels[mask][:, 3] == 255).all()  # the fill is opaque: documented rule
    assert make == "PatchCam"


def test_sixteen_bit_rgba_tiff_stays_sixteen_bit(tmp_path):
    rgba = np.random.default_rng(3).integers(0, 65536, (H, W, 4), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "deep.tif", np.moveaxis(rgba, 2, 0), photometric="rgb", extrasamples=[2], planarconfig="separate"
    )  # planar: OpenCV's weak spot
    mask = box_mask(H, W, 10, 10, 60, 60)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out = tmp_path / "out.tif"
    assert inpaint(tmp_path, "-o", str(out), image="deep.tif") == 0
    written = tifffile.imread(out)
    assert written.dtype == np.uint16 and written.shape == (H, W, 4)
    np.testing.assert_array_equal(written[~mask], rgba[~mask])


@pytest.fixture
def no_model(monkeypatch):
    """Any refusal here must come before the model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    from patch_adapter.pipeline import PatchAdapterPipeline

    monkeypatch.setattr(PatchAdapterPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--dca-scale", "nan"], "--dca-scale must be a finite number"),
        (["--rpa-scale", "nan"], "--rpa-scale must be a finite number"),
        (["--strength", "nan"], "--strength must be a finite number"),
        (["--strength", "1.5"], "--strength must be in (0.0, 1.0]"),
        (["--mask-feather", "20"], "erases the whole fill"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--tile-size", "100"], "--tile-size 100 must be a multiple of 8"),
        (["--seed", str(2**64)], "seed must be at most"),
        (["--seed", "-1"], "seed must be at least 0"),
        (["--device", "cuda:7"], "device 'cuda:7'"),
        (["--device", "warp-drive"], "unknown device"),
        (["-o", "{folder}/out.jpg"], "JPEG is lossy"),
        (["-o", "{folder}/out.bmp"], "extension"),
        (["-o", "{folder}/locked/out.png"], "permission denied"),
        (["-o", "{folder}/link.png"], "refusing to overwrite the input"),
        (["-o", "{folder}/shot.png/out.png"], "is not a folder"),
        (["-o", "/proc/out.png"], "cannot write into /proc"),
    ],
)
def test_bad_settings_and_outputs_are_refused_before_the_model(files, no_model, capsys, args, message):
    folder, *_ = files
    os.link(folder / "shot.png", folder / "link.png")  # a hard link to the input
    (folder / "locked").mkdir()
    (folder / "locked").chmod(0o500)
    if os.access(folder / "locked", os.W_OK) and "locked" in " ".join(args):
        pytest.skip("running as a user who can write anywhere")
    if "-o" not in args:
        args = [*args, "-o", str(folder / "out.png")]
    args = [a.format(folder=folder) for a in args]
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert inpaint(folder, *args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["link.png", "locked", "mask.png", "shot.png"]


def test_sixteen_bit_into_eight_bit_format_needs_allow_lossy(tmp_path, no_model, capsys):
    Image.fromarray(np.full((H, W), 40000, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(box_mask(H, W, 0, 0, 9, 9).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    assert inpaint(tmp_path, "-o", str(tmp_path / "out.webp"), image="grey16.png") == 2
    assert "16-bit pixels outside the mask would be rounded" in capsys.readouterr().err


def test_jpeg_with_allow_lossy_is_written(files):
    folder, rgb, _, mask = files
    Image.fromarray(rgb).save(folder / "opaque.png")
    out = folder / "out.jpg"
    assert inpaint(folder, "-o", str(out), "--allow-lossy", "--method", "resize", image="opaque.png") == 0
    assert load_image(out).size == (W, H)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_writing_leaves_no_temporary_file(files, monkeypatch, capsys, name):
    folder, *_ = files
    signum = getattr(signal, name)
    from patch_adapter import image_io

    def killed_mid_write(f, *args, **kwargs):
        f.write(b"half a picture")
        os.kill(os.getpid(), signum)
        raise AssertionError(f"{name} did not stop the write")

    before = signal.getsignal(signum)
    monkeypatch.setattr(image_io, "_write_8bit", killed_mid_write)
    code = inpaint(folder, "-o", str(folder / "out" / "result.png"), "--method", "resize")
    assert code == 128 + signum
    assert name in capsys.readouterr().err
    assert list((folder / "out").iterdir()) == []
    assert signal.getsignal(signum) == before  # restored after the command


# --------------------------------------------------------------------------- Python API


def test_pil_inputs_follow_the_rules_of_files(pipe, tmp_path):
    """16-bit grey PIL stays 16-bit; EXIF orientation is applied; tensor masks and prompt=None work."""
    grey = np.random.default_rng(4).integers(0, 65536, (H, W), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the upright picture is W x H
    Image.fromarray(grey).save(tmp_path / "grey16.png", exif=exif.tobytes())
    with Image.open(tmp_path / "grey16.png") as pil:
        pil.load()
        mask = torch.zeros((W, H), dtype=torch.bool)
        mask[10:40, 20:60] = True
        out = pipe(
            prompt=None,
            image=pil,
            mask_image=mask,
            num_inference_steps=2,
            strength=1.0,
            guidance_scale=1.0,
            generator=seeded(0),
        ).arrays[0]
    from_path = load_image(tmp_path / "grey16.png").pixels
    keep = ~mask.numpy()
    assert out.dtype == np.uint16 and out.shape == (W, H, 3)
    np.testing.assert_array_equal(out[keep], from_path[keep])
    np.testing.assert_array_equal(from_path[:, :, 0], np.rot90(grey, -1))  # independent of the loader


def test_a_list_mask_is_refused_with_what_to_pass(pipe):
    with pytest.raises(ValueError, match="a mask must be a path, a PIL image, a numpy array"):
        pipe(prompt="x", image=random_image(64, 64), mask_image=[[0, 1], [1, 0]])


def test_a_feather_that_erases_part_of_the_mask_warns():
    from patch_adapter.validation import check_feather

    mask = box_mask(H, W, 10, 10, 60, 60)
    mask[70:73, 10:120] = True  # a 3-px strip: a 4-px feather leaves it unfilled
    with pytest.warns(UserWarning, match=r"leaves 330 of 2,830 masked pixels unchanged"):
        check_feather(mask, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_feather(box_mask(H, W, 10, 10, 60, 60), 4)  # a plain box: no warning
