"""`patch-adapter batch`: folders and manifests through one model, resumable, across processes."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import box_mask, random_image
from patch_adapter.cli import main
from patch_adapter.image_io import load_image, save_image

SIZE = 96  # under the tiny backbone's native 128 px: one patch, fast
FAST = ["--steps", "2", "--strength", "1.0", "--guidance-scale", "1.0", "--quiet"]
ENV = {
    **os.environ,
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


def make_pair(folder, stem, seed, dtype=np.uint8, mask_dir=None):
    """An image (PNG, 8 or 16 bit) and its box mask: mask_dir/<stem>.png, or <stem>_mask.png beside the image."""
    folder.mkdir(parents=True, exist_ok=True)
    save_image(folder / f"{stem}.png", random_image(SIZE, SIZE, seed=seed, dtype=dtype))
    mask_path = mask_dir / f"{stem}.png" if mask_dir else folder / f"{stem}_mask.png"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(box_mask(SIZE, SIZE, 20 + seed, 24, 70, 80).astype(np.uint8) * 255).save(mask_path)
    return folder / f"{stem}.png"


def report(outdir):
    return [json.loads(line) for line in (outdir / "batch_report.jsonl").read_text().splitlines()]


def snapshot(folder):
    """name -> (bytes, mtime) of every file: what a rerun must leave untouched."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def test_folder_batch_equals_inpaint_and_a_rerun_skips(tmp_path, capsys):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    make_pair(images, "a", 1, mask_dir=masks)
    make_pair(images, "b", 2, dtype=np.uint16, mask_dir=masks)
    inputs = snapshot(images)
    code = main(
        [
            "batch",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--prompt",
            "a bench",
            "-o",
            str(out),
            "--seed",
            "7",
            *FAST,
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_inpainted.png", "b_inpainted.png", "batch_report.jsonl"]
    for stem in "ab":  # what inpaint writes for the same settings, to the byte
        single = tmp_path / "single" / f"{stem}.png"
        assert (
            main(
                [
                    "inpaint",
                    str(images / f"{stem}.png"),
                    "--mask",
                    str(masks / f"{stem}.png"),
                    "--prompt",
                    "a bench",
                    "-o",
                    str(single),
                    "--seed",
                    "7",
                    *FAST,
                ]
            )
            == 0
        )
        assert (out / f"{stem}_inpainted.png").read_bytes() == single.read_bytes()
    assert load_image(out / "b_inpainted.png").pixels.dtype == np.uint16  # 16-bit stays 16-bit
    assert snapshot(images) == inputs
    lines = report(out)
    assert [(r["item"], r["status"]) for r in lines] == [("a.png", "done"), ("b.png", "done")]
    assert lines[0]["settings"]["seed"] == 7 and lines[0]["seconds"] > 0
    assert "2 done, 0 skipped" in capsys.readouterr().err

    finished = snapshot(out)
    assert (
        main(
            [
                "batch",
                "--images",
                str(images),
                "--masks",
                str(masks),
                "--prompt",
                "a bench",
                "-o",
                str(out),
                "--seed",
                "7",
                *FAST,
            ]
        )
        == 0
    )
    assert "0 done, 2 skipped" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(out).items() if k != "batch_report.jsonl"} == {
        k: v for k, v in finished.items() if k != "batch_report.jsonl"
    }
    assert [r["status"] for r in report(out)] == ["skipped", "skipped"]
    # a changed prompt does not pass the old results off as new ones
    assert (
        main(
            [
                "batch",
                "--images",
                str(images),
                "--masks",
                str(masks),
                "--prompt",
                "a tree",
                "-o",
                str(out),
                "--seed",
                "7",
                *FAST,
            ]
        )
        == 0
    )
    assert "made with other settings (e.g. a.png: prompt); pass --overwrite" in capsys.readouterr().err


def test_manifest_rows_beat_flags_and_equal_inpaint(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_pair(data, "a", 1)
    make_pair(data, "b", 2)
    with open(data / "items.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "prompt", "seed", "method", "output"])
        writer.writerow(["a.png", "a_mask.png", "a red circle", "5", "resize", "sub/first.png"])
        writer.writerow(["b.png", "b_mask.png", "", "", "", ""])  # empty cells: the flags' values
    code = main(
        ["batch", "--manifest", str(data / "items.csv"), "-o", str(out), "--prompt", "a bench", "--seed", "3", *FAST]
    )
    assert code == 0
    expected = {
        out / "sub" / "first.png": [
            "a.png",
            "--mask",
            "a_mask.png",
            "--prompt",
            "a red circle",
            "--seed",
            "5",
            "--method",
            "resize",
        ],
        out / "b_inpainted.png": ["b.png", "--mask", "b_mask.png", "--prompt", "a bench", "--seed", "3"],
    }
    for path, argv in expected.items():
        single = tmp_path / "single.png"
        argv = [str(data / a) if a.endswith(".png") else a for a in argv]
        assert main(["inpaint", *argv, "-o", str(single), *FAST]) == 0
        assert path.read_bytes() == single.read_bytes(), path
    assert [r["item"] for r in report(out)] == ["items.csv line 2", "items.csv line 3"]


def test_bad_items_are_reported_and_the_batch_goes_on(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    make_pair(data, "good", 1)
    (data / "corrupt.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(data / "small_mask.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(data / "black_mask.png")
    rows = [
        {"image": "good.png", "mask": "good_mask.png", "prompt": "a bench"},
        {"image": "corrupt.png", "mask": "good_mask.png", "prompt": "a bench"},
        {"image": "good.png", "mask": "small_mask.png", "prompt": "a bench", "output": "wrong_size.png"},
        {"image": "missing.png", "mask": "good_mask.png", "prompt": "a bench"},
        {"image": "good.png", "mask": "good_mask.png", "output": "no_prompt.png"},
        {"image": "good.png", "mask": "black_mask.png", "prompt": "a bench", "output": "empty.png"},
    ]
    (data / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = main(["batch", "--manifest", str(data / "items.jsonl"), "-o", str(out), *FAST])
    assert code == 1
    lines = report(out)
    assert [r["status"] for r in lines] == ["done", "failed", "failed", "failed", "failed", "done"]
    assert "mask is empty" in lines[5]["note"] and "note" not in lines[0]
    errors = [r["error"] for r in lines[1:5]]
    assert "not an image file" in errors[0]
    assert "60x50" in errors[1] and f"{SIZE}x{SIZE}" in errors[1]
    assert "does not exist" in errors[2]
    assert "no prompt" in errors[3]
    assert sorted(p.name for p in out.iterdir()) == ["batch_report.jsonl", "empty.png", "good_inpainted.png"]
    err = capsys.readouterr().err
    assert "2 done, 0 skipped (outputs exist; --overwrite redoes them), 4 failed" in err
    assert "images/hour" in err and "failed: items.jsonl line 2" in err


def test_out_of_memory_fails_the_item_with_the_fix_and_the_batch_goes_on(tmp_path, monkeypatch, capsys):
    import torch

    import patch_adapter.batch as batch

    for stem in ("a", "b"):
        make_pair(tmp_path / "images", stem, 1, mask_dir=tmp_path / "masks")
    calls = []

    def run_item(pipe, item):
        calls.append(item.name)
        if item.name == "a.png":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(batch, "run_item", run_item)
    code = main(
        [
            "batch",
            "--images",
            str(tmp_path / "images"),
            "--masks",
            str(tmp_path / "masks"),
            "--prompt",
            "x",
            "-o",
            str(tmp_path / "out"),
            *FAST,
        ]
    )
    assert code == 1 and calls == ["a.png", "b.png"]
    failed, done = report(tmp_path / "out")
    assert failed["status"] == "failed" and "out of memory" in failed["error"]
    assert "--patch-batch-size" in failed["error"]
    assert done["status"] == "done"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["mask", "prompt"], ["a_mask.png", "x"]], "items.csv line 1: no image column"),
        ([["image", "steps"], ["a.png", "3"], ["a.png", "many"]], "items.csv line 3: argument --steps: invalid int"),
        ([["image", "strength"], ["a.png", "1.5"]], "items.csv line 2: --strength must be in (0.0, 1.0]"),
        ([["image", "method"], ["a.png", "magic"]], "items.csv line 2: argument --method: invalid choice"),
        ([["image", "colour"], ["a.png", "red"]], "items.csv line 2: unknown column 'colour'"),
        ([["image", "model"], ["a.png", "tiny"]], "items.csv line 2: model is set for the whole batch"),
        ([["image", "seed"], ["a.png", "1"], ["a.png", "2"]], "line 3 and items.csv line 2 would both write"),
        ([["image", "output"], ["a.png", "../data/a.png"]], "refusing to overwrite an input"),
        ([["image", "output"], ["a.png", "result.gif"]], "items.csv line 2: cannot tell the format of the output"),
        ([["image", "mask"], ["a.png", "a_mask.png", "extra"]], "items.csv line 2: more cells than columns"),
    ],
)
def test_manifest_errors_stop_the_command_before_any_work(tmp_path, capsys, rows, message):
    data, out = tmp_path / "data", tmp_path / "out"
    make_pair(data, "a", 1)
    with open(data / "items.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert main(["batch", "--manifest", str(data / "items.csv"), "-o", str(out), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_command_errors_are_exit_code_2(tmp_path, capsys):
    make_pair(tmp_path / "images", "a", 1)
    assert main(["batch", "--images", str(tmp_path / "images"), "-o", str(tmp_path / "out"), *FAST]) == 2
    assert "--prompt TEXT" in capsys.readouterr().err
    assert main(["batch", "--images", str(tmp_path / "nothing"), "--prompt", "x", "-o", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert (
        main(
            [
                "batch",
                "--images",
                str(tmp_path / "images"),
                "--masks",
                str(tmp_path / "images"),
                "--prompt",
                "x",
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "each image would be its own mask" in capsys.readouterr().err
    assert main(["batch", "--manifest", str(tmp_path / "m.csv"), "--masks", "m", "-o", str(tmp_path / "o")]) == 2
    assert "--masks goes with --images" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n[1, 2]\n')
    assert main(["batch", "--manifest", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "bad.jsonl line 2: each line must be a JSON object" in capsys.readouterr().err


def test_sigkill_midway_then_rerun_finishes_the_rest(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    alpha = np.full((SIZE, SIZE, 1), 255, np.uint8)
    alpha[30:60, 30:70] = 0  # no masks: the alpha channel is the mask, a transparent box
    for i in range(6):
        save_image(images / f"img{i}.png", np.dstack([random_image(SIZE, SIZE, seed=i), alpha]))
    command = [
        sys.executable,
        "-m",
        "patch_adapter.cli",
        "batch",
        "--images",
        str(images),
        "--prompt",
        "a bench",
        "-o",
        str(out),
        *FAST,
    ]
    batch = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*_inpainted.png")) and time.monotonic() < deadline and batch.poll() is None:
            time.sleep(0.02)
    finally:
        batch.send_signal(signal.SIGKILL)
        batch.wait()
    finished = snapshot(out)
    assert 1 <= len([name for name in finished if name.endswith("_inpainted.png")]) < 6
    (out / ".img5_inpainted.png.0123456789ab.tmp").write_bytes(b"half an image")  # as a kill mid-write leaves
    (out / ".notes.png.0123456789ab.tmp").write_bytes(b"not ours")  # another writer's: left alone

    assert main(["batch", "--images", str(images), "--prompt", "a bench", "-o", str(out), *FAST]) == 0
    skipped = len([name for name in finished if name.endswith("_inpainted.png")])
    err = capsys.readouterr().err
    assert f"{6 - skipped} done, {skipped} skipped" in err and "temporary file(s) an interrupted run left" in err
    after = snapshot(out)
    assert all(after[name] == finished[name] for name in finished if name.endswith(".png"))  # bytes and mtimes
    assert sorted(after) == [".notes.png.0123456789ab.tmp", "batch_report.jsonl"] + [
        f"img{i}_inpainted.png" for i in range(6)
    ]  # none of our temporary files


def test_processes_that_do_not_see_each_other_are_refused(tmp_path, monkeypatch, capsys):
    """torchrun started two processes, but without ACCELERATE_USE_CPU each would do every item."""
    make_pair(tmp_path / "images", "a", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert main(["batch", "--images", str(tmp_path / "images"), "--prompt", "x", "-o", str(tmp_path / "o")]) == 2
    assert "set ACCELERATE_USE_CPU=true" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate_launch_share_the_items(tmp_path):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    for i in range(5):
        make_pair(images, f"img{i}", i, mask_dir=masks)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "patch_adapter.cli",
        "batch",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--prompt",
        "a bench",
        "-o",
        str(out),
        *FAST,
    ]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    # output to files, not pipes: workers that outlive a killed launcher would hold pipes open
    with open(tmp_path / "stderr.txt", "w") as stderr:
        launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            launcher.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
            pytest.fail("two-process batch did not finish in 180 s:\n" + (tmp_path / "stderr.txt").read_text()[-3000:])
    log = (tmp_path / "stderr.txt").read_text()
    assert launcher.returncode == 0, log[-3000:]
    lines = report(out)
    assert [r["item"] for r in lines] == [f"img{i}.png" for i in range(5)]  # one report, each item once
    assert all(r["status"] == "done" for r in lines)
    assert sorted({r["process"] for r in lines}) == [0, 1]  # both processes worked
    assert sorted(p.name for p in out.iterdir()) == ["batch_report.jsonl"] + [f"img{i}_inpainted.png" for i in range(5)]
    assert log.count("5 done, 0 skipped") == 1 and "on 2 processes" in log
