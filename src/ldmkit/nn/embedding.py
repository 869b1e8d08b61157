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


def sincos_2d_embedding(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """Fixed sinusoidal embedding of the cells of a square grid (MAE / DiT), [grid_size**2, dim], row-major:
    the first half of the channels encodes the column, the second half the row, each as [sin, cos].

    Position = index * base_size / grid_size, so the whole grid spans `base_size` units: diffusers' table
    for SD3. A trained model stores its own table; this only initialises a new one."""
    if dim % 4:
        raise ValueError(f"sincos_2d_embedding: dim {dim} must be a multiple of 4 (sin and cos per axis)")
    # float32 positions, float64 angles: the rounding of diffusers' table.
    pos = (torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)).double()
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    angles = pos[:, None] * omega[None]  # [grid, dim / 4]
    axis = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()  # [grid, dim / 2]
    col = axis[None, :, :].expand(grid_size, -1, -1)
    row = axis[:, None, :].expand(-1, grid_size, -1)
    return torch.cat([col, row], dim=-1).reshape(grid_size * grid_size, dim)
