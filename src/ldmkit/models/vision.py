"""Image towers for image prompts: CLIP's vision transformer (Radford et al. 2021), through transformers'
`CLIPVisionModelWithProjection`, with CLIP's own preprocessing (shortest side resized bicubically to the
tower's size, centre crop, CLIP's mean and std: transformers' processor, as diffusers uses it).
checkpoints/image_encoder_files.py reads them."""

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class ImageEncoder:
    model: torch.nn.Module  # CLIPVisionModelWithProjection
    where: str = ""

    @property
    def width(self) -> int:
        """Width of the hidden states (what plus and full adapters read)."""
        return self.model.config.hidden_size

    @property
    def embed_dim(self) -> int:
        """Width of the projected image embedding (what base adapters read)."""
        return self.model.config.projection_dim

    @property
    def size(self) -> int:
        return self.model.config.image_size

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> [N, 3, size, size]."""
        from transformers import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil(size=self.size, crop_size=self.size)
        return processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, hidden: bool) -> torch.Tensor:
        """[N, embed_dim] projected embeddings, or [N, T, width] penultimate hidden states (hidden)."""
        pixels = pixels.to(next(self.model.parameters()).dtype)
        if hidden:
            return self.model(pixels, output_hidden_states=True).hidden_states[-2].float()
        return self.model(pixels).image_embeds.float()

    def negative(self, pixels: torch.Tensor, hidden: bool) -> torch.Tensor:
        """The features a negative image prompt has, as diffusers makes them: zeros for the embedding, the
        tower's reading of an all-zero (mean-grey after normalisation) image for hidden states."""
        if not hidden:
            return torch.zeros(pixels.shape[0], self.embed_dim)
        return self.features(torch.zeros_like(pixels), hidden=True)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def antialiased_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, *size]: a Gaussian blur of σ = (scale − 1) / 2 per axis (at least 0.001; an odd
    kernel of about 4σ, at least 3; reflected edges) against aliasing, then bicubic interpolation with aligned
    corners — how Stable Video Diffusion shrinks its conditioning frame for the image tower (kornia's resize
    with antialias, as the original code and diffusers call it)."""
    n, c, h, w = x.shape
    for axis, length, target in ((1, w, size[1]), (0, h, size[0])):  # across, then down (as the reference)
        sigma = max((length / target - 1.0) / 2.0, 0.001)
        k = int(max(4.0 * sigma, 3))
        k += 1 - k % 2
        kernel = _gaussian(k, sigma).to(x)
        shape = (c, 1, k, 1) if axis == 0 else (c, 1, 1, k)
        pad = (0, 0, k // 2, k // 2) if axis == 0 else (k // 2, k // 2, 0, 0)
        blur = (torch.nn.functional.pad(x, pad, mode="reflect"), kernel.reshape(1, 1, *shape[2:]).expand(shape))
        x = torch.nn.functional.conv2d(*blur, groups=c)
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=True)
