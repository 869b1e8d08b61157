"""Attention for the UNet: multi-head self/cross-attention through `scaled_dot_product_attention`,
the GEGLU feed-forward, and the spatial transformer. Attribute names are the checkpoint's
(`to_q`, `to_out.0`, `ff.net.0.proj`, `proj_in`, `transformer_blocks`)."""

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.resnet import GroupNorm32


class CrossAttention(nn.Module):
    """Attention of `x` over `context` (over itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        # Image prompts' decoupled attention (models/ip_adapter.py attaches them): not submodules, so the
        # UNet's own weights stay what its file holds.
        self.image_prompts: list = []

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        images = []
        for ip in reversed(self.image_prompts):  # their tokens follow the text's, in the adapters' order
            n = ip.adapter.bound_tokens
            if n is not None:
                context, tokens = context[:, : context.shape[1] - n], context[:, context.shape[1] - n :]
                images.append((ip, tokens))
        q = self._heads(self.to_q(x))
        out = F.scaled_dot_product_attention(q, self._heads(self.to_k(context)), self._heads(self.to_v(context)))
        for ip, tokens in reversed(images):
            if ip.scale != 0.0 and ip.adapter.active:  # scale 0 computes nothing: exactly no adapter
                k, v = self._heads(ip.kv.to_k_ip(tokens)), self._heads(ip.kv.to_v_ip(tokens))
                out = out + ip.scale * F.scaled_dot_product_attention(q, k, v)
        b, n = x.shape[0], x.shape[1]
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives both the value and its gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, then GEGLU feed-forward.
    disable_self_attn: the first attention attends to the context too (the original code's
    `disable_self_attn`, diffusers' `only_cross_attention`)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None,
        dropout: float = 0.0,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map. SD 1.x projects in and out with 1x1
    convolutions, SD 2.x with linear layers (applied after flattening): same maths, other keys."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int | None,
        use_linear: bool,
        dropout: float = 0.0,
        groups: int = 32,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, disable_self_attn) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> normalised, projected tokens [B, H·W, inner]."""
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # b (h w) c
        return self.proj_in(x) if self.use_linear else x

    def from_tokens(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens [B, H·W, inner] -> projected back to [B, C, H, W]."""
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return x if self.use_linear else self.proj_out(x)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        tokens = self.to_tokens(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.from_tokens(tokens, *x.shape[-2:]) + x
