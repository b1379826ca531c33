import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time notes about torchvision

import numpy as np
import pytest
import torch

from patch_adapter.pipeline import PatchAdapterPipeline

# One thread per test process: `make test` runs two processes on two cores, and torch's
# thread pools slow down by orders of magnitude when they oversubscribe the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny backbone with untrained adapters, on the CPU, progress bars off."""
    pipe = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tiny_pipe):
    """The shared pipeline with its adapters reset and the default scheduler, per test."""
    from patch_adapter.adapters import reset_adapters

    reset_adapters(tiny_pipe.unet)
    tiny_pipe.set_scheduler("euler")
    return tiny_pipe


def random_image(height, width, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    return rng.integers(0, top + 1, size=(height, width, 3), dtype=np.int64).astype(dtype)


def box_mask(height, width, top, left, bottom, right):
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)
