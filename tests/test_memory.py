"""Stage 2's memory: the estimate against the measured peak, bank placements, out-of-memory retries."""

import warnings

import numpy as np
import pytest
import torch
from conftest import box_mask, random_image, seeded
from torch.profiler import ProfilerActivity, profile

from patch_adapter.memory import estimate_memory, module_bytes


def measured_peak(fn) -> int:
    """Peak bytes of CPU tensors alive at once during fn(), from torch's allocator (via the profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run(pipe, image, mask, **kwargs):
    settings = dict(prompt="a red star", image=image, mask_image=mask, num_inference_steps=4, refine_steps=2,
                    generator=seeded(0))
    return pipe(**{**settings, **kwargs})


@pytest.mark.parametrize("placement", ["recompute"])
def test_bank_placements_give_the_same_result(pipe, placement):
    """Where the banks live changes memory and time, never the pixels."""
    image, mask = random_image(320, 320), box_mask(320, 320, 60, 60, 260, 250)
    kept = run(pipe, image, mask, patch_batch_size=2, reference_banks="device")
    other = run(pipe, image, mask, patch_batch_size=2, reference_banks=placement)
    assert len(kept.plan.tiles) > 2
    np.testing.assert_array_equal(kept.arrays[0], other.arrays[0])


def test_host_banks_are_refused_on_the_cpu(pipe):
    image, mask = random_image(256, 256), box_mask(256, 256, 60, 60, 200, 200)
    with pytest.raises(ValueError, match="accelerators"):
        run(pipe, image, mask, reference_banks="host")


def test_out_of_memory_halves_the_patch_batch_and_retries(pipe, monkeypatch):
    """A patch batch that does not fit is halved, said once, and the result is the smaller batch's."""
    image, mask = random_image(320, 320), box_mask(320, 320, 60, 60, 260, 250)
    expected = run(pipe, image, mask, patch_batch_size=1, reference_banks="device")
    predict = type(pipe).predict_noise
    calls = []

    def tight(self, latents, *args, **kwargs):
        calls.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(self, latents, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "predict_noise", tight)
    with pytest.warns(UserWarning, match="ran out of memory") as said:
        result = run(pipe, image, mask, patch_batch_size=4, reference_banks="device")
    assert len([w for w in said if "ran out of memory" in str(w.message)]) == 1
    assert 4 in calls and 2 in calls  # it tried 4, then 2, then 1
    np.testing.assert_array_equal(result.arrays[0], expected.arrays[0])


def test_other_errors_are_not_retried(pipe, monkeypatch):
    image, mask = random_image(320, 320), box_mask(320, 320, 60, 60, 260, 250)

    def broken(self, latents, *args, **kwargs):
        raise RuntimeError("shapes cannot be multiplied")

    monkeypatch.setattr(type(pipe), "_refine_patches", broken)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*out of memory")
        with pytest.raises(RuntimeError, match="shapes"):
            run(pipe, image, mask, patch_batch_size=2)


PLANS = {  # three very different plans: one whole-image pass; many patches, banks kept; recorded per call
    "stage 1 only": dict(size=(128, 112), box=(20, 20, 90, 80), method="patch-adapter", batch=1, banks="device"),
    "patches, banks kept": dict(size=(512, 384), box=(40, 40, 340, 460), method="patch-adapter", batch=4,
                                banks="device"),
    "patches, banks recorded per call": dict(size=(640, 640), box=(100, 80, 540, 560), method="patch-adapter",
                                             batch=2, banks="recompute"),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_estimate_is_within_a_quarter_of_the_measured_peak(pipe, name):
    case = PLANS[name]
    width, height = case["size"]
    image, mask = random_image(height, width), box_mask(height, width, *case["box"])
    kwargs = dict(method=case["method"], patch_batch_size=case["batch"], reference_banks=case["banks"])
    plan = pipe.plan(image, mask, num_inference_steps=4, refine_steps=2, **kwargs)
    estimate = plan.memory
    working = measured_peak(lambda: run(pipe, image, mask, **kwargs))
    weights = module_bytes(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    assert estimate.weights == weights
    assert abs(estimate.peak - (weights + working)) <= 0.25 * (weights + working), (estimate.describe(), working)
    # the working part alone (what grows with the plan) is within the same bound
    assert abs((estimate.peak - weights) - working) <= 0.25 * working, (estimate.describe(), working)


def test_peak_follows_the_patch_batch_not_the_number_of_patches(pipe):
    """With banks recorded per call, 64 patches need no more than 4 beyond one batch's banks."""
    peaks, banks = {}, {}
    for count, side in ((4, 224), (64, 872)):
        image = random_image(side, side)
        mask = box_mask(side, side, 8, 8, side - 8, side - 8)
        kwargs = dict(patch_batch_size=2, reference_banks="recompute", tile_overlap=32)
        plan = pipe.plan(image, mask, num_inference_steps=4, refine_steps=2, **kwargs)
        assert len(plan.tiles) == count
        banks[count] = 2 * plan.memory.bank_per_patch
        peaks[count] = measured_peak(lambda: run(pipe, image, mask, method="patch-adapter", **kwargs))
    assert peaks[64] - peaks[4] < banks[4], (peaks, banks)


def test_kept_banks_grow_with_the_patches_in_the_estimate(pipe):
    image, mask = random_image(512, 512), box_mask(512, 512, 40, 40, 470, 470)
    plan = pipe.plan(image, mask, num_inference_steps=4, patch_batch_size=2, reference_banks="device")
    kept = plan.memory
    plan = pipe.plan(image, mask, num_inference_steps=4, patch_batch_size=2, reference_banks="recompute")
    assert kept.banks == len(plan.tiles) * kept.bank_per_patch
    assert plan.memory.banks == 2 * kept.bank_per_patch < kept.banks


def test_a_tight_budget_picks_smaller_settings(pipe):
    image, mask = random_image(512, 512), box_mask(512, 512, 40, 40, 470, 470)
    roomy = pipe.plan(image, mask, num_inference_steps=4, max_memory=2**40).memory
    assert (roomy.patch_batch_size, roomy.bank_placement) == (8, "device")
    budget = roomy.peak - roomy.banks + 4 * roomy.bank_per_patch  # room for a few banks, not all
    tight = pipe.plan(image, mask, num_inference_steps=4, max_memory=budget).memory
    assert tight.bank_placement == "recompute" and tight.peak <= budget
    assert estimate_memory(pipe, pipe.plan(image, mask, num_inference_steps=4), 8, "device").peak > budget


def test_cli_plan_prints_the_memory_estimate_without_loading_weights(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from patch_adapter import cli, pipeline

    monkeypatch.setattr(pipeline.PatchAdapterPipeline, "from_pretrained",
                        lambda *a, **k: pytest.fail("--plan must not load the model"))
    Image.fromarray(random_image(512, 384)).save(tmp_path / "image.png")
    Image.fromarray(box_mask(384, 512, 40, 40, 300, 400).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    argv = ["inpaint", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--plan",
            "--device", "cpu"]
    assert cli.main(argv) == 0
    roomy = capsys.readouterr().out
    assert "memory estimate on cpu (float32): peak" in roomy and "patch batch 8" in roomy
    assert cli.main(argv + ["--max-memory", "12MiB"]) == 0
    tight = capsys.readouterr().out
    assert "reference banks on the recompute" in tight, tight


@pytest.mark.parametrize("text, expected", [("20GiB", 20 * 2**30), ("16GB", 16 * 10**9), ("8000 MB", 8 * 10**9),
                                            ("1024", 1024), ("1.5kib", 1536)])
def test_memory_sizes_parse(text, expected):
    from patch_adapter.cli import memory_size

    assert memory_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "nanGB", "3 parsecs", "0"])
def test_bad_memory_sizes_are_refused(text):
    import argparse

    from patch_adapter.cli import memory_size

    with pytest.raises(argparse.ArgumentTypeError, match="memory size"):
        memory_size(text)
