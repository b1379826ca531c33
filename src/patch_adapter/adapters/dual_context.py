"""Dual Context Adapter (stage 1): global coherence between masked and unmasked regions.

docs/method.md, stage 1. In every cross-attention layer (`attn2`), with image tokens z,
text tokens c and the mask m on the layer's grid:

    Z   = Attn(z W_q, c W_k, c W_v)                       frozen cross-attention
    Z'  = Attn((z * (1 - m)) W'_q, c W_k, c W_v)          text as seen from the unmasked context
    Z'' = Attn(z W_q, Z' W'_k, Z' W'_v)                   dual-attention fusion (N x N)
    out = W_out(Z + scale * Z'')

W'_q starts as a copy of W_q, W'_k as the identity and W'_v at zero, so an untrained
adapter leaves the backbone exactly as it was (our choice, docs/method.md).

With IP-Adapters loaded (`pipe.load_ip_adapter`), the processor holds diffusers'
`IPAdapterAttnProcessor2_0` of its layer as `ip_adapter` (its weights, scales and token
counts) and adds the image-prompt attention to Z exactly as that processor does, so
both adapters compose instead of one replacing the other.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..masks import latent_mask_tensor
from .attention import AttentionCall, multihead_attention, repeat_to_batch

IP_ADAPTER_CLASSES = ("IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0", "IPAdapterXFormersAttnProcessor")
"""diffusers' IP-Adapter cross-attention processors (by name: all hold to_k_ip, to_v_ip, scale, num_tokens)."""


def is_ip_adapter_processor(proc) -> bool:
    return type(proc).__name__ in IP_ADAPTER_CLASSES and hasattr(proc, "to_k_ip")


def split_ip_states(ip, encoder_hidden_states):
    """(text, [image tokens per IP-Adapter]) from what the UNet passes, as diffusers' IP processors do.

    With an image projection the UNet passes a tuple; a plain tensor is diffusers' old
    layout with the image tokens of the first IP-Adapter appended to the text.
    """
    if isinstance(encoder_hidden_states, tuple):
        return encoder_hidden_states
    end = encoder_hidden_states.shape[1] - ip.num_tokens[0]
    return encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]


def add_ip_adapter(ip, attn, z, query, ip_states, masks=None, slice_size=None):
    """z + the IP-Adapter terms, in diffusers' `IPAdapterAttnProcessor2_0` order and arithmetic.

    z, query (B, N, inner); ip_states: one (B, n_images, T, C) or (B, T, C) tensor per
    IP-Adapter, as the UNet's image projection gives them; masks: `ip_adapter_masks`
    from cross_attention_kwargs (one (1, n_images, H, W) tensor or None per IP-Adapter).
    """
    from diffusers.image_processor import IPAdapterMaskProcessor

    batch = z.shape[0]
    if len(ip_states) != len(ip.scale):
        raise ValueError(
            f"the UNet passed image tokens of {len(ip_states)} IP-Adapters to a layer that holds "
            f"{len(ip.scale)}; give one image embedding per loaded IP-Adapter"
        )
    if masks is not None:
        if not isinstance(masks, list):
            masks = list(masks.unsqueeze(1))  # diffusers' older layout: (num_ip_adapters, 1, H, W)
        if len(masks) != len(ip.scale):
            raise ValueError(f"ip_adapter_masks has {len(masks)} masks for {len(ip.scale)} IP-Adapters")
        for index, (mask, state) in enumerate(zip(masks, ip_states, strict=True)):
            if mask is not None and (
                not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != state.shape[1]
            ):
                raise ValueError(
                    f"ip_adapter_masks[{index}] must be a (1, num_images, H, W) tensor with one mask "
                    "per image of that IP-Adapter; use diffusers' IPAdapterMaskProcessor"
                )
    else:
        masks = [None] * len(ip.scale)
    for state, scale, to_k_ip, to_v_ip, mask in zip(ip_states, ip.scale, ip.to_k_ip, ip.to_v_ip, masks, strict=True):
        if all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0:
            continue
        if mask is None:
            if state.shape[0] != batch:
                raise ValueError(f"IP-Adapter image tokens have batch {state.shape[0]}, the UNet batch is {batch}")
            term = multihead_attention(query, to_k_ip(state), to_v_ip(state), attn.heads, slice_size=slice_size)
            z = z + scale * term
            continue
        scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
        for i in range(mask.shape[1]):
            image = state[:, i]
            term = multihead_attention(query, to_k_ip(image), to_v_ip(image), attn.heads, slice_size=slice_size)
            down = IPAdapterMaskProcessor.downsample(mask[:, i], batch, term.shape[1], term.shape[2])
            z = z + scales[i] * (term * down.to(dtype=query.dtype, device=query.device))
    return z


def token_mask(mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The mask on a UNet level's token grid: (B, 1, H, W) -> (B, num_tokens, 1).

    The UNet halves its grid with stride-2 convolutions (size ceil(H / 2)), so the
    level is found as the power of two f with ceil(H / f) * ceil(W / f) = num_tokens.
    A token counts as masked if any latent pixel under it is (max pooling), so the
    unmasked context never sees fill pixels.
    """
    height, width = mask.shape[-2:]
    factor = 1
    while -(-height // factor) * -(-width // factor) > num_tokens:
        factor *= 2
    if -(-height // factor) * -(-width // factor) != num_tokens:
        raise ValueError(f"a mask of {height}x{width} latents does not fit a layer with {num_tokens} tokens")
    if factor > 1:
        mask = latent_mask_tensor(mask, factor)
    return mask.flatten(2).transpose(1, 2)


class DualContextAttnProcessor(nn.Module):
    """Cross-attention processor with the Dual Context Adapter beside the frozen layer.

    Per-call inputs come through `cross_attention_kwargs`: `dca_mask` (B or 1, 1, H, W)
    at the UNet input's latent size, 1 = fill; `dca_scale`; `ip_adapter_masks` as in
    diffusers. Without a mask, or at scale 0, it is the stock processor (the stock
    IP-Adapter processor when one is loaded).
    """

    kind = "dca"

    def __init__(self, query_dim: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.to_q_ctx = nn.Linear(query_dim, inner_dim, bias=bias)  # W'_q
        self.to_k_ctx = nn.Linear(inner_dim, inner_dim, bias=False)  # W'_k
        self.to_v_ctx = nn.Linear(inner_dim, inner_dim, bias=False)  # W'_v
        self.register_module("ip_adapter", None)  # diffusers' IP-Adapter processor of this layer, if loaded
        self.slice_size = None  # attention slicing (pipe.enable_attention_slicing): rows per SDPA call

    @classmethod
    def for_layer(cls, attn) -> "DualContextAttnProcessor":
        with torch.device(attn.to_q.weight.device):  # built where the layer is (also "meta", for FLOP counts)
            proc = cls(attn.to_q.in_features, attn.to_q.out_features, bias=attn.to_q.bias is not None)
        proc.reset_parameters(attn)
        return proc.to(dtype=attn.to_q.weight.dtype)

    @torch.no_grad()
    def reset_parameters(self, attn) -> None:
        """The initial state: W'_q = W_q, W'_k = I, W'_v = 0 (no effect on the output)."""
        self.to_q_ctx.weight.copy_(attn.to_q.weight)
        if self.to_q_ctx.bias is not None:
            self.to_q_ctx.bias.copy_(attn.to_q.bias)
        nn.init.eye_(self.to_k_ctx.weight)
        nn.init.zeros_(self.to_v_ctx.weight)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        dca_mask=None,
        dca_scale: float = 1.0,
        rpa_bank=None,
        rpa_scale: float = 1.0,
        ip_adapter_masks=None,
        **kwargs,
    ):
        ip_states = None
        if self.ip_adapter is not None and encoder_hidden_states is not None:
            encoder_hidden_states, ip_states = split_ip_states(self.ip_adapter, encoder_hidden_states)
        elif isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                "the UNet passes IP-Adapter image tokens, but this Patch-Adapter layer holds no IP-Adapter weights: "
                "load IP-Adapters with pipe.load_ip_adapter(...), which keeps the Patch-Adapter processors"
            )
        elif ip_adapter_masks is not None:
            raise ValueError("ip_adapter_masks was given, but no IP-Adapter is loaded")
        call = AttentionCall(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query, key, value, z = call.frozen_attention(self.slice_size)  # z: (B, N, inner)
        if dca_mask is not None and dca_scale != 0:
            tokens = call.hidden_states  # (B, N, C)
            m = repeat_to_batch(token_mask(dca_mask.to(tokens.dtype), tokens.shape[1]), tokens.shape[0])  # (B, N, 1)
            z_ctx = multihead_attention(
                self.to_q_ctx(tokens * (1 - m)), key, value, attn.heads, call.attention_mask, self.slice_size
            )
            z_dual = multihead_attention(
                query, self.to_k_ctx(z_ctx), self.to_v_ctx(z_ctx), attn.heads, slice_size=self.slice_size
            )
            z = z + dca_scale * z_dual
        if ip_states is not None:
            z = add_ip_adapter(self.ip_adapter, attn, z, query, ip_states, ip_adapter_masks, self.slice_size)
        return call.end(z)
