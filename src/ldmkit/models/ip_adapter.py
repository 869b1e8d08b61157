"""IP-Adapter (Ye et al. 2023): an image as a prompt, through decoupled cross-attention.

An image tower (models/vision.py) describes the prompt image; a small projection turns its features into
a few tokens of the UNet's context width; every cross-attention of the frozen UNet gets its own key and
value projections for those tokens (`to_k_ip`, `to_v_ip`) and adds, with the same query,

    Attention(Q, K_text, V_text) + scale · Attention(Q, K_image, V_image)      (the paper's eq. 5)

Three projections, named by what the published files hold under `image_proj.`:
    base   CLIP's projected image embedding -> `tokens` tokens (one linear layer and a LayerNorm)
    plus   the tower's penultimate hidden states -> `tokens` learned queries refined by a perceiver
           resampler (Flamingo's: each layer attends from the queries to [image tokens; queries])
    full   the penultimate hidden states, every token kept, through an MLP ("full face")
FaceID adapters (their embeddings come from a face recognition model, not CLIP) are not read.

Module names are the published ones (`image_proj.*`, `ip_adapter.N.to_k_ip.weight`), so a file loads by
name. N counts the UNet's attention layers, self- and cross-, in diffusers' order (down blocks, up blocks,
middle block): the cross-attentions are 1, 3, 5, ...

How the image tokens reach the layers: the denoiser appends them to the text context, and each attached
cross-attention splits them off again (the original implementation's way), so a UNet call keeps its
signature, the guidance batch carries the negative image tokens beside the negative prompt, and a ControlNet
is given the text alone. Outside `bound(...)` an attached layer takes no tokens and adds nothing."""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.nn.attention import CrossAttention

KINDS = ("base", "plus", "full")


@dataclass
class IPAdapterConfig:
    kind: str = "base"
    # Width of the image features read: CLIP's projected embedding (base), or its hidden states (plus, full).
    image_dim: int = 1024
    context_dim: int = 768  # the UNet's cross-attention input width
    tokens: int = 4  # image tokens per prompt image (full: the tower's hidden states, 257 for ViT-H/14)
    # The plus projection's resampler.
    width: int = 768
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4
    # Output width of each cross-attention's to_k_ip / to_v_ip, in the UNet's order.
    layer_widths: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"IP-Adapter kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        self.layer_widths = tuple(self.layer_widths)

    @property
    def reads_hidden_states(self) -> bool:
        """plus and full read the tower's penultimate hidden states; base its projected embedding."""
        return self.kind != "base"


class ImageProjection(nn.Module):
    """base: one embedding -> `tokens` context tokens."""

    def __init__(self, image_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(image_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:  # [N, image_dim] -> [N, tokens, context_dim]
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class MLPProjection(nn.Module):
    """full: each hidden state -> one context token."""

    def __init__(self, image_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, context_dim), nn.LayerNorm(context_dim)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """The queries attend to the image tokens and to themselves (keys and values of both)."""

    def __init__(self, width: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(width)  # the image tokens'
        self.norm2 = nn.LayerNorm(width)  # the queries'
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        b, n, _ = q.shape
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """plus: `tokens` learned queries, refined by `depth` rounds of attention and feed-forward."""

    def __init__(self, c: IPAdapterConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, c.tokens, c.width) / c.width**0.5)
        self.proj_in = nn.Linear(c.image_dim, c.width)
        self.proj_out = nn.Linear(c.width, c.context_dim)
        self.norm_out = nn.LayerNorm(c.context_dim)
        inner = c.width * c.ff_mult
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(c.width, c.heads, c.dim_head),
                    nn.Sequential(
                        nn.LayerNorm(c.width),
                        nn.Linear(c.width, inner, bias=False),
                        nn.GELU(),
                        nn.Linear(inner, c.width, bias=False),
                    ),
                ]
            )
            for _ in range(c.depth)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        x = self.proj_in(hidden)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImageKeyValue(nn.Module):
    """One cross-attention's projections of the image tokens."""

    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)


class IPAdapter(nn.Module):
    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = c = config
        if c.kind == "base":
            self.image_proj = ImageProjection(c.image_dim, c.context_dim, c.tokens)
        elif c.kind == "plus":
            self.image_proj = Resampler(c)
        else:
            self.image_proj = MLPProjection(c.image_dim, c.context_dim)
        self.ip_adapter = nn.ModuleDict(
            {str(2 * i + 1): ImageKeyValue(c.context_dim, w) for i, w in enumerate(c.layer_widths)}
        )
        # Set while a UNet call is bound (see `bound`): image tokens per sample, and whether this step
        # is inside the adapter's start/end range.
        self.bound_tokens: int | None = None
        self.active = True

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Image features of N prompt images [N, image_dim] or [N, T, image_dim] -> their tokens side by
        side, [1, N * tokens, context_dim] (diffusers' order for several images per adapter)."""
        tokens = self.image_proj(features.to(next(self.parameters()).dtype))
        return tokens.reshape(1, -1, tokens.shape[-1])


@dataclass
class Attached:
    """One adapter's part in one cross-attention."""

    adapter: IPAdapter
    kv: ImageKeyValue
    scale: float = 1.0


@dataclass
class ImagePrompt:
    """One adapter's image tokens for a sampling run, batched like the prompt states."""

    adapter: IPAdapter
    tokens: torch.Tensor  # [B, N, D]
    uncond: torch.Tensor | None = None  # [B, N, D] the negative image's tokens (for the guidance pass)
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def cross_attentions(unet) -> list[tuple[str, int, int, CrossAttention]]:
    """The UNet's cross-attentions in diffusers' order, each with where diffusers' per-block scales
    find it: ("down", block, attention), ("up", block, attention) or ("mid", 0, 0). diffusers numbers
    the up blocks from the deepest level."""
    c = unet.config
    found = []

    def add(part, block, index, transformer):
        for tb in transformer.transformer_blocks:
            found.append((part, block, index, tb.attn2))

    for level in range(c.levels):
        if c.has_attention(level):
            for j in range(c.res_blocks_at(level)):
                add("down", level, j, unet.input_blocks[c.input_block_index(level, j)][1])
    for level in reversed(range(c.levels)):
        if c.has_attention(level):
            for j in range(c.res_blocks_at(level) + 1):
                add("up", c.levels - 1 - level, j, unet.output_blocks[c.output_block_index(level, j)][1])
    if c.middle_block == "attention":
        add("mid", 0, 0, unet.middle_block[1])
    return found


def layer_scales(unet, scale: float | dict) -> list[float]:
    """One scale per cross-attention. A dict is diffusers' per-block form — {"down": {"block_2": [0.0, 1.0]},
    "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.5}, a value or a list per block, one entry per attention of
    the block — and blocks it does not name get 0 (InstantStyle's "style only", "layout only")."""
    layers = cross_attentions(unet)
    if not isinstance(scale, dict):
        return [_scale_value(scale, "IP-Adapter scale")] * len(layers)
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ConfigError(f"IP-Adapter scale part {sorted(unknown)[0]!r}; allowed: down, mid, up")
    blocks = {(p, b) for p, b, _, _ in layers if p != "mid"}
    for part in ("down", "up"):
        given = scale.get(part, {})
        for name in given if isinstance(given, dict) else ():
            digits = str(name)[6:]
            if not (
                str(name).startswith("block_")
                and digits.isascii()
                and digits.isdigit()
                and (part, int(digits)) in blocks
            ):
                raise ConfigError(f"IP-Adapter scale {part}.{name}: this UNet has no attention there")
    out = []
    for part, block, index, _ in layers:
        value = scale.get(part, 0.0)
        if isinstance(value, dict):
            value = value.get(f"block_{block}", 0.0)
        if isinstance(value, (list, tuple)):
            count = len({i for p, b, i, _ in layers if (p, b) == (part, block)})
            if len(value) not in (1, count):
                raise ConfigError(
                    f"IP-Adapter scale {part}.block_{block}: {len(value)} values; its attentions: {count}"
                )
            value = value[0] if len(value) == 1 else value[index]
        out.append(_scale_value(value, f"IP-Adapter scale {part}.block_{block}"))
    return out


def _scale_value(value, what: str) -> float:
    """A finite number within ±10 (as a ControlNet's strength)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or abs(value) > 10:
        raise ConfigError(f"{what}: {value!r}; allowed: a number from -10 to 10")
    return float(value)


def check_fits(unet, adapter: IPAdapter) -> None:
    """The adapter's layers are this UNet's cross-attentions: as many, and of their widths."""
    layers = cross_attentions(unet)
    if len(adapter.ip_adapter) != len(layers):
        raise ConfigError(
            f"IP-Adapter with {len(adapter.ip_adapter)} cross-attention layers; this UNet has {len(layers)}"
        )
    for (_, _, _, attn), kv in zip(layers, adapter.ip_adapter.values()):
        if kv.to_k_ip.out_features != attn.to_q.out_features or kv.to_k_ip.in_features != attn.to_k.in_features:
            raise ConfigError(
                f"IP-Adapter layer widths {kv.to_k_ip.in_features}->{kv.to_k_ip.out_features} do not fit this "
                f"UNet's cross-attention ({attn.to_k.in_features}->{attn.to_q.out_features})"
            )


def attach(unet, adapters: list[tuple[IPAdapter, float | dict]]) -> None:
    """Give every cross-attention of `unet` the adapters' image attention, replacing any attached before.
    Everything is checked before anything changes: a refusal leaves the UNet as it was."""
    if len({id(a) for a, _ in adapters}) != len(adapters):
        raise ConfigError("one IP-Adapter given twice: give it once, with all its images")
    if any(unet.config.self_attention_disabled_at(level) for level in range(unet.config.levels)):
        raise ConfigError("IP-Adapters need a UNet whose first attention attends to itself (no only_cross_attention)")
    scales = []
    for adapter, scale in adapters:
        check_fits(unet, adapter)
        scales.append(layer_scales(unet, scale))
    layers = cross_attentions(unet)
    detach(unet)
    for (adapter, _), per_layer in zip(adapters, scales):
        adapter.to(next(unet.parameters()).dtype)
        for (_, _, _, attn), kv, s in zip(layers, adapter.ip_adapter.values(), per_layer):
            attn.image_prompts.append(Attached(adapter, kv, s))
    unet.image_prompts_attached = len(adapters)  # what the OpenVINO backend reads: such calls run on PyTorch


def detach(unet) -> None:
    for *_, attn in cross_attentions(unet):
        attn.image_prompts.clear()
    unet.image_prompts_attached = 0


@contextlib.contextmanager
def bound(unet, prompts: list[ImagePrompt], step: int, steps: int):
    """While a UNet call runs: how many image tokens each adapter's prompts append to the context, and
    whether the step is in its range. Tokens for a UNet the adapter is not attached to would be read as
    text: refused."""
    if not prompts:
        yield
        return
    layers = cross_attentions(unet)
    for ip in prompts:
        if not layers or not any(a.adapter is ip.adapter for a in layers[0][3].image_prompts):
            raise ConfigError("an image prompt for a UNet its IP-Adapter is not attached to")
    try:
        for ip in prompts:
            ip.adapter.bound_tokens = ip.tokens.shape[1]
            ip.adapter.active = ip.active(step, steps)
        yield
    finally:
        for ip in prompts:
            ip.adapter.bound_tokens, ip.adapter.active = None, True
