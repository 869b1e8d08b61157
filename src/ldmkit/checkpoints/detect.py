"""What a checkpoint holds, from its keys and shapes -- no YAML.

Family rules first (a small table: which keys betray which model), then the architecture read off
the tensors: context size, channel widths, block counts, linear vs conv projections, in-channels.
What weights cannot tell (attention heads, v vs eps for SD 2, the latent scale) comes from the
family's rules and is listed in `config.guessed` so that `inspect` can say so. SDXL's original layout
(its text towers as `conditioner.embedders.N`) is mapped in sgm.py."""

import json
import re
from dataclasses import replace

import torch

from ldmkit.checkpoints import keymaps, sgm
from ldmkit.checkpoints.components import strip_prefix
from ldmkit.checkpoints.families import FAMILIES, Family, sd_family, unsupported_family
from ldmkit.errors import CheckpointError, UnsupportedModelError
from ldmkit.models.autoencoder import AutoencoderConfig
from ldmkit.models.ldm import ModelConfig, ScheduleConfig
from ldmkit.models.text import MINILM_PACKAGE, TextEncoderConfig
from ldmkit.models.unet import UNetConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."
METADATA_KEY = "ldmkit"
# Keys that mark a standalone autoencoder file (original or diffusers layout, prefixed or not).
VAE_FILE_PREFIXES = ("encoder.down.", "encoder.down_blocks.", "first_stage_model.encoder.down.")

# Keys that are not weights of the networks we build, dropped before strict loading:
# EMA copies (the live weights are what SD ships for inference), the DDPM schedule buffers
# (alphas_cumprod is kept aside as the training schedule; SDXL files may carry its sigmas, the
# standard schedule's), VAE training losses, position ids.
NOT_WEIGHTS = re.compile(
    r"^(model_ema\.|loss\.|lvlb_weights$|logvar$|betas$|alphas_cumprod$|alphas_cumprod_prev$|sqrt_alphas_cumprod$"
    r"|denoiser\.sigmas$|sqrt_one_minus_alphas_cumprod$|log_one_minus_alphas_cumprod$|sqrt_recip_alphas_cumprod$"
    r"|sqrt_recipm1_alphas_cumprod$|posterior_variance$|posterior_log_variance_clipped$"
    r"|posterior_mean_coef1$|posterior_mean_coef2$|scale_factor$)|(^|\.)position_ids$"
)


def unsupported_note(keys) -> tuple[str, str] | None:
    """(family name, why it does not load) for a single file of a family ldmkit cannot read (yet)."""
    f = unsupported_family(keys)
    if f is None:
        return None
    return f.name, f"a {f.title} checkpoint; ldmkit does not support {f.title} yet"


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def groups_for(widths) -> int:
    """GroupNorm groups, which no weight shape reveals: SD's 32, or the most that divide every width
    (a rule; files with ldmkit's header or a diffusers config say it)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))


def unet_config_from_weights(state: dict[str, torch.Tensor], where: str = "checkpoint") -> UNetConfig:
    """UNet architecture from `model.diffusion_model.*` (prefix stripped): every level's width,
    residual blocks and transformer depth, whether it attends, and the middle block, read off the
    tensors. Heads are not in the weights: the caller fills them from family rules."""
    keys = set(state)
    try:
        conv_in = state["input_blocks.0.0.weight"]
        ops = sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
        # Each level ends at its downsampler; the last level at the end of the run of consecutive
        # input blocks after it, so that a stray extra key shows up as an unexpected weight, not as a
        # different architecture.
        present = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        starts = [1] + [e + 1 for e in ops]
        last = starts[-1]
        while last in present:
            last += 1
        ends = [*ops, last]
        res_blocks = [end - start for start, end in zip(starts, ends)]
        widths, attn, depth, cross_only = [], [], [], []
        for level, first in enumerate(starts):
            widths.append(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
            has = f"input_blocks.{first}.1.norm.weight" in keys
            # A first attention whose keys come from the context, not the pixels: only cross-attention.
            # (Undecidable where the context is as wide as the level; read as self-attention then.)
            k1 = state.get(f"input_blocks.{first}.1.transformer_blocks.0.attn1.to_k.weight")
            cross_only.append(k1 is not None and k1.shape[1] != k1.shape[0])
            if has:
                attn.append(2**level)
            depth.append(_count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.") if has else 1)
        if "middle_block.1.norm.weight" in keys:
            middle = "attention"
            mid_depth = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
            if attn and attn[-1] == 2 ** (len(widths) - 1) and depth[-1] != mid_depth:
                raise CheckpointError(
                    f"{where}: the middle block has {mid_depth} transformer layers and the deepest level "
                    f"{depth[-1]}; ldmkit (as diffusers) gives both the same depth"
                )
            depth[-1] = mid_depth
        else:
            middle = "resnet" if "middle_block.0.in_layers.0.weight" in keys else "none"
        # A UNet without any attention (pruned models can be) has no context width in its weights:
        # the caller takes the text encoder's.
        ctx_key = next((k for k in sorted(keys) if k.endswith("attn2.to_k.weight")), None)
        proj_in = next((k for k in sorted(keys) if k.endswith(".proj_in.weight")), None)
        num_classes, adm = None, None
        if "label_emb.weight" in keys:
            num_classes = state["label_emb.weight"].shape[0]
        elif "label_emb.0.0.weight" in keys:
            num_classes, adm = "sequential", state["label_emb.0.0.weight"].shape[1]
        return UNetConfig(
            in_channels=conv_in.shape[1],
            out_channels=state["out.2.weight"].shape[0],
            channels=tuple(widths),
            num_res_blocks=res_blocks[0] if len(set(res_blocks)) == 1 else tuple(res_blocks),
            attention_resolutions=tuple(attn),
            transformer_depth=depth[0] if len(set(depth)) == 1 else tuple(depth),
            context_dim=state[ctx_key].shape[1] if ctx_key else UNetConfig.context_dim,
            use_linear_in_transformer=proj_in is not None and state[proj_in].ndim == 2,
            middle_block=middle,
            num_classes=num_classes,
            adm_in_channels=adm,
            time_cond_proj_dim=state["time_cond_proj.weight"].shape[1] if "time_cond_proj.weight" in keys else None,
            conv_in_kernel=conv_in.shape[-1],
            conv_out_kernel=state["out.2.weight"].shape[-1],
            norm_groups=groups_for(widths),
            disable_self_attention=cross_only[0] if len(set(cross_only)) == 1 else tuple(cross_only),
            time_embed_post_act=None,  # an activation has no weights: a rule (SD has none)
        )
    except (KeyError, StopIteration, IndexError, ZeroDivisionError) as e:
        what = repr(e.args[0]) if isinstance(e, KeyError) else "its cross-attention and projection weights"
        raise CheckpointError(f"{where}: UNet weights do not have the layout of an LDM UNet (missing {what})") from None


def vae_config_from_weights(state: dict[str, torch.Tensor], where: str = "checkpoint") -> AutoencoderConfig:
    """Autoencoder architecture from `first_stage_model.*` (prefix stripped). The latent scale is not
    in the weights: the caller fills it."""
    keys = set(state)
    try:
        levels = _count(keys, r"encoder\.down\.(\d+)\.")
        widths = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
        return AutoencoderConfig(
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            channels=widths,
            norm_groups=groups_for(widths),
            num_res_blocks=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
            z_channels=state["decoder.conv_in.weight"].shape[1],
            embed_dim=state["quant_conv.weight"].shape[0] // 2
            if "quant_conv.weight" in keys
            else state["decoder.conv_in.weight"].shape[1],
            use_quant_conv="quant_conv.weight" in keys,
            mid_attention="encoder.mid.attn_1.q.weight" in keys,
        )
    except (KeyError, IndexError) as e:
        raise CheckpointError(
            f"{where}: autoencoder weights do not have the layout of an LDM autoencoder (missing {e})"
        ) from None


def clip_config_from_weights(state: dict[str, torch.Tensor], kind: str, where: str = "checkpoint") -> TextEncoderConfig:
    """CLIP text tower (transformers layout, `text_model.*`) architecture. Heads: 64 channels each,
    as in every CLIP text tower (a rule, listed as guessed)."""
    keys = set(state)
    try:
        tok = state["text_model.embeddings.token_embedding.weight"]
        hidden = tok.shape[1]
        return TextEncoderConfig(
            kind=kind,
            vocab_size=tok.shape[0],
            hidden_size=hidden,
            intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_layers=_count(keys, r"text_model\.encoder\.layers\.(\d+)\."),
            num_heads=hidden // 64,
            max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
            hidden_act="quick_gelu" if kind == "clip" else "gelu",
            pad_token="<|endoftext|>" if kind == "clip" else "!",
            skip_last_layers=0 if kind == "clip" else 1,
        )
    except KeyError as e:
        raise CheckpointError(
            f"{where}: text encoder weights do not have the layout of a CLIP text tower (missing {e})"
        ) from None


def config_from_metadata(metadata: dict, where: str) -> ModelConfig | None:
    """Our own files carry their config as JSON in the safetensors header."""
    if METADATA_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: the ldmkit config in the file header is not valid JSON ({e})") from None
    return ModelConfig.from_dict(data, f"{where} header")


def detect(
    state: dict[str, torch.Tensor], metadata: dict, where: str = "checkpoint", overrides: dict | None = None
) -> ModelConfig:
    """The ModelConfig of a single-file checkpoint (original layout keys)."""
    from ldmkit.checkpoints import sd3_files  # imported here: it imports this module

    if sd3_files.file_family(state, metadata) is not None:
        sd3_files.refuse_overrides(overrides, where)
        return sd3_files.sd3_config(state, metadata, where)
    overrides = dict(overrides or {})
    state = keymaps.clip_with_text_model_level(state)
    keys = set(state)
    config = config_from_metadata(metadata, where)
    if config is None:
        unsupported = unsupported_note(keys)
        if unsupported:
            raise UnsupportedModelError(f"{where}: {unsupported[1]}")
        if not any(k.startswith(UNET) for k in keys):
            if any(k.startswith(("control_model.", "controlnet_cond_embedding.", "input_hint_block.")) for k in keys):
                raise CheckpointError(f"{where}: a ControlNet, not a model; pass it with --controlnet")
            if any(k.startswith(VAE_FILE_PREFIXES) for k in keys):
                raise CheckpointError(f"{where}: an autoencoder (VAE) file, not a full model; pass it with --vae")
            if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
                raise CheckpointError(f"{where}: diffusers-layout weights; pass the diffusers folder that holds them")
            raise CheckpointError(f"{where}: unknown model layout (no model.diffusion_model.* UNet weights)")
        if sgm.is_sgm(keys):
            config = _config_from_sgm_weights(state, where)
        else:
            config = _config_from_sd_weights(state, metadata, where)
    _apply_overrides(config, overrides, where)
    return config


def _config_from_sd_weights(state, metadata, where) -> ModelConfig:
    unet = unet_config_from_weights(strip_prefix(state, UNET), where)
    vae = vae_config_from_weights(strip_prefix(state, VAE), where)
    guessed = {}
    if any(k.startswith(CLIP) for k in state):
        text = clip_config_from_weights(strip_prefix(state, "cond_stage_model.transformer."), "clip", where)
    elif any(k.startswith(OPENCLIP) for k in state):
        text = clip_config_from_weights(keymaps.openclip_to_hf(strip_prefix(state, OPENCLIP)), "openclip", where)
    else:
        raise CheckpointError(
            f"{where}: unknown text encoder layout (neither cond_stage_model.transformer.* "
            "CLIP nor cond_stage_model.model.* OpenCLIP)"
        )
    guessed["text.num_heads"] = text.num_heads
    guessed["text.hidden_act"] = text.hidden_act
    if not any(k.endswith("attn2.to_k.weight") for k in state if k.startswith(UNET)):
        unet = replace(unet, context_dim=text.hidden_size)  # no cross-attention: nothing to match
    if unet.context_dim != text.hidden_size:
        raise CheckpointError(
            f"{where}: UNet cross-attention expects context {unet.context_dim} but the text "
            f"encoder gives {text.hidden_size}"
        )
    prediction = None
    if text.kind == "openclip" and unet.in_channels != 9:
        # SD 2.0-base (global step 875000, as diffusers checks) and 2.1-base are eps; 768-v models are v.
        prediction = "epsilon" if metadata.get("global_step") == "875000" else "v_prediction"
        guessed["schedule.prediction_type"] = prediction
    family = sd_family(text.kind, unet.in_channels, prediction)
    unet = replace(unet, **family.unet_heads)
    vae = replace(vae, scale_factor=family.vae_scale_factor)
    guessed["vae.scale_factor"] = family.vae_scale_factor
    guessed.update({f"unet.{k}": v for k, v in family.unet_heads.items() if v != -1})
    if family.text_kind == "openclip":
        guessed["image_size"] = family.image_size
    return ModelConfig(
        family=family.name,
        unet=unet,
        vae=vae,
        text=text,
        image_size=family.image_size,
        schedule=ScheduleConfig(prediction_type=family.prediction or prediction or "epsilon"),
        guessed=guessed,
    )


def sgm_text_configs(state: dict[str, torch.Tensor], where: str) -> list[TextEncoderConfig]:
    """SDXL's text towers (`conditioner.embedders.N`) from their shapes. As the original reads them:
    at the penultimate layer without the final norm, the last (bigG) also pooled through its projection."""
    kinds = sgm.tower_kinds(state, where)
    out = []
    for i, kind in enumerate(kinds):
        hf = sgm.tower_shapes(state, i, kind)
        c = clip_config_from_weights(hf, kind, f"{where}: conditioner.embedders.{i}")
        last = i == len(kinds) - 1
        out.append(
            replace(
                c,
                skip_last_layers=1,
                final_norm=False,
                pooled=last,
                projection_dim=sgm.projection_dim(hf, where, i) if last else None,
                max_length=min(77, c.max_position_embeddings),
            )
        )
    return out


def _config_from_sgm_weights(state, where) -> ModelConfig:
    """SDXL base, inpainting or refiner in the original layout: the towers tell the family; the UNet's
    context is their widths together, its addition embedding the pooled vector and the family's
    micro-conditioning numbers (so each number's embedding width comes from the weights too)."""
    towers = sgm_text_configs(state, where)
    unet = unet_config_from_weights(strip_prefix(state, UNET), where)
    vae = vae_config_from_weights(strip_prefix(state, VAE), where)
    widths = [t.hidden_size for t in towers]
    if unet.context_dim != sum(widths):
        raise CheckpointError(
            f"{where}: UNet cross-attention expects context {unet.context_dim} but the text towers give "
            f"{' + '.join(map(str, widths))}"
        )
    if len(towers) > 2:
        raise CheckpointError(f"{where}: {len(towers)} text towers; SDXL has 2 (base) or 1 (refiner)")
    text, text_2 = towers[0], (towers[1] if len(towers) == 2 else None)
    family = sd_family(text.kind, unet.in_channels, None, text_2, pooled=True)
    unet = replace(unet, addition_time_embed_dim=_micro_width(unet, towers[-1].projection_dim, family, where))
    unet = replace(unet, **family.unet_heads)
    guessed = {f"unet.{k}": v for k, v in family.unet_heads.items() if v != -1}
    for name, t in zip(("text", "text_2"), towers):
        guessed.update({f"{name}.num_heads": t.num_heads, f"{name}.hidden_act": t.hidden_act})
    guessed.update(
        {
            "vae.scale_factor": family.vae_scale_factor,
            "image_size": family.image_size,
            "zero_empty_negative": family.zero_empty_negative,
        }
    )
    return ModelConfig(
        family=family.name,
        unet=unet,
        vae=replace(vae, scale_factor=family.vae_scale_factor),
        text=text,
        text_2=text_2,
        image_size=family.image_size,
        schedule=ScheduleConfig(prediction_type=family.prediction),
        guessed=guessed,
        zero_empty_negative=family.zero_empty_negative,
    )


def _micro_width(unet: UNetConfig, pooled: int, family: Family, where: str) -> int:
    """Each micro-conditioning number's embedding width (SDXL: 256): the UNet's addition embedding
    takes the pooled vector and the family's count of numbers."""
    if unet.adm_in_channels is None:
        raise CheckpointError(
            f"{where}: an SDXL-layout file whose UNet has no addition embedding (label_emb.0.0) for the pooled vector"
        )
    width, rest = divmod(unet.adm_in_channels - pooled, family.micro_conditions)
    if rest or width < 1:
        raise CheckpointError(
            f"{where}: the UNet's addition embedding takes {unet.adm_in_channels} values, which a pooled vector of "
            f"{pooled} and {family.micro_conditions} micro-conditioning numbers ({family.title}) cannot make"
        )
    return width


OVERRIDABLE = {"prediction_type", "num_heads", "num_head_channels", "clip_skip", "scale_factor"}


def _apply_overrides(config: ModelConfig, overrides: dict, where: str) -> None:
    unknown = set(overrides) - OVERRIDABLE
    if unknown:
        raise CheckpointError(f"unknown override(s) {sorted(unknown)}; allowed: {sorted(OVERRIDABLE)}")
    if overrides.get("prediction_type") is not None:
        config.schedule = replace(config.schedule, prediction_type=overrides["prediction_type"])
        config.guessed.pop("schedule.prediction_type", None)
        family = FAMILIES.get(config.family)
        if family is not None and family.prediction is not None and family.text_kind in ("clip", "openclip"):
            config.family = sd_family(
                family.text_kind, config.unet.in_channels, overrides["prediction_type"], config.text_2, family.pooled
            ).name
    if overrides.get("num_heads") is not None:
        config.unet.num_heads, config.unet.num_head_channels = int(overrides["num_heads"]), -1
        config.guessed.pop("unet.num_heads", None)
        config.guessed.pop("unet.num_head_channels", None)
    if overrides.get("num_head_channels") is not None:
        config.unet.num_head_channels = int(overrides["num_head_channels"])
        config.guessed.pop("unet.num_heads", None)
        config.guessed.pop("unet.num_head_channels", None)
    if overrides.get("clip_skip") is not None:
        config.text = replace(config.text, clip_skip=int(overrides["clip_skip"]))
        if config.text_2 is not None:  # SDXL: both towers read one layer earlier per step, as the web UI does
            config.text_2 = replace(config.text_2, clip_skip=int(overrides["clip_skip"]))
    if overrides.get("scale_factor") is not None:
        config.vae.scale_factor = float(overrides["scale_factor"])
        config.guessed.pop("vae.scale_factor", None)


def minilm_text_config(max_length: int = 77) -> TextEncoderConfig:
    """The default small text tower: MiniLM-L6 (BERT family, 384 wide) from its pip package."""
    return TextEncoderConfig(
        kind="bert",
        vocab_size=30522,
        hidden_size=384,
        intermediate_size=1536,
        num_layers=6,
        num_heads=12,
        max_position_embeddings=512,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        max_length=max_length,
        pad_token="[PAD]",
        package=MINILM_PACKAGE,
    )
