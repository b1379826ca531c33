"""The adapters as docs/method.md specifies them, checked against hand-written formulas."""

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
from patch_adapter.tiny_world.architecture import build_tiny_components


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
    added = {
        "text_embeds": torch.randn(batch, pooled_dim, generator=gen),
        "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * batch),
    }
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
        out = adapted(
            sample, 500, text, added_cond_kwargs=added, cross_attention_kwargs={"dca_mask": mask, "dca_scale": 1.0}
        ).sample
    assert (out - ref).abs().max() < 1e-5


def test_trained_dca_changes_unet_output_and_scale_zero_restores_it(unets):
    stock, adapted = unets
    for proc in adapter_processors(adapted, ["dca"]).values():
        randomize(proc, 1)
    sample, text, added, mask = unet_inputs(stock)
    with torch.no_grad():
        ref = stock(sample, 500, text, added_cond_kwargs=added).sample
        on = adapted(
            sample, 500, text, added_cond_kwargs=added, cross_attention_kwargs={"dca_mask": mask, "dca_scale": 1.0}
        ).sample
        off = adapted(
            sample, 500, text, added_cond_kwargs=added, cross_attention_kwargs={"dca_mask": mask, "dca_scale": 0.0}
        ).sample
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
    z_text = attention(q, k, v, 4)  # Z
    z_ctx = attention(proc.to_q_ctx(z * (1 - m)), k, v, 4)  # Z'
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


def joint_sdpa(q, k, v, heads):
    """Plain SDPA of (B, N, D) tensors over `heads` heads: the reference implementation."""

    def split(x):
        return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape)


def test_untrained_rpa_is_joint_reference_only_attention():
    """Initial weights: one softmax over [own; reference] keys, exactly (concatenated-keys SDPA)."""
    attn, _ = make_rpa_layer()
    z, r = torch.randn(2, 20, 32), torch.randn(1, 12, 32)
    bank = ReferenceBank()
    bank.features["layer"] = r
    out = attn(z, rpa_bank=bank, rpa_scale=1.0)
    both = torch.cat([z, r.expand(2, -1, -1)], dim=1)
    expected = joint_sdpa(attn.to_q(z), attn.to_k(both), attn.to_v(both), 4)
    torch.testing.assert_close(out, attn.to_out[0](expected), atol=1e-5, rtol=0)


def test_untrained_rpa_with_the_patch_as_reference_keeps_the_layer_output():
    """A reference equal to the patch gives the layer's own output, not twice it."""
    attn, _ = make_rpa_layer()
    z = torch.randn(2, 20, 32)
    bank = ReferenceBank()
    bank.features["layer"] = z
    own = attn.to_out[0](joint_sdpa(attn.to_q(z), attn.to_k(z), attn.to_v(z), 4))
    torch.testing.assert_close(attn(z, rpa_bank=bank), own, atol=1e-5, rtol=0)


def test_rpa_with_trained_weights_matches_the_gated_mix():
    """(1 - a') Z + a' Z_r with a' = sigmoid(lse_r - lse + d + log s), written out with explicit logits."""
    attn, proc = make_rpa_layer(1)
    randomize(proc, 3)
    z, r = torch.randn(2, 20, 32), torch.randn(1, 12, 32)
    bank = ReferenceBank()
    bank.features["layer"] = r
    out = attn(z, rpa_bank=bank, rpa_scale=0.5)

    def split(x):
        return x.view(x.shape[0], -1, 4, 8).transpose(1, 2)  # (B, h, N, 8)

    q, k, v = split(attn.to_q(z)), split(attn.to_k(z)), split(attn.to_v(z))
    k_r, v_r = split(proc.to_k_ref(r)).expand(2, -1, -1, -1), split(proc.to_v_ref(r)).expand(2, -1, -1, -1)
    logits, logits_r = q @ k.transpose(-1, -2) / 8**0.5, q @ k_r.transpose(-1, -2) / 8**0.5
    z_own, z_ref = logits.softmax(-1) @ v, logits_r.softmax(-1) @ v_r
    d = proc.gate(z).transpose(1, 2).unsqueeze(-1)  # (B, h, N, 1)
    share = torch.sigmoid(
        logits_r.logsumexp(-1, keepdim=True) - logits.logsumexp(-1, keepdim=True) + d + torch.log(torch.tensor(0.5))
    )
    mixed = ((1 - share) * z_own + share * z_ref).transpose(1, 2).reshape(2, 20, 32)
    torch.testing.assert_close(out, attn.to_out[0](mixed), atol=1e-5, rtol=1e-4)


def test_rpa_scale_must_be_finite_and_not_negative():
    attn, _ = make_rpa_layer()
    z = torch.randn(1, 20, 32)
    bank = ReferenceBank()
    bank.features["layer"] = z
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="rpa_scale"):
            attn(z, rpa_bank=bank, rpa_scale=bad)


def test_rpa_scale_zero_equals_no_rpa_and_reference_matters(unets):
    stock, adapted = unets
    sample, text, added, _ = unet_inputs(stock)
    banks = []
    for seed in (1, 2):
        bank = ReferenceBank()
        reference, *_ = unet_inputs(stock, seed=seed, batch=1)
        with torch.no_grad(), bank.record():
            adapted(
                reference,
                1,
                text[:1],
                added_cond_kwargs={k: v[:1] for k, v in added.items()},
                cross_attention_kwargs={"rpa_bank": bank},
            )
        banks.append(bank)
    assert len(banks[0].features) == len(adapter_processors(adapted, ["rpa"]))
    with torch.no_grad():
        ref = stock(sample, 500, text, added_cond_kwargs=added).sample

        def run(bank, scale):
            return adapted(
                sample,
                500,
                text,
                added_cond_kwargs=added,
                cross_attention_kwargs={"rpa_bank": bank, "rpa_scale": scale},
            ).sample

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
    assert manifest["adapters"] == ["dca", "rpa"] and manifest["format_version"] == 2
    assert all(".processor." in key for key in manifest["shapes"])

    target = build_tiny_components()["unet"]
    install_adapters(target)
    load_adapter(path, target)
    saved, loaded = adapter_state_dict(source), adapter_state_dict(target)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_weights_for_another_backbone_are_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from patch_adapter.tiny_world.architecture import tiny_configs

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


def test_rpa_of_the_first_format_is_refused(tmp_path):
    """Format 1 held a gated-sum RPA: its weights mean something else now, so they are refused, not misread."""
    import json

    from safetensors.torch import load_file, save_file

    unet = build_tiny_components()["unet"]
    install_adapters(unet)
    path = save_adapter(tmp_path / "adapter.safetensors", unet)
    meta = {**read_manifest(path), "format_version": 1}
    save_file(
        load_file(str(path)), str(tmp_path / "v1.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()}
    )
    with pytest.raises(AdapterLoadError, match="retrain stage 2"):
        load_adapter(tmp_path / "v1.safetensors", unet)
