"""The adapters are never lost in silence: slicing, IP-Adapters, processor replacement, UNet saving."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
)
from safetensors import safe_open

from patch_adapter.adapters import (
    AdapterReplacedError,
    DualContextAttnProcessor,
    ReferenceBank,
    ReferencePatchAttnProcessor,
    adapter_parameters,
    adapter_processors,
    adapter_state_dict,
    install_adapters,
    load_adapter,
    save_adapter,
)
from patch_adapter.backbone import load_backbone
from patch_adapter.pipeline import PatchAdapterPipeline
from patch_adapter.tiny_world.architecture import build_tiny_components

IMAGE_EMBED_DIM = 16


@pytest.fixture(scope="module")
def built():
    pipe = PatchAdapterPipeline.from_pretrained("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(built):
    """A private copy of the tiny pipeline with random ("trained") adapter weights."""
    pipe = copy.deepcopy(built)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pipe


def unet_inputs(unet, batch=2, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 9, size, size, generator=gen)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(batch, pooled, generator=gen),
        "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * batch),
    }
    mask = torch.zeros(1, 1, size, size)
    mask[..., 3:11, 5:14] = 1
    return sample, text, added, mask


def forward(unet, image_embeds=None, **cross_attention_kwargs):
    sample, text, added, _ = unet_inputs(unet)
    if image_embeds is not None:
        added = dict(added, image_embeds=image_embeds)
    with torch.no_grad():
        return unet(
            sample,
            500,
            encoder_hidden_states=text,
            added_cond_kwargs=added,
            cross_attention_kwargs=cross_attention_kwargs or None,
        ).sample


def adapter_kwargs(unet):
    """dca_mask and a recorded reference bank: both adapters act."""
    sample, text, added, mask = unet_inputs(unet, seed=5)
    bank = ReferenceBank()
    with torch.no_grad(), bank.record():
        unet(
            sample, 500, encoder_hidden_states=text, added_cond_kwargs=added, cross_attention_kwargs={"rpa_bank": bank}
        )
    return {"dca_mask": mask, "rpa_bank": bank}


def cloned_state(unet):
    return {k: v.clone() for k, v in adapter_state_dict(unet).items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ attention slicing


@pytest.mark.parametrize("slice_size", ["max", "auto", 2])
def test_attention_slicing_keeps_the_adapters_and_their_result(pipe, slice_size, monkeypatch):
    kwargs = adapter_kwargs(pipe.unet)
    plain = forward(pipe.unet, **kwargs)
    off = forward(pipe.unet, **kwargs | {"dca_scale": 0, "rpa_scale": 0})
    assert (plain - off).abs().max() > 1e-3  # the adapters act
    processors = dict(adapter_processors(pipe.unet))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    forward(pipe.unet, **kwargs)
    unsliced_calls = len(calls)

    pipe.enable_attention_slicing(slice_size)
    pipe.check_adapters()
    assert adapter_processors(pipe.unet) == processors  # the same processor objects, trained weights and all
    assert all(p.slice_size is not None for p in processors.values())
    calls.clear()
    sliced = forward(pipe.unet, **kwargs)
    assert len(calls) > unsliced_calls  # it really ran in slices
    torch.testing.assert_close(sliced, plain, atol=1e-5, rtol=0)

    pipe.disable_attention_slicing()
    pipe.check_adapters()
    assert all(p.slice_size is None for p in processors.values())
    torch.testing.assert_close(forward(pipe.unet, **kwargs), plain, atol=1e-6, rtol=0)


def test_a_wrong_slice_size_is_refused_and_changes_nothing(pipe):
    processors = dict(adapter_processors(pipe.unet))
    with pytest.raises(ValueError):
        pipe.enable_attention_slicing(1000)
    pipe.check_adapters()
    assert adapter_processors(pipe.unet) == processors
    assert all(p.slice_size is None for p in processors.values())


# ------------------------------------------------------------------ replacement


def replace_with_stock(unet):
    unet.set_attn_processor(AttnProcessor2_0())


def replace_with_slices(unet):
    unet.set_attention_slice(1)


def replace_by_fusing(unet):
    unet.fuse_qkv_projections()


@pytest.mark.parametrize(
    "replace, culprit",
    [
        (replace_with_stock, "AttnProcessor2_0"),
        (replace_with_slices, "SlicedAttnProcessor"),
        (replace_by_fusing, "FusedAttnProcessor2_0"),
    ],
)
def test_a_replaced_adapter_is_refused_and_restored_bit_identically(pipe, replace, culprit):
    kwargs = adapter_kwargs(pipe.unet)
    expected = forward(pipe.unet, **kwargs)
    state = cloned_state(pipe.unet)
    replace(pipe.unet)
    assert not adapter_processors(pipe.unet)  # diffusers took them out of the UNet
    with pytest.raises(AdapterReplacedError, match=rf"{culprit} in 22\b.*pipe\.restore_adapters\(\)"):
        pipe.check_adapters()
    pipe.restore_adapters()
    pipe.check_adapters()
    assert_same_state(adapter_state_dict(pipe.unet), state)
    assert torch.equal(forward(pipe.unet, **kwargs), expected)


def test_set_default_attn_processor_loses_nothing(pipe):
    state = cloned_state(pipe.unet)
    try:
        pipe.unet.set_default_attn_processor()
    except ValueError:  # diffusers 0.42 refuses processors it does not know, before changing anything
        pipe.check_adapters()
    else:
        with pytest.raises(AdapterReplacedError, match="restore_adapters"):
            pipe.check_adapters()
        pipe.restore_adapters()
    pipe.check_adapters()
    assert_same_state(adapter_state_dict(pipe.unet), state)


def test_fuse_qkv_projections_of_the_unet_is_refused_before_anything_changes(pipe):
    processors = dict(adapter_processors(pipe.unet))
    with pytest.raises(NotImplementedError, match=r"unet=False"):
        pipe.fuse_qkv_projections()
    assert adapter_processors(pipe.unet) == processors
    assert not any(getattr(m, "fused_projections", False) for m in pipe.unet.modules())
    pipe.fuse_qkv_projections(unet=False)  # the VAE alone fuses
    pipe.check_adapters()


def test_xformers_is_refused_before_anything_changes(pipe):
    processors = dict(adapter_processors(pipe.unet))
    with pytest.raises(NotImplementedError, match="enable_attention_slicing"):
        pipe.enable_xformers_memory_efficient_attention()
    pipe.disable_xformers_memory_efficient_attention()
    pipe.check_adapters()
    assert adapter_processors(pipe.unet) == processors


def test_our_own_processors_are_accepted_as_a_replacement(pipe):
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    install_adapters(pipe.unet)  # new adapters, at their initial weights
    pipe.check_adapters()
    assert pipe._patch_adapters == adapter_processors(pipe.unet)


def test_stock_attention_still_works_and_gives_the_adapters_back(pipe):
    processors = dict(adapter_processors(pipe.unet))
    with pipe.stock_attention():
        with pytest.raises(AdapterReplacedError):
            pipe.check_adapters()
    pipe.check_adapters()
    assert adapter_processors(pipe.unet) == processors


def test_install_adapters_refuses_to_drop_a_processor_with_weights():
    class Custom(torch.nn.Module, AttnProcessor2_0):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.extra = torch.nn.Linear(2, 2)

    unet = build_tiny_components()["unet"]
    unet.set_attn_processor(Custom())
    with pytest.raises(ValueError, match="Custom"):
        install_adapters(unet)


# ------------------------------------------------------------------ IP-Adapter


def make_ip_adapter(folder, unet, seed=0):
    """A random IP-Adapter in diffusers' checkpoint layout, with a tiny CLIP image encoder beside it."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    gen = torch.Generator().manual_seed(seed)
    sub = folder / "ip"
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=IMAGE_EMBED_DIM,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(sub / "image_encoder")
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(4 * cross, IMAGE_EMBED_DIM, generator=gen) * 0.3,
        "image_proj.proj.bias": torch.randn(4 * cross, generator=gen) * 0.1,
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1  # diffusers numbers the cross-attention layers 1, 3, 5, ... in attn_processors order
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            for weight in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key_id}.{weight}.weight"] = torch.randn(inner, cross, generator=gen) * 0.3
            key_id += 2
    save_file(state, str(sub / "ip-adapter.safetensors"))
    return dict(subfolder="ip", weight_name="ip-adapter.safetensors", image_encoder_folder="image_encoder")


@pytest.fixture(scope="module")
def ip_folder(tmp_path_factory, built):
    folder = tmp_path_factory.mktemp("ip_adapter")
    return folder, make_ip_adapter(folder, built.unet)


def image_embeds(seed=3, batch=2):
    return [torch.randn(batch, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))]


def stock_ip_view(unet):
    """diffusers' own processors on the same weights: AttnProcessor2_0, and the loaded IPAdapterAttnProcessor2_0."""
    view = {}
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, DualContextAttnProcessor):
            assert type(proc.ip_adapter) is IPAdapterAttnProcessor2_0
            view[name] = proc.ip_adapter
        else:
            view[name] = AttnProcessor2_0()
    unet.set_attn_processor(view)


def test_ip_adapter_loads_into_the_adapter_processors_and_matches_diffusers(pipe, ip_folder):
    folder, where = ip_folder
    processors = dict(adapter_processors(pipe.unet))
    without_ip = forward(pipe.unet)
    pipe.load_ip_adapter(str(folder), **where)
    pipe.check_adapters()
    assert adapter_processors(pipe.unet) == processors
    assert pipe.image_encoder is not None
    ours = forward(pipe.unet, image_embeds())
    assert (ours - without_ip).abs().max() > 1e-3
    stock_ip_view(pipe.unet)
    with pytest.raises(AdapterReplacedError):
        pipe.check_adapters()
    assert torch.equal(forward(pipe.unet, image_embeds()), ours)
    pipe.restore_adapters()
    pipe.check_adapters()

    pipe.unet.set_attn_processor(pipe.stock_processors())  # the public stock view keeps the IP-Adapter
    assert torch.equal(forward(pipe.unet, image_embeds()), ours)
    pipe.restore_adapters()

    # the IP scale acts, as diffusers sets it
    pipe.set_ip_adapter_scale(0.5)
    half = forward(pipe.unet, image_embeds())
    assert (half - ours).abs().max() > 1e-3
    stock_ip_view(pipe.unet)
    assert torch.equal(forward(pipe.unet, image_embeds()), half)
    pipe.restore_adapters()
    pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0]}})  # diffusers' per-block form: others off
    blocks = forward(pipe.unet, image_embeds())
    assert (blocks - half).abs().max() > 1e-3
    stock_ip_view(pipe.unet)
    assert torch.equal(forward(pipe.unet, image_embeds()), blocks)
    pipe.restore_adapters()
    pipe.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(forward(pipe.unet, image_embeds()), without_ip, atol=1e-6, rtol=0)
    pipe.set_ip_adapter_scale(1.0)

    # the DCA still acts with an IP-Adapter loaded, and so does slicing
    mask = unet_inputs(pipe.unet)[3]
    with_dca = forward(pipe.unet, image_embeds(), dca_mask=mask)
    assert (with_dca - ours).abs().max() > 1e-3
    assert torch.equal(forward(pipe.unet, image_embeds(), dca_mask=mask, dca_scale=0), ours)
    pipe.enable_attention_slicing("max")
    torch.testing.assert_close(forward(pipe.unet, image_embeds(), dca_mask=mask), with_dca, atol=1e-5, rtol=0)
    pipe.disable_attention_slicing()

    # IP weights are not adapter weights
    assert not any("ip" in key.split(".processor.")[1] for key in adapter_state_dict(pipe.unet))

    pipe.unload_ip_adapter()
    pipe.check_adapters()
    assert adapter_processors(pipe.unet) == processors
    assert all(p.ip_adapter is None for p in processors.values() if isinstance(p, DualContextAttnProcessor))
    assert pipe.unet.encoder_hid_proj is None and pipe.image_encoder is None
    assert torch.equal(forward(pipe.unet), without_ip)


def test_ip_adapter_masks_match_diffusers(pipe, ip_folder):
    folder, where = ip_folder
    pipe.load_ip_adapter(str(folder), **where)
    masks = [torch.zeros(1, 1, 16, 16)]
    masks[0][..., :, :8] = 1
    embeds = image_embeds()  # one image for the one IP-Adapter: (B, 1, D)
    ours = forward(pipe.unet, embeds, ip_adapter_masks=masks)
    assert (ours - forward(pipe.unet, embeds)).abs().max() > 1e-4
    stock_ip_view(pipe.unet)
    assert torch.equal(forward(pipe.unet, embeds, ip_adapter_masks=masks), ours)
    pipe.restore_adapters()


def test_a_unet_with_ip_adapter_processors_keeps_them_and_the_stock_call_agrees(ip_folder):
    folder, where = ip_folder
    stock = StableDiffusionXLInpaintPipeline(**load_backbone("tiny"), add_watermarker=False)
    stock.set_progress_bar_config(disable=True)
    stock.load_ip_adapter(str(folder), **where)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = PIL.Image.fromarray(((np.arange(64)[None, :] > 30) * np.ones((64, 1)) * 255).astype(np.uint8))
    call = dict(
        prompt="a red ball",
        image=image,
        mask_image=mask,
        ip_adapter_image=image,
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="latent",
    )
    expected = stock(**call, generator=torch.Generator().manual_seed(0)).images
    unet_expected = forward(stock.unet, image_embeds())

    pipe = PatchAdapterPipeline(**{name: getattr(stock, name) for name in stock.components})
    pipe.set_progress_bar_config(disable=True)
    pipe.check_adapters()
    dcas = [p for p in adapter_processors(pipe.unet).values() if isinstance(p, DualContextAttnProcessor)]
    assert dcas and all(type(p.ip_adapter) is IPAdapterAttnProcessor2_0 for p in dcas)
    assert torch.equal(forward(pipe.unet, image_embeds()), unet_expected)
    got = StableDiffusionXLInpaintPipeline.__call__(pipe, **call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_an_ip_adapter_loaded_behind_the_pipelines_back_is_refused(pipe, ip_folder):
    folder, where = ip_folder
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    with pytest.raises(TypeError):  # diffusers rebuilds every processor by calling its class
        IPAdapterMixin.load_ip_adapter(pipe, str(folder), **where)
    pipe.restore_adapters()
    pipe.unet.encoder_hid_proj = torch.nn.Identity()
    pipe.unet.config.encoder_hid_dim_type = "ip_image_proj"
    with pytest.raises(AdapterReplacedError, match="load_ip_adapter"):
        pipe.check_adapters()


# ------------------------------------------------------------------ UNet state dicts


def saved_keys(folder):
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_unet_save_pretrained_writes_no_processor_weights(pipe, tmp_path, ip_folder):
    pipe.unet.save_pretrained(tmp_path / "unet")
    keys = saved_keys(tmp_path / "unet")
    assert keys and not [k for k in keys if "processor" in k]
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    state = pipe.unet.state_dict()
    assert set(loaded.state_dict()) == set(state) == set(keys)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in keys)
    pipe.unet.load_state_dict(loaded.state_dict(), strict=True)  # no processor keys: still strict
    pipe.check_adapters()

    # processor weights still load through the UNet (the tiny recipe merges adapter files this way)
    trained = cloned_state(pipe.unet)
    with torch.no_grad():
        for p in adapter_parameters(pipe.unet):
            p.zero_()
    _, unexpected = pipe.unet.load_state_dict(trained, strict=False)
    assert not unexpected
    assert_same_state(adapter_state_dict(pipe.unet), trained)

    folder, where = ip_folder  # nor IP-Adapter weights, which the processors hold
    pipe.load_ip_adapter(str(folder), **where)
    pipe.unet.save_pretrained(tmp_path / "unet_ip")
    assert not [k for k in saved_keys(tmp_path / "unet_ip") if "processor" in k]


def test_adapter_file_round_trip_is_unchanged_with_an_ip_adapter_loaded(pipe, tmp_path, ip_folder):
    folder, where = ip_folder
    pipe.load_ip_adapter(str(folder), **where)
    state = cloned_state(pipe.unet)
    assert len(state) == 77 and all(".processor." in k for k in state)
    path = save_adapter(tmp_path / "a.safetensors", pipe.unet, backbone_name="tiny")
    with torch.no_grad():
        for p in adapter_parameters(pipe.unet):
            p.zero_()
    load_adapter(path, pipe.unet)
    assert_same_state(adapter_state_dict(pipe.unet), state)
    assert {type(p) for p in adapter_processors(pipe.unet).values()} == {
        DualContextAttnProcessor,
        ReferencePatchAttnProcessor,
    }
