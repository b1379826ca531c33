"""Dual Context Adapter (stage 1): global coherence between masked and unmasked regions.

docs/method.md, stage 1. In every cross-attention layer (`attn2`), with image tokens z,
text tokens c and the mask m on the layer's grid:

    Z   = Attn(z W_q, c W_k, c W_v)                       frozen cross-attention
    Z'  = Attn((z * (1 - m)) W'_q, c W_k, c W_v)          text as seen from the unmasked context
    Z'' = Attn(z W_q, Z' W'_k, Z' W'_v)                   dual-attention fusion (N x N)
    out = W_out(Z + scale * Z'')

W'_q starts as a copy of W_q, W'_k as the identity and W'_v at zero, so an untrained
adapter leaves the backbone exactly as it was (our choice, docs/method.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionCall, multihead_attention, repeat_to_batch


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
        mask = F.max_pool2d(mask, kernel_size=factor, stride=factor, ceil_mode=True)
    return mask.flatten(2).transpose(1, 2)


class DualContextAttnProcessor(nn.Module):
    """Cross-attention processor with the Dual Context Adapter beside the frozen layer.

    Per-call inputs come through `cross_attention_kwargs`: `dca_mask` (B or 1, 1, H, W)
    at the UNet input's latent size, 1 = fill; `dca_scale`. Without a mask, or at
    scale 0, it is the stock processor.
    """

    kind = "dca"

    def __init__(self, query_dim: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.to_q_ctx = nn.Linear(query_dim, inner_dim, bias=bias)  # W'_q
        self.to_k_ctx = nn.Linear(inner_dim, inner_dim, bias=False)  # W'_k
        self.to_v_ctx = nn.Linear(inner_dim, inner_dim, bias=False)  # W'_v

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
        **kwargs,
    ):
        call = AttentionCall(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query, key, value, z = call.frozen_attention()  # z: (B, N, inner)
        if dca_mask is not None and dca_scale != 0:
            tokens = call.hidden_states  # (B, N, C)
            m = repeat_to_batch(token_mask(dca_mask.to(tokens.dtype), tokens.shape[1]), tokens.shape[0])  # (B, N, 1)
            z_ctx = multihead_attention(self.to_q_ctx(tokens * (1 - m)), key, value, attn.heads, call.attention_mask)
            z_dual = multihead_attention(query, self.to_k_ctx(z_ctx), self.to_v_ctx(z_ctx), attn.heads)
            z = z + dca_scale * z_dual
        return call.end(z)
