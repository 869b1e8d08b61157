"""SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): besides the text, the UNet's addition
embedding sees the pooled text vector and a few numbers about the image — the size of the training
image before it was resized (`original_size`), the crop taken from it (`crops_coords_top_left`) and the
output size (`target_size`); the refiner sees an aesthetic score in place of the target size. Names,
order and defaults are diffusers': sizes (height, width) defaulting to the output size, no crop, the
negative prompt's numbers defaulting to the positive ones, aesthetic scores 6 and 2.5 (negative)."""

import torch

from ldmkit.errors import ConfigError
from ldmkit.nn.embedding import size_embedding

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' refiner defaults
BASE, REFINER = 6, 5  # numbers the base model's and the refiner's UNet take


def count(unet_config, pooled_dim: int) -> int:
    """How many numbers an SDXL-style UNet takes besides a pooled vector of `pooled_dim`."""
    n, rest = divmod(unet_config.adm_in_channels - pooled_dim, unet_config.addition_time_embed_dim)
    if rest or n not in (BASE, REFINER):
        raise ConfigError(
            f"the UNet's addition embedding takes {unet_config.adm_in_channels} values: not a pooled vector of "
            f"{pooled_dim} and {BASE} (base) or {REFINER} (refiner) numbers of {unet_config.addition_time_embed_dim}"
        )
    return n


def check_micro_conditioning(config, p) -> None:
    """Refuse micro-conditioning a model (ModelConfig) does not take, since it would change nothing: any
    of it without an SDXL-style UNet, aesthetic scores on the base model, target sizes on the refiner."""
    defaults = {f: type(p).__dataclass_fields__[f].default for f in FIELDS}
    given = [f for f in FIELDS if getattr(p, f) != defaults[f]]
    if not given:
        return
    if not config.unet.addition_time_embed_dim:
        raise ConfigError(f"{given[0]}: only SDXL-family models take micro-conditioning")
    tower = config.text_2 or config.text
    refiner = count(config.unet, tower.projection_dim or tower.hidden_size) == REFINER
    if p.refiner_switch_at is not None:  # a run handed to a refiner: the scores are the refiner's
        given = [f for f in given if "aesthetic" not in f]
    for f in given:
        if "aesthetic" in f and not refiner:
            raise ConfigError(f"{f}: only the SDXL refiner takes aesthetic scores")
        if "target" in f and refiner:
            raise ConfigError(f"{f}: the SDXL refiner takes aesthetic scores, not target sizes")


# GenerationParams' micro-conditioning fields: the pairs, then the refiner's scores
PAIRS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)
FIELDS = (*PAIRS, "aesthetic_score", "negative_aesthetic_score")


def micro_numbers(p, n: int, negative: bool) -> list[float]:
    """One image's numbers in the reference's order: original (h, w), crop (top, left), then the target
    (h, w) for the base model or the aesthetic score for the refiner."""
    output = (p.height, p.width)
    original = p.original_size or output
    crop = p.crops_coords_top_left
    target = p.target_size or output
    if negative:
        original = p.negative_original_size or original
        crop = p.negative_crops_coords_top_left or crop
        target = p.negative_target_size or target
    last = [p.negative_aesthetic_score if negative else p.aesthetic_score] if n == REFINER else list(target)
    return [*original, *crop, *last]


def added_vectors(unet_config, pooled: torch.Tensor, uncond_pooled: torch.Tensor | None, p):
    """(y, uncond y) for the UNet's addition embedding: [pooled, embedded numbers] per image."""
    n = count(unet_config, pooled.shape[-1])

    def vector(v: torch.Tensor, negative: bool) -> torch.Tensor:
        numbers = torch.tensor([micro_numbers(p, n, negative)] * v.shape[0], dtype=torch.float32, device=v.device)
        return torch.cat([v, size_embedding(numbers, unet_config.addition_time_embed_dim).to(v.dtype)], dim=-1)

    return vector(pooled, False), None if uncond_pooled is None else vector(uncond_pooled, True)
