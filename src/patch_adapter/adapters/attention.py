"""Pieces shared by the adapter processors: diffusers' stock attention, split open.

The adapters need the attention output *before* the frozen output projection
(`W_out`), which diffusers' `AttnProcessor2_0` does not expose. These functions do
exactly what it does, in the same order, so that an adapter at zero strength gives
bit-identical results to the stock processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def repeat_to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """x with batch b (1 or a divisor of `batch`) as `batch` items: x, x, ... in order.

    Classifier-free guidance runs a batch of patches as [uncond p1..pk, cond p1..pk],
    so per-patch inputs (masks, reference tokens) repeat whole, not item by item.
    """
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    if batch % x.shape[0]:
        raise ValueError(f"a batch of {x.shape[0]} cannot be repeated to {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))


def sdpa(q, k, v, attn_mask=None, scale=None, slice_size=None):
    """F.scaled_dot_product_attention on (B, h, N, d), optionally in slices of batch*heads rows.

    slice_size (None: one call) is diffusers' attention slicing: `slice_size` of the
    B * h attention rows at a time, as `SlicedAttnProcessor` does, which bounds the
    memory of one attention call; rows are independent, so the result is the same.
    """
    batch, heads = q.shape[:2]
    if slice_size is None or slice_size >= batch * heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale)
    rows = batch * heads
    q, k, v = (x.expand(batch, heads, *x.shape[2:]).reshape(rows, *x.shape[2:]) for x in (q, k, v))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, heads, *attn_mask.shape[-2:]).reshape(rows, *attn_mask.shape[-2:])
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[i : i + slice_size],
                k[i : i + slice_size],
                v[i : i + slice_size],
                attn_mask=None if attn_mask is None else attn_mask[i : i + slice_size],
                dropout_p=0.0,
                is_causal=False,
                scale=scale,
            )
            for i in range(0, rows, slice_size)
        ]
    )
    return out.view(batch, heads, *out.shape[1:])


def multihead_attention(query, key, value, heads: int, attention_mask=None, slice_size=None):
    """Scaled dot-product attention over `heads` heads.

    query (B, N, D), key/value (b, M, D) -> (B, N, D), with b = B, 1, or a divisor of B
    (see `repeat_to_batch`): a reference or a context shared by both halves of
    classifier-free guidance. slice_size: see `sdpa`.
    """
    batch = query.shape[0]
    key = repeat_to_batch(key, batch)
    value = repeat_to_batch(value, batch)
    head_dim = key.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, N, d)
    k = key.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, M, d)
    v = value.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    out = sdpa(q, k, v, attention_mask, slice_size=slice_size)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


class AttentionCall:
    """One call of a diffusers `Attention` layer, up to and after the attention itself.

    `begin` normalises the inputs the way `AttnProcessor2_0` does and gives the frozen
    projections; `end` applies the frozen output projection and the layer's residual
    and rescale settings.
    """

    def __init__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        self.attn = attn
        self.residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        self.input_shape = None
        if hidden_states.ndim == 4:
            self.input_shape = hidden_states.shape
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        self.attention_mask = attention_mask
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        self.hidden_states = hidden_states  # (B, N, C): the layer's image tokens
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        self.context = encoder_hidden_states
        if attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("Patch-Adapter processors do not support q/k-normalised attention layers.")

    def frozen_attention(self, slice_size=None):
        """(Q, K, V, Z) of the frozen layer; Z is (B, N, inner) before W_out."""
        attn = self.attn
        query = attn.to_q(self.hidden_states)
        key = attn.to_k(self.context)
        value = attn.to_v(self.context)
        z = multihead_attention(query, key, value, attn.heads, self.attention_mask, slice_size)
        return query, key, value, z

    def end(self, z):
        attn = self.attn
        out = attn.to_out[1](attn.to_out[0](z))  # frozen W_out, then dropout
        if self.input_shape is not None:
            b, c, h, w = self.input_shape
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + self.residual
        return out / attn.rescale_output_factor
