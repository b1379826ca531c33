"""Stage 2's memory: the estimate against the measured peak, bank placements, out-of-memory retries."""

import warnings

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import box_mask, random_image, seeded
from patch_adapter.memory import module_bytes


def measured_peak(fn) -> int:
    """Peak bytes of CPU tensors alive at once during fn(), from torch's allocator (via the profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run(pipe, image, mask, **kwargs):
    settings = dict(
        prompt="a red star", image=image, mask_image=mask, num_inference_steps=4, refine_steps=2, generator=seeded(0)
    )
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
    "patches, banks kept": dict(
        size=(512, 384), box=(40, 40, 340, 460), method="patch-adapter", batch=4, banks="device"
    ),
    "patches, banks recorded per call": dict(
        size=(640, 640), box=(100, 80, 540, 560), method="patch-adapter", batch=2, banks="recompute"
    ),
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


def test_kept_banks_grow_with_the_patches_in_the_estimate(pipe):
    image, mask = random_image(512, 512), box_mask(512, 512, 40, 40, 470, 470)
    plan = pipe.plan(image, mask, num_inference_steps=4, patch_batch_size=2, reference_banks="device")
    kept = plan.memory
    plan = pipe.plan(image, mask, num_inference_steps=4, patch_batch_size=2, reference_banks="recompute")
    assert kept.banks == len(plan.tiles) * kept.bank_per_patch
    assert plan.memory.banks == 2 * kept.bank_per_patch < kept.banks


def test_the_budget_picks_the_batch_then_the_placement(pipe, monkeypatch):
    """Largest batch first, banks on the device before the host, recording again per call last."""
    from patch_adapter import memory

    def fake(backbone, plan, batch, placement, device=None):  # 100 fixed, 10 a patch in a call, banks 50 a patch
        banks = {"device": 50 * len(plan.tiles), "host": 2 * 50 * batch, "recompute": 50 * batch}[placement]
        return memory.MemoryEstimate("cuda", "float16", 100, 0, 0, 10 * batch + banks, 0, banks, 50, batch, placement)

    monkeypatch.setattr(memory, "estimate_memory", fake)
    image, mask = random_image(512, 512), box_mask(512, 512, 40, 40, 470, 470)
    plan = pipe.plan(image, mask, num_inference_steps=4, max_memory=2**40)
    patches = len(plan.tiles)
    assert patches >= 16

    def choose(budget, cap=None):
        return memory.stage2_settings(pipe, plan, budget, cap, device="cuda")[:2]

    assert choose(10**9) == (8, "device")
    assert choose(10**9, cap=2) == (2, "device")
    assert choose(100 + 80 + 50 * patches - 1) == (8, "host")  # not all banks: the batch stays, banks move
    assert choose(100 + 10 + 100) == (1, "host")
    assert choose(100 + 10 + 50) == (1, "recompute")
    assert memory.stage2_settings(pipe, plan, 10**9, None, device="cpu")[:2] == (8, "device")
    assert memory.stage2_settings(pipe, plan, 100 + 80 + 800, None, device="cpu")[:2] == (8, "recompute")
