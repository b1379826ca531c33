"""The adapters as METHOD.md specifies them, checked against hand-written formulas."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from patch_adapter.adapters import (
    AdapterLoadError,
    DualContextAttnProcessor,
    ReferenceBank,
    ReferencePatchAttnProcessor,
    adapter_processors,
    adapter_state_dict,
    install_adapters,
    load_adapter,
    read_manifest,
    save_adapter,
    token_mask,
)
from patch_adapter.backbone import build_tiny_components


def attention(q, k, v, heads):
    """Plain softmax attention, written out: (B, N, D) x (B, M, D) -> (B, N, D)."""
    b, n, d = q.shape
    hd = d // heads
    q = q.view(b, n, heads, hd).transpose(1, 2)
    k = k.reshape(k.shape[0], -1, heads, hd).transpose(1, 2).expand(b, -1, -1, -1)
    v = v.reshape(v.shape[0], -1, heads, hd).transpose(1, 2).expand(b, -1, -1, -1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, d)


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def unet_inputs(unet, seed=0, size=16, batch=2):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 9, size, size, generator=gen)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled_dim, generator=gen),
             "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * batch)}
    mask = torch.zeros(1, 1, size, size)
    mask[..., 3:11, 5:14] = 1
    return sample, text, added, mask


@pytest.fixture
def unets():
    """Two copies of the same tiny UNet: stock processors, and with both adapters installed."""
    stock = build_tiny_components()["unet"]
    stock.set_attn_processor(AttnProcessor2_0())
    adapted = build_tiny_components()["unet"]
    install_adapters(adapted)
    return stock, adapted


# ------------------------------------------------------------------ Dual Context Adapter


def test_untrained_dca_leaves_unet_output_unchanged(unets):
    stock, adapted = unets
    sample, text, added, mask = unet_inputs(stock)
    with torch.no_grad():
        ref = stock(sample, 500, text, added_cond_kwargs=added).sample
        out = adapted(sample, 500, text, added_cond_kwargs=added,
                      cross_attention_kwargs={"dca_mask": mask, "dca_scale": 1.0}).sample
    assert (out - ref).abs().max() < 1e-5


def test_trained_dca_changes_unet_output_and_scale_zero_restores_it(unets):
    stock, adapted = unets
    for proc in adapter_processors(adapted, ["dca"]).values():
        randomize(proc, 1)
    sample, text, added, mask = unet_inputs(stock)
    with torch.no_grad():
        ref = stock(sample, 500, text, added_cond_kwargs=added).sample
        on = adapted(sample, 500, text, added_cond_kwargs=added,
                     cross_attention_kwargs={"dca_mask": mask, "dca_scale": 1.0}).sample
        off = adapted(sample, 500, text, added_cond_kwargs=added,
                      cross_attention_kwargs={"dca_mask": mask, "dca_scale": 0.0}).sample
    assert (on - ref).abs().max() > 1e-3
    assert (off - ref).abs().max() < 1e-5


def test_dca_processor_matches_method_equations():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    proc = DualContextAttnProcessor.for_layer(attn)
    randomize(proc, 2)
    attn.set_processor(proc)
    z = torch.randn(2, 6 * 5, 32)  # tokens of a 6 x 5 grid
    c = torch.randn(2, 7, 24)
    mask = torch.zeros(1, 1, 6, 5)
    mask[..., 1:4, 2:5] = 1
    out = attn(z, encoder_hidden_states=c, dca_mask=mask, dca_scale=0.7)

    m = mask.flatten(2).transpose(1, 2)  # (1, N, 1)
    q, k, v = attn.to_q(z), attn.to_k(c), attn.to_v(c)
    z_text = attention(q, k, v, 4)                                    # Z
    z_ctx = attention(proc.to_q_ctx(z * (1 - m)), k, v, 4)            # Z'
    z_dual = attention(q, proc.to_k_ctx(z_ctx), proc.to_v_ctx(z_ctx), 4)  # Z''
    expected = attn.to_out[0](z_text + 0.7 * z_dual)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_token_mask_follows_unet_downsampling_and_keeps_every_masked_latent():
    mask = torch.zeros(1, 1, 17, 11)
    mask[0, 0, 16, 10] = 1  # the last latent: a ceil-sized grid must still see it
    for factor, tokens in ((1, 17 * 11), (2, 9 * 6), (4, 5 * 3)):
        grid = token_mask(mask, tokens)
        assert grid.shape == (1, tokens, 1)
        assert grid.sum() == 1 and grid[0, -1, 0] == 1, factor
    with pytest.raises(ValueError, match="does not fit"):
        token_mask(mask, 50)


# ------------------------------------------------------------------ Reference Patch Adapter


def make_rpa_layer(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    proc = ReferencePatchAttnProcessor.for_layer(attn, "layer")
    attn.set_processor(proc)
    return attn, proc


def test_untrained_rpa_is_reference_only_attention():
    """Initial W^r = W and gate = 1: attending to a reference equal to the input doubles Z."""
    attn, _ = make_rpa_layer()
    z = torch.randn(2, 20, 32)
    bank = ReferenceBank()
    bank.features["layer"] = z
    out = attn(z, rpa_bank=bank, rpa_scale=1.0)
    self_attn = attention(attn.to_q(z), attn.to_k(z), attn.to_v(z), 4)
    torch.testing.assert_close(out, attn.to_out[0](2 * self_attn), atol=1e-5, rtol=1e-4)


def test_rpa_processor_matches_design_with_trained_gate():
    attn, proc = make_rpa_layer(1)
    randomize(proc, 3)
    z, r = torch.randn(2, 20, 32), torch.randn(1, 12, 32)
    bank = ReferenceBank()
    bank.features["layer"] = r
    out = attn(z, rpa_bank=bank, rpa_scale=0.5)
    q = attn.to_q(z)
    z_self = attention(q, attn.to_k(z), attn.to_v(z), 4)
    z_ref = attention(q, proc.to_k_ref(r), proc.to_v_ref(r), 4)
    gate = 2 * torch.sigmoid(proc.gate(torch.cat([z, z_ref], dim=-1)))
    torch.testing.assert_close(out, attn.to_out[0](z_self + 0.5 * gate * z_ref), atol=1e-5, rtol=1e-4)


def test_rpa_scale_zero_equals_no_rpa_and_reference_matters(unets):
    stock, adapted = unets
    sample, text, added, _ = unet_inputs(stock)
    banks = []
    for seed in (1, 2):
        bank = ReferenceBank()
        reference, *_ = unet_inputs(stock, seed=seed, batch=1)
        with torch.no_grad(), bank.record():
            adapted(reference, 1, text[:1], added_cond_kwargs={k: v[:1] for k, v in added.items()},
                    cross_attention_kwargs={"rpa_bank": bank})
        banks.append(bank)
    assert len(banks[0].features) == len(adapter_processors(adapted, ["rpa"]))
    with torch.no_grad():
        ref = stock(sample, 500, text, added_cond_kwargs=added).sample
        run = lambda bank, scale: adapted(sample, 500, text, added_cond_kwargs=added,
                                          cross_attention_kwargs={"rpa_bank": bank, "rpa_scale": scale}).sample
        off, on_1, on_2 = run(banks[0], 0.0), run(banks[0], 1.0), run(banks[1], 1.0)
    assert (off - ref).abs().max() < 1e-5
    assert (on_1 - ref).abs().max() > 1e-3
    assert (on_1 - on_2).abs().max() > 1e-3


# ------------------------------------------------------------------ weights


def test_save_load_round_trip(tmp_path):
    source = build_tiny_components()["unet"]
    install_adapters(source)
    for i, proc in enumerate(adapter_processors(source).values()):
        randomize(proc, 10 + i)
    path = save_adapter(tmp_path / "adapter.safetensors", source, backbone_name="tiny")
    manifest = read_manifest(path)
    assert manifest["adapters"] == ["dca", "rpa"] and manifest["format_version"] == 1
    assert all(".processor." in key for key in manifest["shapes"])

    target = build_tiny_components()["unet"]
    install_adapters(target)
    load_adapter(path, target)
    saved, loaded = adapter_state_dict(source), adapter_state_dict(target)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_weights_for_another_backbone_are_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from patch_adapter.backbone import tiny_configs

    source = build_tiny_components()["unet"]
    install_adapters(source)
    path = save_adapter(tmp_path / "adapter.safetensors", source)
    other_config = dict(tiny_configs()["unet"], block_out_channels=(32, 64, 128))
    other = UNet2DConditionModel(**other_config)
    install_adapters(other)
    before = {k: v.clone() for k, v in adapter_state_dict(other).items()}
    with pytest.raises(AdapterLoadError, match="another backbone.*block_out_channels"):
        load_adapter(path, other)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(other).items())


def test_not_an_adapter_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    unet = build_tiny_components()["unet"]
    install_adapters(unet)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(AdapterLoadError, match="not a Patch-Adapter weights file"):
        load_adapter(plain, unet)
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors", unet)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterLoadError, match="not a safetensors file"):
        load_adapter(tmp_path / "junk.safetensors", unet)
