"""The `patch-adapter` command: a thin front end, checked end to end on the tiny backbone."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import box_mask, random_image
from patch_adapter.cli import main
from patch_adapter.image_io import load_image, read_metadata

FAST = ["--steps", "2", "--strength", "1.0", "--guidance-scale", "1.0", "--quiet"]


@pytest.fixture
def files(tmp_path):
    image = random_image(200, 300, seed=1)
    mask = box_mask(200, 300, 40, 60, 150, 210)
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path, image, mask


def test_inpaint_writes_result_with_its_parameters(files, capsys):
    folder, image, mask = files
    out = folder / "out" / "result.png"
    code = main(
        [
            "inpaint",
            str(folder / "photo.png"),
            "--mask",
            str(folder / "mask.png"),
            "--prompt",
            "a bench",
            "-o",
            str(out),
            "--seed",
            "3",
            *FAST,
        ]
    )
    assert code == 0
    result = load_image(out).pixels
    assert np.array_equal(result[~mask], image[~mask]) and not np.array_equal(result[mask], image[mask])
    meta = read_metadata(out)
    assert meta["prompt"] == "a bench" and meta["seed"] == 3 and meta["method"] == "patch-adapter"
    assert meta["unet_forwards"] > 0
    assert not [p for p in out.parent.iterdir() if p.name != "result.png"]  # no temporary files left


def test_output_folder_and_several_images(files):
    folder, image, _ = files
    (folder / "results").mkdir()
    code = main(
        [
            "inpaint",
            str(folder / "photo.png"),
            "--mask",
            str(folder / "mask.png"),
            "-o",
            str(folder / "results"),
            "--num-images",
            "2",
            "--method",
            "resize",
            *FAST,
        ]
    )
    assert code == 0
    assert sorted(p.name for p in (folder / "results").iterdir()) == ["photo_inpainted_0.png", "photo_inpainted_1.png"]


def test_refuses_to_overwrite_the_input(files, capsys):
    folder, image, _ = files
    before = (folder / "photo.png").read_bytes()
    code = main(
        [
            "inpaint",
            str(folder / "photo.png"),
            "--mask",
            str(folder / "mask.png"),
            "-o",
            str(folder / "photo.png"),
            *FAST,
        ]
    )
    assert code == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert (folder / "photo.png").read_bytes() == before


def test_mask_of_another_size_is_exit_code_2_naming_both_sizes(files, capsys):
    folder, _, _ = files
    Image.fromarray(np.zeros((100, 100), dtype=np.uint8)).save(folder / "small.png")
    code = main(
        [
            "inpaint",
            str(folder / "photo.png"),
            "--mask",
            str(folder / "small.png"),
            "-o",
            str(folder / "out.png"),
            *FAST,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "100x100" in err and "300x200" in err
    assert not (folder / "out.png").exists()


def test_missing_output_and_missing_image_are_exit_code_2(files, capsys):
    folder, _, _ = files
    assert main(["inpaint", str(folder / "photo.png"), "--mask", str(folder / "mask.png")]) == 2
    assert "-o OUT" in capsys.readouterr().err
    assert main(["inpaint", str(folder / "nope.png"), "--mask", str(folder / "mask.png"), "-o", "x.png"]) == 2


def test_installed_command_prints_the_plan_without_a_model(tmp_path):
    image = np.zeros((2160, 3840, 3), dtype=np.uint8)
    mask = box_mask(2160, 3840, 1000, 1500, 1400, 2100)
    Image.fromarray(image).save(tmp_path / "big.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    command = Path(sys.executable).with_name("patch-adapter")
    proc = subprocess.run(
        [
            str(command),
            "inpaint",
            str(tmp_path / "big.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "--plan",
            "--steps",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "image: 3840x2160 px" in proc.stdout and "UNet forwards:" in proc.stdout
    assert "patch 0:" in proc.stdout
    assert not list(tmp_path.glob("*inpainted*"))


def test_demo_writes_results_and_sheet(tmp_path, capsys):
    code = main(["demo", "-o", str(tmp_path / "demo"), "--size", "256", "--steps", "3", "--quiet", "--device", "cpu"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["comparison.png", "input.png", "patch-adapter.png", "resize.png", "tiled.png"]
    sheet = load_image(tmp_path / "demo" / "comparison.png").pixels
    assert sheet.shape[1] > 6 * 256  # input, mask, three results, truth side by side
    out = capsys.readouterr().out
    assert out.count("| 0 |") == 3  # no pixel outside the mask changed, for every method


def test_adapter_none_leaves_out_the_shipped_adapters(monkeypatch):
    from patch_adapter.cli import build_parser
    from patch_adapter.pipeline import PatchAdapterPipeline

    parser = build_parser()
    assert parser.parse_args(["demo", "-o", "x", "--adapter", "none"]).adapter is False
    assert parser.parse_args(["demo", "-o", "x", "--adapter", "a.safetensors"]).adapter == "a.safetensors"
    assert parser.parse_args(["demo", "-o", "x"]).adapter is None
    asked = []
    monkeypatch.setattr(PatchAdapterPipeline, "load_adapter", lambda self, path: asked.append(path))
    PatchAdapterPipeline.from_pretrained("tiny", device="cpu", adapter=False)
    assert asked == []
    PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    assert [p.name for p in asked] == ["patch_adapter.safetensors"]  # the trained tiny weights ship adapters
