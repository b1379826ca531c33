"""Reference Patch Adapter (stage 2): full-resolution patches attend to their reference.

The reference patch (the upsampled stage-1 result at the same place) is passed once
through the frozen UNet; every self-attention layer (`attn1`) records its input tokens
r into a `ReferenceBank`. While denoising, each `attn1` attends to its own tokens and
to the reference's in one softmax, with an adaptive share for the reference:

    Z     = Attn(q, k, v)                        frozen self-attention, q = z W_q
    Z_r   = Attn(q, r W^r_k, r W^r_v)            reference attention
    a'    = sigmoid(lse_r - lse + d + log s)     the reference's share, per token and head
    out   = W_out((1 - a') Z + a' Z_r)

lse and lse_r are the log-sum-exp of the attention logits over the own and the
reference keys, d = z W_d + b_d the learned token-wise correction (one per head) and
s = `rpa_scale`. At the initial weights (W^r = W, d = 0, s = 1) this is exactly the
training-free "reference-only" attention, one softmax over `[k; k_r]`: the output stays
a convex mix of values, and a reference equal to the patch gives the layer's own output.

How it is computed: with an additive offset d on the reference logits, one SDPA over
the concatenated keys gives (1 - a') Z + a' Z_r directly, so the adapter costs one
attention over N + M keys instead of N (about one extra attention per `attn1`) and
runs on the fused SDPA kernels. The offset rides in one extra query/key dimension
(q gets d, reference keys get 1/scale, own keys 0), padded to 8 for the kernels.
The correction d is computed from z alone: computing it from Z_r as well would need Z_r
before the joint softmax, a second attention over the reference (twice the extra cost),
and the fused kernels that return log-sum-exps do not differentiate through them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionCall, repeat_to_batch, sdpa

OFFSET_DIMS = 8
"""Extra query/key dimensions that carry the reference offset (8 keeps head sizes kernel-friendly)."""


class ReferenceBank:
    """Input tokens of every `attn1` layer for a batch of reference patches, by layer name.

    Only the tokens are kept, not their projections: projecting again costs about 3%
    of a UNet forward at SDXL's size, while keeping keys and values would double the
    bank's memory. `to()` moves a bank between the host and the device (stage 2 keeps
    banks on the host when the device cannot hold them all).
    """

    def __init__(self):
        self.features: dict[str, torch.Tensor] = {}
        self.recording = False

    @contextmanager
    def record(self):
        """Within this block, UNet forwards write the bank instead of reading it."""
        self.features.clear()
        self.recording = True
        try:
            yield self
        finally:
            self.recording = False

    def to(self, device, non_blocking: bool = False, pin_memory: bool = False) -> "ReferenceBank":
        """A bank with the same tokens on `device` (self if they are there already)."""
        device = torch.device(device)
        if all(v.device == device for v in self.features.values()) and not pin_memory:
            return self
        bank = ReferenceBank()
        for name, value in self.features.items():
            moved = value.to(device, non_blocking=non_blocking)
            bank.features[name] = moved.pin_memory() if pin_memory else moved
        return bank

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.features.values())

    @classmethod
    @torch.no_grad()
    def recorded(
        cls, unet, reference_latents, timestep: int, encoder_hidden_states, added_cond_kwargs, **unet_kwargs
    ) -> "ReferenceBank":
        """The bank of clean reference latents (k, 4, h, w): one pass of the frozen UNet at `timestep`.

        The reference is shown as fully known (no mask, its own latents as the masked-image
        input). Conditioning has one row per reference. The pipeline's stage 2 and the
        adapter trainer both record through here.
        """
        bank = cls()
        no_mask = torch.zeros_like(reference_latents[:, :1])
        t = torch.full((reference_latents.shape[0],), timestep, device=reference_latents.device, dtype=torch.long)
        kwargs = dict(unet_kwargs.pop("cross_attention_kwargs", None) or {})
        with bank.record():
            unet(
                torch.cat([reference_latents, no_mask, reference_latents], dim=1),
                t,
                encoder_hidden_states=encoder_hidden_states,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs={**kwargs, "rpa_bank": bank},
                return_dict=False,
                **unet_kwargs,
            )
        return bank


def joint_attention(
    query, key, value, ref_key, ref_value, heads: int, offset=None, attention_mask=None, slice_size=None
):
    """One softmax over own and reference keys: Attn(q, [k; k_r], [v; v_r]).

    query/key/value (B, N, D); ref_key/ref_value (b, M, D) with b dividing B; offset
    (B, N, heads) or None: added to every reference logit of that query and head;
    attention_mask: the layer's own additive mask over its N keys, or None;
    slice_size: attention slicing (see `attention.sdpa`). Returns (B, N, D).
    """
    batch, tokens, inner = query.shape
    head_dim = inner // heads
    key = torch.cat([key, repeat_to_batch(ref_key, batch)], dim=1)
    value = torch.cat([value, repeat_to_batch(ref_value, batch)], dim=1)
    own = tokens if attention_mask is None else attention_mask.shape[-1]
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, N, d)
    k = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, h, N + M, d)
    v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    scale = 1 / math.sqrt(head_dim)
    if offset is not None:
        q_extra = F.pad(offset.transpose(1, 2).unsqueeze(-1).to(q.dtype), (0, OFFSET_DIMS - 1))
        k_extra = torch.zeros(*k.shape[:-1], OFFSET_DIMS, dtype=k.dtype, device=k.device)
        k_extra[:, :, own:, 0] = 1 / scale  # q_extra . k_extra * scale = offset on reference keys only
        q, k = torch.cat([q, q_extra], dim=-1), torch.cat([k, k_extra], dim=-1)
        v = F.pad(v, (0, OFFSET_DIMS))  # the same head size for q, k and v keeps the fused kernels usable
    if attention_mask is not None:
        attention_mask = F.pad(attention_mask, (0, k.shape[2] - attention_mask.shape[-1]))
    out = sdpa(q, k, v, attention_mask, scale=scale, slice_size=slice_size)
    return out[..., :head_dim].transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)


class ReferencePatchAttnProcessor(nn.Module):
    """Self-attention processor with the Reference Patch Adapter beside the frozen layer.

    Per-call inputs through `cross_attention_kwargs`: `rpa_bank` (a ReferenceBank) and
    `rpa_scale` (s >= 0: 0 no reference, 1 as trained; it adds log s to the reference's
    logit). Without a bank, or at scale 0, it is the stock processor.
    """

    kind = "rpa"

    def __init__(self, layer_name: str, query_dim: int, inner_dim: int, heads: int, bias: bool = False):
        super().__init__()
        self.layer_name = layer_name
        self.to_k_ref = nn.Linear(query_dim, inner_dim, bias=bias)  # W^r_k
        self.to_v_ref = nn.Linear(query_dim, inner_dim, bias=bias)  # W^r_v
        self.gate = nn.Linear(query_dim, heads)  # d: the learned correction of the reference's share
        self.slice_size = None  # attention slicing (pipe.enable_attention_slicing): rows per SDPA call

    @classmethod
    def for_layer(cls, attn, layer_name: str) -> "ReferencePatchAttnProcessor":
        with torch.device(attn.to_k.weight.device):  # built where the layer is (also "meta", for FLOP counts)
            proc = cls(
                layer_name, attn.to_k.in_features, attn.to_k.out_features, attn.heads, bias=attn.to_k.bias is not None
            )
        proc.reset_parameters(attn)
        return proc.to(dtype=attn.to_k.weight.dtype)

    @torch.no_grad()
    def reset_parameters(self, attn) -> None:
        """The initial state: copies of the frozen W_k, W_v and no correction (reference-only attention)."""
        self.to_k_ref.weight.copy_(attn.to_k.weight)
        self.to_v_ref.weight.copy_(attn.to_v.weight)
        if self.to_k_ref.bias is not None:
            self.to_k_ref.bias.copy_(attn.to_k.bias)
            self.to_v_ref.bias.copy_(attn.to_v.bias)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        dca_mask=None,
        dca_scale: float = 1.0,
        rpa_bank: ReferenceBank | None = None,
        rpa_scale: float = 1.0,
        **kwargs,
    ):
        call = AttentionCall(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if rpa_bank is not None and rpa_bank.recording:
            rpa_bank.features[self.layer_name] = call.hidden_states.detach()
        if rpa_bank is None or rpa_bank.recording or rpa_scale == 0:
            return call.end(call.frozen_attention(self.slice_size)[3])
        if not rpa_scale > 0:
            raise ValueError(f"rpa_scale must be a finite number >= 0, got {rpa_scale}")
        try:
            ref = rpa_bank.features[self.layer_name]  # (b, M, C), b dividing B
        except KeyError:
            raise KeyError(f"the reference bank has no tokens for layer {self.layer_name}") from None
        tokens = call.hidden_states  # (B, N, C)
        offset = self.gate(tokens) + math.log(rpa_scale)  # (B, N, heads)
        z = joint_attention(
            attn.to_q(tokens),
            attn.to_k(call.context),
            attn.to_v(call.context),
            self.to_k_ref(ref),
            self.to_v_ref(ref),
            attn.heads,
            offset,
            call.attention_mask,
            self.slice_size,
        )
        return call.end(z)
