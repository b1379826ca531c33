"""Training data: the three layouts, unreadable files, aspect buckets, stage-2 references."""

import io
import json
import math
import tarfile
from itertools import islice

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from patch_adapter.cli import main
from patch_adapter.planning import native_dims
from patch_adapter.training.config import TrainConfig
from patch_adapter.training.data import (
    BatchStream,
    TrainingData,
    check_dataset,
    find_records,
    group_by_bucket,
    make_buckets,
    make_toy_dataset,
    nearest_bucket,
    scan_dataset,
    synthesize_reference,
)

NATIVE = 128  # the tiny backbone's


def png_bytes(pixels):
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- layouts


def test_imagefolder_with_metadata_jsonl(tmp_path):
    make_toy_dataset(tmp_path / "part1", count=2, size=64)
    make_toy_dataset(tmp_path / "part2", count=3, size=(96, 64), seed=1)
    report = scan_dataset(tmp_path)
    assert len(report.records) == 5 and report.missing_captions == 0
    lines = [json.loads(x) for x in (tmp_path / "part2" / "metadata.jsonl").read_text().splitlines()]
    by_file = {r.source: r for r in report.records}
    record = by_file[str(tmp_path / "part2" / lines[0]["file_name"])]
    assert record.caption == lines[0]["text"]
    assert (record.width, record.height) == (96, 64)
    assert np.asarray(record.open()).shape == (64, 96, 3)


def test_sidecar_captions_and_missing_ones(tmp_path):
    make_toy_dataset(tmp_path, count=3, size=64, captions="sidecar")
    (tmp_path / "scene_0001.txt").unlink()
    report = scan_dataset(tmp_path)
    captions = {r.key.rsplit("/", 1)[-1]: r.caption for r in report.records}
    assert captions["scene_0001.png"] is None
    assert captions["scene_0000.png"] == (tmp_path / "scene_0000.txt").read_text()
    assert report.missing_captions == 1


def test_webdataset_tar_shards(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-000.tar", "w") as tar:
        add_member(tar, "a/000.png", png_bytes(images[0]))
        add_member(tar, "a/000.txt", b"a photo of noise")
        add_member(tar, "a/001.png", png_bytes(images[1]))
        add_member(tar, "a/001.json", json.dumps({"caption": "json caption", "width": 64, "height": 48}).encode())
    with tarfile.open(shards / "train-001.tar", "w") as tar:
        add_member(tar, "002.png", png_bytes(images[2]))  # no caption
    report = scan_dataset(shards)
    assert [r.caption for r in report.records] == ["a photo of noise", "json caption", None]
    for record, image in zip(report.records, images, strict=True):
        assert np.array_equal(np.asarray(record.open()), image)  # read by seeking into the shard
    assert len(find_records(shards / "train-001.tar").records) == 1  # a single shard works too


# --------------------------------------------------------------------------- unreadable images


def corrupt_folder(tmp_path):
    make_toy_dataset(tmp_path, count=3, size=64, captions="sidecar")
    (tmp_path / "broken.png").write_bytes(b"this is not an image")  # the header fails: left out at the scan
    good = (tmp_path / "scene_0000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 3])  # header fine, decoding fails later
    return tmp_path


def test_unreadable_images_are_counted_and_skipped(tmp_path):
    root = corrupt_folder(tmp_path)
    report = scan_dataset(root)
    assert report.unreadable == [str(root / "broken.png")]
    keys = [r.key for r in report.records]
    assert str(root / "truncated.png") in keys
    dataset = TrainingData(report.records, TrainConfig(), NATIVE)
    image, record, skipped = dataset.load(keys.index(str(root / "truncated.png")))
    assert skipped == [str(root / "truncated.png")] and record.key != skipped[0]
    assert check_dataset(root, native=NATIVE)["unreadable"] == 2  # data check decodes everything


def test_data_check_command(tmp_path, capsys):
    make_toy_dataset(tmp_path / "big", count=2, size=256)
    make_toy_dataset(tmp_path / "small", count=3, size=(200, 300), captions="sidecar")
    (tmp_path / "small" / "scene_0002.txt").unlink()
    (tmp_path / "small" / "broken.png").write_bytes(b"\x89PNG garbage")
    assert main(["data", "check", str(tmp_path / "small"), "--native", str(NATIVE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 4 and report["unreadable"] == 1
    assert report["missing_captions"] == 1
    assert report["too_small_for_stage2"] == 3 and report["stage2_usable"] == 0
    assert report["shorter_side"] == {"min": 200, "median": 200, "max": 200}
    assert main(["data", "check", str(tmp_path / "big"), "--native", str(NATIVE)]) == 0
    assert "stage2_usable: 2" in capsys.readouterr().out


# --------------------------------------------------------------------------- stage 1 buckets


def test_buckets_keep_the_aspect_and_the_pixel_budget():
    step = 32
    buckets = make_buckets(NATIVE, step, max_aspect=2.0)
    assert all(w % step == 0 and h % step == 0 and w * h <= NATIVE * NATIVE for w, h in buckets)
    for width, height in [(400, 200), (200, 400), (300, 300), (320, 240), (240, 320)]:
        bw, bh = nearest_bucket(width, height, buckets)
        gap = abs(math.log(bw / bh) - math.log(width / height))
        assert gap == min(abs(math.log(w / h) - math.log(width / height)) for w, h in buckets)
        assert gap < 0.25, (width, height, bw, bh)
        assert (bw > bh) == (width > height) or width == height


def test_stage1_samples_fill_their_bucket_without_stretching(tmp_path):
    make_toy_dataset(tmp_path, count=1, size=(256, 128))
    config = TrainConfig(random_flip=False, caption_dropout=0.0)
    report = scan_dataset(tmp_path)
    groups, buckets = group_by_bucket(report.records, config, NATIVE)
    ((bucket, indices),) = groups.items()
    bw, bh = bucket
    assert bw / bh == pytest.approx(2.0, rel=0.3)
    sample = TrainingData(report.records, config, NATIVE)[(indices[0], 5, bucket)]
    assert sample["pixels"].shape == (3, bh, bw) and sample["mask"].shape == (1, bh, bw)
    # the image scaled by one factor to cover the bucket, then cropped: compare with that directly
    image = report.records[0].open()
    scale = max(bw / image.width, bh / image.height)
    covered = np.asarray(
        image.resize(
            (max(bw, round(image.width * scale)), max(bh, round(image.height * scale))), PIL.Image.Resampling.LANCZOS
        )
    )
    pixels = ((sample["pixels"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)
    matches = [
        np.abs(covered[top : top + bh, left : left + bw].astype(int) - pixels).max() <= 1
        for top in range(covered.shape[0] - bh + 1)
        for left in range(covered.shape[1] - bw + 1)
    ]
    assert any(matches)


# --------------------------------------------------------------------------- stage 2 references


def located_image(height, width, seed=0):
    """R and G say where a pixel is (x, y); B is grain that down- and upscaling blur away."""
    y, x = np.mgrid[0:height, 0:width]
    grain = np.random.default_rng(seed).integers(0, 256, size=(height, width))
    return np.stack([x, y, grain], axis=-1).astype(np.uint8)


def direct_reference(image, box, native):
    """The whole image to native size (Lanczos) and back up (bicubic), then the box: no shortcuts."""
    height, width = image.shape[:2]
    low_w, low_h = native_dims(width, height, native)
    low = np.asarray(PIL.Image.fromarray(image).resize((low_w, low_h), PIL.Image.Resampling.LANCZOS))
    low = torch.from_numpy(low.astype(np.float32) / 255).permute(2, 0, 1)[None]
    up = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    top, left, bottom, right = box
    return up[0, :, top:bottom, left:right].permute(1, 2, 0).numpy()


UNDEGRADED = dict(stage="stage2", reference_blur=0.0, reference_color=0.0, reference_shift=0.0)


def test_reference_is_the_downscaled_and_upscaled_image_at_the_same_place():
    image = located_image(256, 240)
    box = (70, 33, 70 + NATIVE, 33 + NATIVE)
    reference = synthesize_reference(image, box, NATIVE, np.random.default_rng(0), TrainConfig(**UNDEGRADED))
    np.testing.assert_allclose(reference, direct_reference(image, box, NATIVE), atol=2e-5)
    # it is the soft look of stage 1, not the picture itself
    assert np.abs(reference[..., 2] - image[70:198, 33:161, 2] / 255).mean() > 0.1


def test_stage2_sample_pairs_a_native_crop_with_its_reference(tmp_path):
    image = located_image(256, 240)
    PIL.Image.fromarray(image).save(tmp_path / "located.png")
    (tmp_path / "located.txt").write_text("a test card")
    config = TrainConfig(random_flip=False, **UNDEGRADED)
    report = scan_dataset(tmp_path, min_side=2 * NATIVE - 16)
    sample = TrainingData(report.records, config, NATIVE)[(0, 3, (NATIVE, NATIVE))]
    crop = np.round((sample["pixels"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    assert crop.shape == (NATIVE, NATIVE, 3)
    left, top = int(crop[0, 0, 0]), int(crop[0, 0, 1])  # where the crop came from
    assert np.array_equal(crop, image[top : top + NATIVE, left : left + NATIVE])
    mask = sample["mask"][0].numpy() > 0.5
    reference = (sample["reference"].permute(1, 2, 0).numpy() + 1) / 2
    expected = direct_reference(image, (top, left, top + NATIVE, left + NATIVE), NATIVE)
    np.testing.assert_allclose(reference[mask], expected[mask], atol=1e-5)
    np.testing.assert_allclose(reference[~mask], crop[~mask] / 255, atol=1e-6)  # the original outside the mask


def test_reference_degradations_change_it():
    image = located_image(256, 256)
    box = (64, 64, 64 + NATIVE, 64 + NATIVE)
    clean = synthesize_reference(image, box, NATIVE, np.random.default_rng(0), TrainConfig(**UNDEGRADED))
    for kind in ("reference_blur", "reference_color", "reference_shift"):
        config = TrainConfig(**{**UNDEGRADED, kind: 1.0})
        degraded = synthesize_reference(image, box, NATIVE, np.random.default_rng(0), config)
        assert np.abs(degraded - clean).max() > 1e-3, kind


def test_too_small_images_are_left_out_of_stage2(tmp_path):
    make_toy_dataset(tmp_path / "a", count=2, size=256)
    make_toy_dataset(tmp_path / "b", count=1, size=(300, 200), seed=3)
    report = scan_dataset(tmp_path, min_side=2 * NATIVE)
    assert len(report.records) == 2 and len(report.too_small) == 1


# --------------------------------------------------------------------------- batch order


def test_batch_stream_resumes_exactly_and_shards_processes():
    groups = {(128, 128): list(range(7)), (160, 96): list(range(7, 12))}
    whole = list(islice(BatchStream(groups, 2, seed=3), 40))
    assert list(islice(BatchStream(groups, 2, seed=3, start=13), 27)) == whole[13:]
    assert whole != list(islice(BatchStream(groups, 2, seed=4), 40))
    # two processes take turns through one global order of batches (an epoch of 7 batches
    # gives each 3: the odd one out is dropped so that both finish the epoch together)
    p0 = list(islice(BatchStream(groups, 2, seed=3, num_processes=2, process_index=0), 3))
    p1 = list(islice(BatchStream(groups, 2, seed=3, num_processes=2, process_index=1), 3))
    assert [b for pair in zip(p0, p1, strict=True) for b in pair] == whole[:6]
    for batch in whole:
        assert len({bucket for _, _, bucket in batch}) == 1  # one bucket per batch
