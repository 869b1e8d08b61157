"""MMDiT, the backbone of Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis", sec. 4).

Image patches and text tokens are two streams with their own weights (a `context_block` and an `x_block`
in every joint block) that meet in one attention over both sequences. The diffusion time and the pooled
text vector modulate every layer norm (adaLN, as in DiT). SD3.5 adds RMS normalisation of queries and keys
(`qk_norm`) and, in SD3.5 Medium, a second attention over the image tokens alone in the first blocks
(`dual_attention_layers`, the original's `x_block_self_attn`).

Attribute names are the keys of the original files under `model.diffusion_model.`; diffusers'
`SD3Transformer2DModel` computes the same function (tests/test_mmdit.py), its names are mapped in
checkpoints/mmdit_keys.py."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.nn.embedding import sincos_2d_embedding, timestep_embedding

QK_NORMS = (None, "rms_norm")
# Width of the sinusoidal timestep features fed to t_embedder (the original's frequency_embedding_size).
TIME_FEATURES = 256


@dataclass
class MMDiTConfig:
    """Defaults: SD3 Medium. SD3.5 Large: depth 38, hidden_size 2432, qk_norm "rms_norm". SD3.5 Medium:
    pos_embed_max_size 384, qk_norm "rms_norm", dual_attention_layers 0..12."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    # Number of joint blocks (diffusers' num_layers).
    depth: int = 24
    # Width of both streams. diffusers has it twice, as num_attention_heads * attention_head_dim and as
    # caption_projection_dim (the context stream's width), which must agree: the blocks share one width.
    hidden_size: int = 1536
    # Channels per attention head: 64 in every SD3 release (the original derives hidden = 64 * depth).
    head_dim: int = 64
    # Width of the text tokens entering context_embedder (diffusers' joint_attention_dim: T5-XXL's 4096,
    # the CLIP states zero-padded to it).
    context_dim: int = 4096
    # Width of the pooled text vector y (diffusers' pooled_projection_dim: CLIP-L 768 + CLIP-G 1280);
    # 0: none (ldmkit's own models, whose one text tower pools nothing).
    pooled_dim: int = 2048
    # Side of the stored position table, in patches; a latent may use any centred crop of it.
    pos_embed_max_size: int = 192
    # Native latent side (1024 px / 8). Weights cannot say it: it only scales a fresh position table.
    sample_size: int = 128
    qk_norm: str | None = None
    # Blocks whose x_block has a second, image-only attention (attn2).
    dual_attention_layers: tuple[int, ...] = ()

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        for name in ("in_channels", "out_channels", "patch_size", "depth", "hidden_size", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MMDiTConfig.{name}={value!r}; allowed: a positive int")
        if self.hidden_size % self.head_dim:
            raise ConfigError(f"MMDiTConfig: hidden_size {self.hidden_size} is no multiple of head_dim {self.head_dim}")
        if self.hidden_size % 4:
            # The sinusoidal position table gives a quarter of the channels to sin and cos of each axis.
            raise ConfigError(f"MMDiTConfig.hidden_size={self.hidden_size}; allowed: a multiple of 4")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"MMDiTConfig.qk_norm={self.qk_norm!r}; allowed: {list(QK_NORMS)}")
        if any(not 0 <= i < self.depth for i in self.dual_attention_layers):
            raise ConfigError(
                f"MMDiTConfig.dual_attention_layers={self.dual_attention_layers}; allowed: block indices below"
                f" depth {self.depth}"
            )

    # What code common to both backbones asks of a U-Net's config, which a transformer has not: no
    # guidance embedding (LCM), no micro-conditioning (SD3's y is the pooled text vector itself).
    time_cond_proj_dim = None
    addition_time_embed_dim = 0

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: a normalised x [B, L, D] shifted and scaled per sample ([B, 1, D]); the 1 + scale keeps a
    zero-initialised modulation an identity."""
    return x * (1 + scale) + shift


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, head_dim] each -> [B, L, heads * head_dim]."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of the latent, each projected to one token: [B, C, H, W] -> [B, HW/p², D]."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VectorEmbedder(nn.Module):
    """A two-layer MLP from a vector to the hidden width: t_embedder (sinusoidal time features) and
    y_embedder (the pooled text vector)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size * mlp_ratio)
        self.fc2 = nn.Linear(hidden_size * mlp_ratio, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused q/k/v projection with optional per-head RMS norm of q and k (SD3.5), and the output projection,
    which the last block's context stream lacks (`pre_only`: its tokens are not read after that block)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        head_dim = hidden_size // num_heads
        self.ln_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, D] -> q, k, v, each [B, heads, L, head_dim]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.ln_q(q), self.ln_k(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(*self.heads(x)))


class StreamBlock(nn.Module):
    """One stream's half of a joint block (the original's DismantledBlock): adaLN-modulated attention
    inputs before the joint attention, gated residual attention output and MLP after it.

    The modulation gives, per sample, shift/scale/gate for attention and MLP (6 chunks); 9 with the
    image-only second attention; 2 (shift, scale) for the last block's context stream, which stops
    after providing its keys and values."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None, pre_only: bool, dual: bool):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.chunks = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.chunks * hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, pre_only)
        if dual:
            self.attn2 = SelfAttention(hidden_size, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """q, k, v of this stream's tokens x [B, L, D] under conditioning c [B, D], and what
        post_attention needs."""
        mods = self.adaLN_modulation(c)[:, None].chunk(self.chunks, dim=-1)
        normed = self.norm1(x)
        return self.attn.heads(modulate(normed, mods[0], mods[1])), (normed, mods)

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, normed: torch.Tensor, mods) -> torch.Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa * self.attn.proj(attn)
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2 * self.attn2(modulate(normed, shift_msa2, scale_msa2))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Both streams attend over the concatenation [context tokens, image tokens] (sec. 4)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None, last: bool, dual: bool):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, qk_norm, pre_only=last, dual=False)
        self.x_block = StreamBlock(hidden_size, num_heads, qk_norm, pre_only=False, dual=dual)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        context_qkv, context_rest = self.context_block.pre_attention(context, c)
        x_qkv, x_rest = self.x_block.pre_attention(x, c)
        out = attention(*(torch.cat(pair, dim=2) for pair in zip(context_qkv, x_qkv)))
        n = context.shape[1]
        x = self.x_block.post_attention(x, out[:, n:], *x_rest)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, out[:, :n], *context_rest), x


class FinalLayer(nn.Module):
    """adaLN (shift, scale: no gate) then a linear map of each token back to its p x p x C patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        self.x_embedder = PatchEmbed(c.in_channels, d, c.patch_size)
        # Stored in the files ([1, max², D]); a fresh model starts from the fixed sinusoidal table.
        table = sincos_2d_embedding(d, c.pos_embed_max_size, base_size=c.sample_size // c.patch_size)
        self.register_buffer("pos_embed", table[None])
        self.t_embedder = VectorEmbedder(TIME_FEATURES, d)
        if c.pooled_dim:  # 0: no pooled vector, the text reaches the image through joint attention alone
            self.y_embedder = VectorEmbedder(c.pooled_dim, d)
        self.context_embedder = nn.Linear(c.context_dim, d)
        self.joint_blocks = nn.ModuleList(
            JointBlock(d, c.num_heads, c.qk_norm, last=i == c.depth - 1, dual=i in c.dual_attention_layers)
            for i in range(c.depth)
        )
        self.final_layer = FinalLayer(d, c.patch_size, c.out_channels)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre h x w patches of the position table, [1, h*w, D], as the reference crops it: every
        latent size sees positions around the table's middle."""
        m = self.config.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.view(1, m, m, -1)[:, top : top + h, left : left + w]
        return table.reshape(1, h * w, -1)

    def check_input(self, x: torch.Tensor, control, cache, timestep_cond, y) -> None:
        if control is not None or cache is not None or timestep_cond is not None:
            raise ConfigError("MMDiT: control, cache and timestep_cond are not supported; pass None")
        if (y is None) != (self.config.pooled_dim == 0):
            want = f"y, the pooled text vector [B, {self.config.pooled_dim}]" if self.config.pooled_dim else "no y"
            raise ConfigError(f"MMDiT: this transformer takes {want}")
        p, m = self.config.patch_size, self.config.pos_embed_max_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise ConfigError(f"MMDiT: latent size {h}x{w}; allowed: multiples of the patch size {p}")
        if h // p > m or w // p > m:
            raise ConfigError(f"MMDiT: latent size {h}x{w}; allowed: at most {m * p} (a table of {m} patches a side)")

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p], each token's channels laid out (row, column, channel)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        control=None,
        cache=None,
    ) -> torch.Tensor:
        """x: [B, C, H, W] latents; t: [B] (or scalar) timesteps, sigma * 1000 for SD3's flow schedule;
        context: [B, T, context_dim] text tokens; y: [B, pooled_dim] pooled text vector. Returns
        [B, out_channels, H, W] (SD3: the flow velocity). The last three arguments exist so the sampler's
        denoiser calls this as it calls the UNet; they must be None."""
        self.check_input(x, control, cache, timestep_cond, y)
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x) + self.cropped_pos_embed(h, w)
        t = t.reshape(-1).expand(x.shape[0])
        c = self.t_embedder(timestep_embedding(t, TIME_FEATURES).to(x.dtype))
        if y is not None:
            c = c + self.y_embedder(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, tokens = block(context, tokens, c)
        return self.unpatchify(self.final_layer(tokens, c), h, w)
