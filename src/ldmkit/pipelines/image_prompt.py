"""Image prompts for a generation call: one IP-Adapter (models/ip_adapter.py), the image tower it reads
(models/vision.py) and its prompt images, with a scale (a number, or diffusers' per-block dict) and the
fraction of the steps it acts in. Several adapters at once each add their own attention.

As diffusers' pipelines do: several images for one adapter put their tokens side by side; every image of
the batch gets the same image tokens; the negative image prompt is zeros in the embedding (base) or the
tower's reading of an all-zero image (plus, full), projected like the prompt."""

import contextlib
from dataclasses import dataclass, field

from PIL import Image

from ldmkit.checkpoints.families import adapter_family
from ldmkit.errors import ConfigError
from ldmkit.images import to_rgb
from ldmkit.models.ip_adapter import ImagePrompt, IPAdapter, attach, check_fits, cross_attentions, detach, layer_scales
from ldmkit.models.vision import ImageEncoder

MAX_IMAGES = 16  # prompt images per adapter


@dataclass
class ImagePromptInput:
    adapter: IPAdapter
    encoder: ImageEncoder
    images: list[Image.Image] = field(default_factory=list)
    scale: float | dict = 1.0
    start: float = 0.0
    end: float = 1.0
    name: str = "ip-adapter"

    def check(self, unet, model_name: str = "the model") -> None:
        """Everything that can be refused before any work: the range, the images, the tower's width and
        the UNet's cross-attentions against the adapter's (unet None: the model has a transformer)."""
        c = self.adapter.config
        if unet is None:
            raise ConfigError(f"IP-Adapter {self.name}: {model_name} is a transformer; IP-Adapters fit U-Net models")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(
                f"IP-Adapter {self.name}: start {self.start}, end {self.end}; allowed: 0 <= start < end <= 1"
            )
        if not 1 <= len(self.images) <= MAX_IMAGES:
            raise ConfigError(f"IP-Adapter {self.name}: {len(self.images)} images; allowed: 1 to {MAX_IMAGES}")
        given = self.encoder.width if c.reads_hidden_states else self.encoder.embed_dim
        what = "hidden states" if c.reads_hidden_states else "image embeddings"
        if given != c.image_dim:
            raise ConfigError(
                f"IP-Adapter {self.name} reads {c.image_dim}-wide {what}; the image encoder "
                f"{self.encoder.where or ''} gives {given}-wide ones: give the tower it was trained with"
            )
        if c.context_dim != unet.config.context_dim:
            theirs, ours = adapter_family(c.context_dim), adapter_family(unet.config.context_dim)
            raise ConfigError(
                f"IP-Adapter {self.name} is for {theirs.title if theirs else 'another model'} ({c.context_dim}-wide "
                f"cross-attention); {model_name}'s is {unet.config.context_dim} wide"
                + (f" ({ours.title})" if ours else "")
            )
        layers = cross_attentions(unet)
        if len(layers) != len(c.layer_widths):
            raise ConfigError(
                f"IP-Adapter {self.name} has {len(c.layer_widths)} cross-attention layers; {model_name}'s UNet has "
                f"{len(layers)}"
            )
        check_fits(unet, self.adapter)
        layer_scales(unet, self.scale)  # a scale out of range, or a per-block dict naming blocks this UNet lacks

    def prompt(self, batch: int, guided: bool, device) -> ImagePrompt:
        hidden = self.adapter.config.reads_hidden_states
        pixels = self.encoder.pixels([to_rgb(im) for im in self.images])
        tokens = self.adapter.project(self.encoder.features(pixels, hidden))
        uncond = self.adapter.project(self.encoder.negative(pixels, hidden)) if guided else None

        def batched(t):
            return None if t is None else t.to(device).expand(batch, -1, -1)

        return ImagePrompt(self.adapter, batched(tokens), batched(uncond), self.start, self.end)


@contextlib.contextmanager
def attached(unet, inputs):
    """The adapters' image attention in the UNet for one generation call, taken out afterwards."""
    if not inputs:
        yield
        return
    attach(unet, [(ip.adapter, ip.scale) for ip in inputs])  # refuses an adapter given twice
    try:
        yield
    finally:
        detach(unet)


def infotext_fields(inputs) -> dict:
    return {
        f"IP-Adapter {i}": f"Model: {ip.name}, Weight: {ip.scale if isinstance(ip.scale, dict) else f'{ip.scale:g}'}"
        f", Start: {ip.start:g}, End: {ip.end:g}"
        for i, ip in enumerate(inputs)
    }
