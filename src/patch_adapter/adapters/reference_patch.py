"""Reference Patch Adapter (stage 2): full-resolution patches attend to their reference.

METHOD.md, stage 2 (our design). The reference patch (the upsampled stage-1 result
at the same place) is passed once through the frozen UNet; every self-attention layer
(`attn1`) records its input tokens r into a `ReferenceBank`. While denoising, each
`attn1` adds a decoupled attention to those tokens with a token-wise gate:

    Z    = SelfAttn(z)                                    frozen
    Z_r  = Attn(z W_q, r W^r_k, r W^r_v)                  reference attention
    g    = 2 * sigmoid(w . [z, Z_r] + b)                  adaptive fusion, token-wise
    out  = W_out(Z + scale * g * Z_r)

W^r_k, W^r_v start as copies of W_k, W_v and the gate at w = 0, b = 0 (g = 1): the
untrained adapter is the training-free "reference-only" attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .attention import AttentionCall, multihead_attention


class ReferenceBank:
    """Input tokens of every `attn1` layer for one reference patch, by layer name.

    Only the tokens are kept, not their projections: the projections cost about 3%
    of a UNet forward at SDXL's size but would triple the bank's memory, and a 4K
    inpaint keeps one bank per patch.
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

    def to(self, device) -> "ReferenceBank":
        self.features = {k: v.to(device) for k, v in self.features.items()}
        return self

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.features.values())


class ReferencePatchAttnProcessor(nn.Module):
    """Self-attention processor with the Reference Patch Adapter beside the frozen layer.

    Per-call inputs through `cross_attention_kwargs`: `rpa_bank` (a ReferenceBank) and
    `rpa_scale`. Without a bank, or at scale 0, it is the stock processor.
    """

    kind = "rpa"

    def __init__(self, layer_name: str, query_dim: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.layer_name = layer_name
        self.to_k_ref = nn.Linear(query_dim, inner_dim, bias=bias)  # W^r_k
        self.to_v_ref = nn.Linear(query_dim, inner_dim, bias=bias)  # W^r_v
        self.gate = nn.Linear(query_dim + inner_dim, 1)

    @classmethod
    def for_layer(cls, attn, layer_name: str) -> "ReferencePatchAttnProcessor":
        with torch.device(attn.to_k.weight.device):  # built where the layer is (also "meta", for FLOP counts)
            proc = cls(layer_name, attn.to_k.in_features, attn.to_k.out_features, bias=attn.to_k.bias is not None)
        proc.reset_parameters(attn)
        return proc.to(dtype=attn.to_k.weight.dtype)

    @torch.no_grad()
    def reset_parameters(self, attn) -> None:
        """The initial state: copies of the frozen W_k, W_v and a gate of exactly 1."""
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
        query, _, _, z = call.frozen_attention()  # z: (B, N, inner)
        if rpa_bank is not None and not rpa_bank.recording and rpa_scale != 0:
            try:
                ref = rpa_bank.features[self.layer_name]  # (b, M, C), b dividing B
            except KeyError:
                raise KeyError(f"the reference bank has no tokens for layer {self.layer_name}") from None
            z_ref = multihead_attention(query, self.to_k_ref(ref), self.to_v_ref(ref), attn.heads)
            gate = 2 * torch.sigmoid(self.gate(torch.cat([call.hidden_states, z_ref], dim=-1)))  # (B, N, 1)
            z = z + rpa_scale * gate * z_ref
        return call.end(z)
