"""Sinusoidal embeddings of the diffusion timestep and of the guidance scale."""

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal timestep embedding, laid out [cos, sin] as in the original LDM code
    (diffusers' `flip_sin_to_cos=True, downscale_freq_shift=0`). Computed in fp32: t reaches 999."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def guidance_scale_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """The guidance-scale input of consistency-distilled models (LCM, Luo et al. 2023).

    The embedded value is (w - 1) * 1000, laid out [sin, cos] with frequencies over (half - 1) -- unlike
    the timestep embedding. These conventions decide whether published LCM checkpoints work, so they
    follow diffusers' `get_guidance_scale_embedding` exactly."""
    w = (guidance_scale.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def size_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): each number (original size, crop
    corner, target size or aesthetic score) [B, n] embedded by the timestep embedding into `dim`
    channels, concatenated to [B, n * dim] (the original's ConcatTimestepEmbedderND, diffusers'
    add_time_proj)."""
    b, n = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(b, n * dim)
