"""The autoencoder as generation uses it: diffusion latents <-> images in [-1, 1], in the autoencoder's
dtype, whole (as diffusers and the popular web UI decode) unless asked for tiles or unless a whole
pass would not fit in free memory."""

import logging
from pathlib import Path

import torch

from ldmkit.checkpoints.taesd_files import NO_TINY_DECODER, check_fits, find_tiny_decoder, read_tiny_autoencoder
from ldmkit.errors import ConfigError
from ldmkit.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldmkit.models.tiny_autoencoder import TinyAutoencoder

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
    """`tiled`: True always in bands/tiles, False never, None (auto) only when memory requires it.
    `tiny`: a tiny decoder (TAESD, models/tiny_autoencoder.py; set_tiny_decoder) for previews, and for
    the images too when `decoder` is "tiny". `family`: the model's, whose published tiny decoder a folder
    is searched for."""

    def __init__(self, vae: AutoencoderKL, image_size: int, family: str = "", tiled: bool | None = None):
        self.vae = vae
        self.image_size = image_size
        self.family = family
        self.tiled = tiled
        self.tiny: TinyAutoencoder | None = None
        self._decoder = "full"

    @property
    def decoder(self) -> str:
        """What decodes the images: "full", the autoencoder (the default), or "tiny", the tiny decoder."""
        return self._decoder

    @decoder.setter
    def decoder(self, value: str) -> None:
        if value not in ("full", "tiny"):
            raise ConfigError(f"decoder {value!r}; allowed: full, tiny")
        if value == "tiny" and self.tiny is None:
            raise ConfigError(NO_TINY_DECODER)
        self._decoder = value

    def set_tiny_decoder(self, path: str | Path | None) -> None:
        """A tiny autoencoder (TAESD) file or diffusers folder; a folder of such files (ComfyUI's vae_approx)
        is searched for the family's published name (checkpoints/taesd_files.py). Refused in one line if
        it cannot decode this autoencoder's latents. None: none (images decoded by the autoencoder again).
        It stays fp32 whatever the precision: it is cheap, and its parity with diffusers is fp32's."""
        if path is None:
            self.tiny, self._decoder = None, "full"
            return
        path = Path(path)
        if path.is_dir() and not (path / "config.json").is_file():
            path = find_tiny_decoder(path, self.family)
        tiny = read_tiny_autoencoder(path)
        check_fits(tiny, self.family, self.vae.config, str(path))
        self.tiny = tiny.autoencoder.to(next(self.vae.parameters()).device)

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

    def decode(self, z: torch.Tensor, decoder: str | None = None) -> torch.Tensor:
        """Diffusion latents -> images in [-1, 1], fp32, by `decoder` ("full" or "tiny"; None: self.decoder).
        The tiny decoder takes diffusion latents as they are (no unscale: TAESD was trained on them)."""
        if (decoder or self.decoder) == "tiny":
            if self.tiny is None:
                raise ConfigError(NO_TINY_DECODER)
            return self.tiny.decode(z.to(next(self.tiny.parameters()).dtype)).float()
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(self.vae.unscale(z).to(dtype), self.tile(z)).float()

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] -> the posterior over (unscaled) latents, in fp32."""
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixels.to(dtype), self.tile(pixels, self.vae.config.downsample_factor))
        if dtype == torch.float32:
            return posterior
        return DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], dim=1).float())
