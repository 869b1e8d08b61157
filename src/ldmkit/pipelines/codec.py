"""The autoencoder as generation uses it: diffusion latents <-> images in [-1, 1], in the autoencoder's
dtype, whole (as diffusers and the popular web UI decode) unless asked for tiles or unless a whole
pass would not fit in free memory."""

import logging

import torch

from ldmkit.models.autoencoder import AutoencoderKL, DiagonalGaussian

log = logging.getLogger(__name__)


def estimate_vae_bytes(vae: AutoencoderKL, x: torch.Tensor, factor: int = 1) -> int:
    """A whole autoencoder pass's activation memory, estimated: four copies of its widest feature map
    (a block's input, normalised, activated, and a convolution's reordered input) live at once, in the
    weights' dtype. The widest map is a level's width at the resolution it is upsampled to. SD's
    autoencoder at 1024², fp32: 4.3 GB estimated, 3.7 GB measured (benchmarks/banded_decode.py)."""
    c = vae.config
    h, w = x.shape[-2] // factor * c.downsample_factor, x.shape[-1] // factor * c.downsample_factor
    widest = max(width * (h >> max(0, i - 1)) * (w >> max(0, i - 1)) for i, width in enumerate(c.channels))
    return 4 * x.shape[0] * widest * next(vae.parameters()).element_size()


def available_memory() -> int | None:
    """Bytes the kernel says a process can still take (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class LatentCodec:
    """`tiled`: True always in bands/tiles, False never, None (auto) only when memory requires it."""

    def __init__(self, vae: AutoencoderKL, image_size: int, tiled: bool | None = None):
        self.vae = vae
        self.image_size = image_size
        self.tiled = tiled

    def tile(self, x: torch.Tensor, factor: int = 1) -> int | None:
        """The autoencoder's tile (latent pixels) for a tensor of `factor` x latent size, or None (whole).
        With a tile, decoding runs in bands of that many rows with whole-image statistics (the same image
        within float rounding, less memory) and encoding in diffusers' independent tiles. Auto tiles
        only when a whole pass would need more memory than the machine has free (estimate_vae_bytes),
        and says so in the log."""
        native = max(8, self.image_size // self.vae.config.downsample_factor)
        if self.tiled is False:
            return None
        if self.tiled is None:
            need, free = estimate_vae_bytes(self.vae, x, factor), available_memory()
            if free is None or need <= free:
                return None
            log.info("autoencoder in bands/tiles: a whole pass needs ~%d MB, %d MB are free", need >> 20, free >> 20)
        return native

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [-1, 1], fp32."""
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(self.vae.unscale(z).to(dtype), self.tile(z)).float()

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] -> the posterior over (unscaled) latents, in fp32."""
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixels.to(dtype), self.tile(pixels, self.vae.config.downsample_factor))
        if dtype == torch.float32:
            return posterior
        return DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], dim=1).float())
