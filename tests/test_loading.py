"""The loading contract of a diffusers drop-in, tried as a diffusers user would, on the tiny backbone.

Offline: a hub id is served from a hub cache made here, with local_files_only=True
(HF_HUB_OFFLINE set here comes after huggingface_hub has read it, through conftest).
"""

import json
import os
import shutil
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoPipelineForInpainting,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file

from conftest import box_mask, random_image, seeded
from patch_adapter.adapters import BUNDLED_ADAPTER_FILE, adapter_processors, adapter_state_dict, reset_adapters
from patch_adapter.backbone import BackboneLoadError, tiny_weights_dir
from patch_adapter.loading import STOCK_CLASS_NAME
from patch_adapter.pipeline import PatchAdapterPipeline

# stage 1 and stage 2 both run (260 px > the tiny backbone's 128), guidance on, few steps
SMALL = dict(num_inference_steps=3, strength=1.0, refine_steps=2, guidance_scale=3.0)


def inpaint(pipe, seed=0):
    image = random_image(200, 260, seed=12)
    mask = box_mask(200, 260, 60, 70, 150, 200)
    return pipe(prompt="a red ball", image=image, mask_image=mask, generator=seeded(seed), **SMALL).arrays[0]


def stock_inpaint(pipe):
    """A stock diffusers call at the native size; returns uint8 pixels."""
    pipe.set_progress_bar_config(disable=True)
    size = 128
    image = PIL.Image.fromarray(random_image(size, size, seed=4))
    mask = PIL.Image.fromarray(box_mask(size, size, 30, 20, 100, 90).astype(np.uint8) * 255)
    out = pipe(
        prompt="a red ball",
        image=image,
        mask_image=mask,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=seeded(1),
        output_type="np",
    ).images[0]
    return out


def initial_state(pipe):
    """The adapters' initial weights on this pipeline's UNet (the trained ones are put back)."""
    trained = {k: v.clone() for k, v in adapter_state_dict(pipe.unet).items()}
    reset_adapters(pipe.unet)
    initial = {k: v.clone() for k, v in adapter_state_dict(pipe.unet).items()}
    for key, value in adapter_state_dict(pipe.unet).items():
        value.copy_(trained[key])
    return initial


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained():
    """The tiny backbone with its shipped (trained) adapters."""
    pipe = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "model"
    trained.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock_output(trained):
    """What stock diffusers computes with the tiny backbone's weights, stock processors only."""
    stock = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_weights_dir(), dtype=torch.float32)
    assert all(type(p) is AttnProcessor2_0 for p in stock.unet.attn_processors.values())
    return stock_inpaint(stock)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_identical(trained, saved):
    assert (saved / "model_index.json").is_file() and (saved / BUNDLED_ADAPTER_FILE).is_file()
    unet_file = next((saved / "unet").glob("*.safetensors"))
    assert not any(".processor." in key for key in load_file(str(unet_file)))  # adapters only in their file
    assert adapter_processors(trained.unet)  # and still installed after saving
    loaded = PatchAdapterPipeline.from_pretrained(saved, device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is type(trained.scheduler)
    assert same_state(adapter_state_dict(loaded.unet), adapter_state_dict(trained.unet))
    before = inpaint(trained)
    assert np.array_equal(inpaint(loaded), before)
    # the adapter file is what carries the trained adapters: without it the result differs
    bare = PatchAdapterPipeline.from_pretrained(saved, device="cpu", adapter=False)
    bare.set_progress_bar_config(disable=True)
    assert not np.array_equal(inpaint(bare), before)


def test_saved_model_index_names_the_stock_class(saved):
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == STOCK_CLASS_NAME
    shipped = json.loads((tiny_weights_dir() / "model_index.json").read_text())
    assert shipped["_class_name"] == STOCK_CLASS_NAME


@pytest.mark.parametrize("loader", [DiffusionPipeline, AutoPipelineForInpainting])
@pytest.mark.parametrize("where", ["saved", "tiny"])
def test_generic_diffusers_loaders_give_the_stock_backbone(loader, where, saved, stock_output):
    folder = saved if where == "saved" else tiny_weights_dir()
    pipe = loader.from_pretrained(folder, dtype=torch.float32)
    assert type(pipe) is StableDiffusionXLInpaintPipeline  # the backbone, without the adapters
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    if where == "tiny":
        assert np.array_equal(stock_inpaint(pipe), stock_output)
    else:  # the same weights stored in fp32 instead of fp16: memory-mapped at another alignment, BLAS
        # kernels round a few values differently (measured: 2e-7 in the pooled text embedding)
        assert np.allclose(stock_inpaint(pipe), stock_output, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- from_pretrained keywords


def test_from_pretrained_takes_diffusers_keywords(trained, tmp_path):
    scheduler = DDIMScheduler.from_config(trained.scheduler.config)
    pipe = PatchAdapterPipeline.from_pretrained(
        "tiny",
        device="cpu",
        use_safetensors=True,
        low_cpu_mem_usage=True,
        revision="main",
        cache_dir=str(tmp_path),
        token=None,
        variant=None,
        local_files_only=True,
        scheduler=scheduler,
        torch_dtype={"unet": torch.bfloat16, "default": torch.float32},
    )
    assert pipe.scheduler is scheduler
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float32
    assert {p.dtype for p in adapter_state_dict(pipe.unet).values()} == {torch.bfloat16}
    assert same_state(
        {k: v.float() for k, v in adapter_state_dict(pipe.unet).items()},
        {k: v.to(torch.bfloat16).float() for k, v in adapter_state_dict(trained.unet).items()},
    )
    assert PatchAdapterPipeline.from_pretrained("tiny", device="cpu", dtype="fp16").vae.dtype == torch.float16
    assert (
        type(
            PatchAdapterPipeline.from_pretrained(
                "tiny", device="cpu", scheduler="ddim", low_cpu_mem_usage=False
            ).scheduler
        )
        is DDIMScheduler
    )


def test_component_override_is_used(trained):
    unet = UNet2DConditionModel.from_pretrained(tiny_weights_dir(), subfolder="unet")
    vae = trained.vae
    pipe = PatchAdapterPipeline.from_pretrained("tiny", device="cpu", unet=unet, vae=vae)
    assert pipe.unet is unet and pipe.vae is vae
    # the folder's adapters are loaded into the override
    assert same_state(adapter_state_dict(pipe.unet), adapter_state_dict(trained.unet))


def test_override_unet_with_its_own_processors_is_not_changed_in_silence():
    class CustomProcessor(AttnProcessor2_0):  # stands for an IP-Adapter's processors
        pass

    unet = UNet2DConditionModel.from_pretrained(tiny_weights_dir(), subfolder="unet")
    unet.set_attn_processor(CustomProcessor())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PatchAdapterPipeline.from_pretrained("tiny", device="cpu", unet=unet)
    said = [str(w.message) for w in caught if "own attention processors" in str(w.message)]
    kept = any(isinstance(p, CustomProcessor) for p in unet.attn_processors.values())
    assert said or kept, "the override's processors were replaced without a word"


def test_device_map_is_handed_to_diffusers():
    pipe = PatchAdapterPipeline.from_pretrained("tiny", device_map="cpu")
    assert pipe.hf_device_map is not None and pipe.device.type == "cpu"
    with pytest.raises(ValueError, match="device_map"):
        PatchAdapterPipeline.from_pretrained("tiny", device_map="cpu", device="cpu")


def test_unknown_keywords_are_refused_by_name(saved):
    with pytest.raises(TypeError, match="torch_dtpye"):
        PatchAdapterPipeline.from_pretrained("tiny", torch_dtpye=torch.float16)
    with pytest.raises(TypeError, match="bogus"):
        PatchAdapterPipeline.from_pretrained(saved, bogus=1)
    with pytest.raises(TypeError, match="custom_pipeline"):
        PatchAdapterPipeline.from_pretrained(saved, custom_pipeline="x")
    with pytest.raises(TypeError, match="config="):
        PatchAdapterPipeline.from_pretrained(saved, config=str(saved))
    with pytest.raises(ValueError, match="unknown dtype"):
        PatchAdapterPipeline.from_pretrained(saved, dtype="fp8")


def test_adapter_false_gives_initial_adapters(trained):
    bare = PatchAdapterPipeline.from_pretrained("tiny", device="cpu", adapter=False)
    assert same_state(adapter_state_dict(bare.unet), initial_state(trained))
    assert not same_state(adapter_state_dict(trained.unet), initial_state(trained))


def test_sources_fail_with_what_to_do(tmp_path):
    with pytest.raises(BackboneLoadError, match="hf download someone/missing-model"):
        PatchAdapterPipeline.from_pretrained("someone/missing-model", local_files_only=True)
    with pytest.raises(BackboneLoadError, match="hf download someone/missing-model"):
        PatchAdapterPipeline.from_pretrained("someone/missing-model")  # HF_HUB_OFFLINE
    with pytest.raises(BackboneLoadError, match="no model_index.json"):
        PatchAdapterPipeline.from_pretrained(tmp_path)
    with pytest.raises(BackboneLoadError, match="does not exist"):
        PatchAdapterPipeline.from_pretrained(tmp_path / "sdxl.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BackboneLoadError, match="single-file checkpoint"):
        PatchAdapterPipeline.from_pretrained(tmp_path / "broken.safetensors", local_files_only=True)
    with pytest.raises(BackboneLoadError, match="single-file checkpoint"):
        PatchAdapterPipeline.from_single_file(
            str(tmp_path / "broken.safetensors"), local_files_only=True, scheduler=DDIMScheduler()
        )
    with pytest.raises(TypeError, match="bogus"):
        PatchAdapterPipeline.from_pretrained(tmp_path / "broken.safetensors", bogus=1)
    with pytest.raises(BackboneLoadError, match="neither 'tiny'"):
        PatchAdapterPipeline.from_pretrained("not a model")


def test_text_to_image_unet_is_refused():
    from diffusers import UNet2DConditionModel as UNet

    config = dict(UNet.load_config(tiny_weights_dir(), subfolder="unet"), in_channels=4)
    unet = UNet.from_config(config)
    with pytest.raises(BackboneLoadError, match="4 input channels"):
        PatchAdapterPipeline.from_pretrained("tiny", device="cpu", unet=unet)


def hub_cache(tmp_path, folder, repo="someone/tiny-inpaint", with_adapter=True):
    """A Hugging Face hub cache holding `folder` as `repo` at revision main."""
    root = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    ignore = None if with_adapter else shutil.ignore_patterns(BUNDLED_ADAPTER_FILE)
    shutil.copytree(folder, root / "snapshots" / commit, ignore=ignore)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_hub_id_loads_the_repo_adapter_file_from_the_cache(trained, saved, tmp_path):
    cache = hub_cache(tmp_path, saved)
    pipe = PatchAdapterPipeline.from_pretrained(
        "someone/tiny-inpaint", cache_dir=str(cache), device="cpu", local_files_only=True
    )
    assert same_state(adapter_state_dict(pipe.unet), adapter_state_dict(trained.unet))
    assert pipe.backbone_name == "someone/tiny-inpaint"


def test_hub_id_without_a_cached_adapter_file_says_so(trained, saved, tmp_path):
    cache = hub_cache(tmp_path, saved, with_adapter=False)
    with pytest.warns(UserWarning, match="initial weights"):
        pipe = PatchAdapterPipeline.from_pretrained(
            "someone/tiny-inpaint", cache_dir=str(cache), device="cpu", local_files_only=True
        )
    assert same_state(adapter_state_dict(pipe.unet), initial_state(trained))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # adapter=False: none wanted, nothing to say
        PatchAdapterPipeline.from_pretrained(
            "someone/tiny-inpaint", cache_dir=str(cache), device="cpu", adapter=False, local_files_only=True
        )


# --------------------------------------------------------------------------- from_pipe


def test_from_pipe_of_a_stock_pipeline_shares_and_installs_adapters(trained, saved):
    stock = StableDiffusionXLInpaintPipeline.from_pretrained(saved)
    components = dict(stock.components)
    pipe = PatchAdapterPipeline.from_pipe(stock)
    assert type(pipe) is PatchAdapterPipeline
    assert all(pipe.components[k] is v for k, v in components.items())
    assert same_state(adapter_state_dict(pipe.unet), initial_state(trained))  # no adapter file given
    with_file = PatchAdapterPipeline.from_pipe(
        StableDiffusionXLInpaintPipeline.from_pretrained(saved), adapter=saved / BUNDLED_ADAPTER_FILE, scheduler="ddim"
    )
    assert same_state(adapter_state_dict(with_file.unet), adapter_state_dict(trained.unet))
    assert type(with_file.scheduler) is DDIMScheduler
    with_file.set_progress_bar_config(disable=True)
    assert np.array_equal(inpaint(with_file.from_pipe(with_file, scheduler="euler")), inpaint(trained))


@pytest.mark.parametrize("maker", [StableDiffusionXLInpaintPipeline, AutoPipelineForInpainting])
def test_stock_pipeline_from_ours_shares_and_computes_stock(maker, trained, stock_output):
    stock = maker.from_pipe(trained)
    assert type(stock) is StableDiffusionXLInpaintPipeline
    assert all(stock.components[k] is v for k, v in trained.components.items() if k in stock.components)
    assert stock.dtype == trained.dtype
    # the shared UNet keeps the (trained) adapters; without their call arguments they are stock attention
    assert adapter_state_dict(stock.unet)
    assert np.array_equal(stock_inpaint(stock), stock_output)


def test_a_missing_tiny_folder_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCH_ADAPTER_TINY_WEIGHTS", str(tmp_path))  # an empty folder: no model_index.json
    with pytest.raises(BackboneLoadError, match="make train-tiny"):
        PatchAdapterPipeline.from_pretrained("tiny")


def test_align_weights_moves_memory_mapped_offsets_and_keeps_values():
    """A weight off the 64-byte alignment (as a memory-mapped file leaves small tensors) is copied, values kept."""
    from types import SimpleNamespace

    from patch_adapter.loading import WEIGHT_ALIGNMENT, align_weights

    layer = torch.nn.Linear(8, 8, bias=False)
    storage = torch.randn(80)
    layer.weight.data = storage[10:74].view(8, 8)  # 40 bytes into an aligned block
    assert layer.weight.data_ptr() % WEIGHT_ALIGNMENT
    values = layer.weight.detach().clone()
    align_weights(SimpleNamespace(components={"unet": layer, "scheduler": object()}))
    assert layer.weight.data_ptr() % WEIGHT_ALIGNMENT == 0 and torch.equal(layer.weight, values)
    assert isinstance(layer.weight, torch.nn.Parameter)
