"""The diffusers folder layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json),
read and written through the key maps in keymaps.py.

What diffusers has no place for travels in two extra files that diffusers ignores: `ldmkit.json`
(our ModelConfig: family, clip skip, what was guessed) and `ldmkit_extra.safetensors` (the stored
training schedule, and the parts of SD 2's OpenCLIP tower that diffusers drops: its unused last
block and `text_projection`)."""

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.detect import NOT_WEIGHTS
from ldmkit.checkpoints.families import sd_family
from ldmkit.checkpoints.files import read_tensors, write_json, write_safetensors
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.models.ldm import LatentDiffusion, ModelConfig, ScheduleConfig
from ldmkit.models.text import TextEncoderConfig, text_config_from_hf
from ldmkit.models.tokenizers import ClipTokenizer
from ldmkit.models.unet import TIME_ACTIVATIONS, UNetConfig

DIFFUSERS_VERSION = "0.42.1"
EXTRA = "ldmkit_extra.safetensors"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weights(folder: Path, names: tuple[str, ...], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A component's weights: safetensors first, then the fp16 variant, then `.bin` (safe loader).
    dtype: a safetensors file's floating tensors converted to it as they are read."""
    for name in names:
        stem, ext = name.rsplit(".", 1)
        for candidate in (name, f"{stem}.fp16.{ext}"):
            if (folder / candidate).exists():
                state, _ = read_tensors(folder / candidate, None if dtype is None else (lambda k: dtype))
                return state
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(names)})")


# --- UNet ---------------------------------------------------------------------------------------


# Fields of diffusers' UNet2DConditionModel config that change nothing ldmkit computes, or that it
# can only take at the value the SD 1.x / 2.x families use: (field, allowed values). Any other
# value is refused in one line naming the field; fields read into UNetConfig are below.
UNET_FIXED = {
    "act_fn": ["silu"],
    "flip_sin_to_cos": [True],
    "freq_shift": [0],
    "center_input_sample": [False],
    "downsample_padding": [1],
    "mid_block_scale_factor": [1, 1.0],
    "resnet_time_scale_shift": ["default"],
    "resnet_skip_time_act": [False],
    "resnet_out_scale_factor": [1, 1.0],
    "time_embedding_type": ["positional"],
    "time_embedding_dim": [None],
    "time_embedding_act_fn": [None],
    "addition_embed_type": [None],
    "encoder_hid_dim": [None],
    "encoder_hid_dim_type": [None],
    "dual_cross_attention": [False],
    # Only UNetMidBlock2DSimpleCrossAttn reads it, a middle block SD families do not use.
    "mid_block_only_cross_attention": [None, False, True],
    "class_embed_type": [None, "projection"],
    "class_embeddings_concat": [False],
    "attention_type": ["default"],
    "cross_attention_norm": [None],
    "reverse_transformer_layers_per_block": [None],
    "num_attention_heads": [None],  # diffusers itself refuses it (attention_head_dim is the count)
    "dropout": [0, 0.0],
}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": "attention", "UNetMidBlock2D": "resnet", None: "none"}


def _refuse_unknown_values(cfg: dict, fixed: dict, where: str) -> None:
    for key, allowed in fixed.items():
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{where}: {key}={value!r} is not supported; allowed: {allowed}")


def _per_level(cfg: dict, key: str, default, levels: int, where: str) -> int | tuple[int, ...]:
    """An int or a per-level list in a diffusers config; one int when every level agrees."""
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise CheckpointError(f"{where}: {key}={value!r}: expected an int or one int per level ({levels})")
        return value[0] if len(set(value)) == 1 else tuple(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: {key}={value!r}: expected an int or one int per level ({levels})")
    return value


def unet_config_from_diffusers(cfg: dict, where: str) -> UNetConfig:
    _refuse_unknown_values(cfg, UNET_FIXED, where)
    channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False, "CrossAttnUpBlock2D": True, "UpBlock2D": False}
    for t in down + up:
        if t not in kinds:
            raise CheckpointError(f"{where}: block type {t!r} is not supported; allowed: {sorted(kinds)}")
    if len(down) != levels or len(up) != levels:
        raise CheckpointError(f"{where}: {levels} block_out_channels but {len(down)} down and {len(up)} up blocks")
    attention = [kinds[t] for t in down]
    if [kinds[t] for t in reversed(up)] != attention:
        raise CheckpointError(f"{where}: up_block_types do not mirror down_block_types")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in MID_BLOCKS:
        raise CheckpointError(f"{where}: mid_block_type={mid!r} is not supported; allowed: {list(MID_BLOCKS)}")
    context = cfg.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise CheckpointError(f"{where}: cross_attention_dim={context!r} per level is not supported")
        context = context[0]
    heads = _per_level(cfg, "attention_head_dim", 8, levels, where)  # diffusers: a head count
    num_heads, head_channels = heads, -1
    if (
        isinstance(heads, tuple)
        and len({c // h for c, h in zip(channels, heads)}) == 1
        and all(c % h == 0 for c, h in zip(channels, heads))
    ):
        num_heads, head_channels = UNetConfig.num_heads, channels[0] // heads[0]  # SD 2: 64 per head
    num_classes, adm = cfg.get("num_class_embeds"), None
    if cfg.get("class_embed_type") == "projection":
        num_classes, adm = "sequential", cfg["projection_class_embeddings_input_dim"]
    only_cross = cfg.get("only_cross_attention", False)
    if isinstance(only_cross, (list, tuple)):
        if len(only_cross) != levels or not all(isinstance(v, bool) for v in only_cross):
            raise CheckpointError(f"{where}: only_cross_attention={only_cross!r}: expected a bool or one per level")
        only_cross = only_cross[0] if len(set(only_cross)) == 1 else tuple(only_cross)
    elif not isinstance(only_cross, bool):
        raise CheckpointError(f"{where}: only_cross_attention={only_cross!r}: expected a bool or one per level")
    post_act = cfg.get("timestep_post_act")
    if post_act is not None and post_act not in TIME_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: timestep_post_act={post_act!r} is not supported; allowed: {[None, *TIME_ACTIVATIONS]}"
        )
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise CheckpointError(f"{where}: norm_num_groups=None (no output norm) is not supported")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        channels=channels,
        num_res_blocks=_per_level(cfg, "layers_per_block", 2, levels, where),
        attention_resolutions=tuple(2**i for i, a in enumerate(attention) if a),
        num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=_per_level(cfg, "transformer_layers_per_block", 1, levels, where),
        context_dim=context,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection")),
        middle_block=MID_BLOCKS[mid],
        num_classes=num_classes,
        adm_in_channels=adm,
        time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        norm_groups=groups,
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        conv_in_kernel=cfg.get("conv_in_kernel", 3),
        conv_out_kernel=cfg.get("conv_out_kernel", 3),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        disable_self_attention=only_cross,
        time_embed_post_act=post_act,
    )


def unet_config_to_diffusers(c: UNetConfig, sample_size: int) -> dict:
    levels = c.levels
    attn = [c.has_attention(i) for i in range(levels)]
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.channels),
        "layers_per_block": c.num_res_blocks if isinstance(c.num_res_blocks, int) else list(c.num_res_blocks),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": {v: k for k, v in MID_BLOCKS.items()}[c.middle_block],
        "attention_head_dim": [c.heads_at(i, ch)[0] for i, ch in enumerate(c.channels)],
        "cross_attention_dim": c.context_dim,
        "use_linear_projection": c.use_linear_in_transformer,
        "transformer_layers_per_block": [c.depth_at(i) for i in range(levels)],
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "conv_in_kernel": c.conv_in_kernel,
        "conv_out_kernel": c.conv_out_kernel,
        "upcast_attention": c.upcast_attention,
        "only_cross_attention": [c.self_attention_disabled_at(i) for i in range(levels)],
        "timestep_post_act": c.time_embed_post_act,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "time_cond_proj_dim": c.time_cond_proj_dim,
    }
    if isinstance(c.num_classes, int):
        cfg["num_class_embeds"] = c.num_classes
    elif c.num_classes == "sequential":
        cfg["class_embed_type"] = "projection"
        cfg["projection_class_embeddings_input_dim"] = c.adm_in_channels
    return cfg


# --- VAE ----------------------------------------------------------------------------------------


# As UNET_FIXED, for AutoencoderKL. force_upcast only tells fp16 pipelines to decode in fp32; ldmkit
# decodes in fp32 or bf16, never fp16, so either value means the same here.
VAE_FIXED = {
    "act_fn": ["silu"],
    "latents_mean": [None],
    "latents_std": [None],
    "force_upcast": [True, False],
}


def vae_config_from_diffusers(cfg: dict, where: str) -> AutoencoderConfig:
    channels = tuple(cfg.get("block_out_channels", (64,)))
    _refuse_unknown_values(cfg, VAE_FIXED, where)
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for t in cfg.get(key, []):
            if t != allowed:
                raise CheckpointError(f"{where}: VAE {key} {t!r} is not supported; allowed: {allowed}")
    if cfg.get("use_quant_conv", True) != cfg.get("use_post_quant_conv", True):
        raise CheckpointError(f"{where}: a VAE with only one of quant_conv/post_quant_conv is not supported")
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        channels=channels,
        num_res_blocks=cfg.get("layers_per_block", 1),
        z_channels=cfg.get("latent_channels", 4),
        embed_dim=cfg.get("latent_channels", 4),
        scale_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor") or 0.0,
        use_quant_conv=cfg.get("use_quant_conv", True),
        norm_groups=cfg.get("norm_num_groups", 32),
        mid_attention=cfg.get("mid_block_add_attention", True),
    )


def vae_config_from_diffusers_weights(state: dict[str, torch.Tensor], where: str) -> AutoencoderConfig:
    """A lone diffusers-layout VAE file has no config.json beside it: read the shapes."""
    try:
        levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
        nrb = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets."))
        z = state["decoder.conv_in.weight"].shape[1]
        return AutoencoderConfig(
            channels=tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)),
            num_res_blocks=nrb,
            z_channels=z,
            embed_dim=z,
            use_quant_conv="quant_conv.weight" in state,
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            mid_attention=any(k.startswith("encoder.mid_block.attentions.0.") for k in state),
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: diffusers-layout VAE weights are incomplete (missing {e})") from None


def vae_config_to_diffusers(c: AutoencoderConfig, sample_size: int) -> dict:
    if c.embed_dim != c.z_channels:
        raise CheckpointError(
            f"diffusers' AutoencoderKL needs embed_dim == z_channels (got {c.embed_dim}, {c.z_channels})"
        )
    n = len(c.channels)
    cfg = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": c.num_res_blocks,
        "latent_channels": c.z_channels,
        "norm_num_groups": c.norm_groups,
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": c.scale_factor,
        "use_quant_conv": c.use_quant_conv,
        "use_post_quant_conv": c.use_quant_conv,
        "mid_block_add_attention": c.mid_attention,
    }
    if c.shift_factor:
        cfg["shift_factor"] = c.shift_factor
    return cfg


def load_diffusers_vae(folder: Path, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """dtype: built empty in it and filled with the file's tensors, converted as they are read."""
    config = vae_config_from_diffusers(_read_json(folder / "config.json"), str(folder))
    if dtype is None:
        vae = AutoencoderKL(config)
    else:
        with torch.device("meta"):
            vae = AutoencoderKL(config).to(dtype)
    state = _weights(folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), dtype)
    strict_load(vae, keymaps.vae_from_diffusers(state, config), "autoencoder", str(folder))
    return vae.eval()


# --- text encoder and scheduler -----------------------------------------------------------------


def _clip_kind(hf: dict, pad: str) -> str:
    """SD 2's OpenCLIP tower is a CLIPTextModel in diffusers: what tells it from OpenAI's CLIP is what
    OpenCLIP does differently, both together: gelu (not quick_gelu) and padding with "!" (not the
    end-of-text token). The kind decides only the single-file layout it is written in."""
    return "openclip" if hf.get("hidden_act") == "gelu" and pad == "!" else "clip"


def _text_config(folder: Path, saved: TextEncoderConfig | None, extra: dict) -> TextEncoderConfig:
    hf = _read_json(folder / "text_encoder" / "config.json")
    if saved is not None:
        return saved
    if hf.get("model_type") == "bert":
        return text_config_from_hf(hf, "bert")
    tok = folder / "tokenizer" / "tokenizer_config.json"
    pad, length = "<|endoftext|>", 77
    if tok.exists():
        tok_cfg = _read_json(tok)
        p = tok_cfg.get("pad_token", pad)
        pad = p["content"] if isinstance(p, dict) else p
        length = int(min(tok_cfg.get("model_max_length", length), 1 << 30))
    c = text_config_from_hf(hf, _clip_kind(hf, pad))
    extra_layers = {k for k in extra if k.startswith("text_encoder.transformer.text_model.encoder.layers.")}
    carried = len({k.split(".")[5] for k in extra_layers})
    return replace(
        c,
        pad_token=pad,
        max_length=min(length, c.max_position_embeddings),
        num_layers=c.num_layers + carried,
        skip_last_layers=carried,
    )


def schedule_from_diffusers(cfg: dict) -> ScheduleConfig:
    return ScheduleConfig(
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        beta_start=cfg.get("beta_start", 0.00085),
        beta_end=cfg.get("beta_end", 0.012),
        beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        diffusers=cfg,
    )


def load_diffusers(path: str | Path, overrides: dict | None = None, dtype_rule=None) -> LatentDiffusion:
    """dtype_rule: the UNet's and autoencoder's dtype for the config (single_file.load_single_file)."""
    from ldmkit.checkpoints.detect import _apply_overrides

    folder = Path(path)
    where = str(folder)
    if not (folder / "unet" / "config.json").exists():
        raise CheckpointError(f"{where}: a diffusers folder without unet/config.json; only full pipelines load here")
    saved = None
    if (folder / "ldmkit.json").exists():
        try:
            saved = ModelConfig.from_dict(_read_json(folder / "ldmkit.json"), f"{folder / 'ldmkit.json'}")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    extra = {}
    if (folder / EXTRA).exists():
        extra, _ = read_tensors(folder / EXTRA)
    unet_json = _read_json(folder / "unet" / "config.json")
    unet = unet_config_from_diffusers(unet_json, f"{folder / 'unet'}")
    vae = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"), f"{folder / 'vae'}")
    text = _text_config(folder, saved.text if saved else None, extra)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    schedule = schedule_from_diffusers(_read_json(sched_file)) if sched_file.exists() else ScheduleConfig()
    guessed = {}
    if saved is not None:
        family, guessed = saved.family, dict(saved.guessed)
        guessed.pop("schedule.prediction_type", None)  # the scheduler config says it
    else:
        family = sd_family(text.kind, unet.in_channels, schedule.prediction_type).name
    image_size = saved.image_size if saved else unet_json.get("sample_size", 64) * vae.downsample_factor
    config = ModelConfig(
        family=family, unet=unet, vae=vae, text=text, schedule=schedule, guessed=guessed, image_size=image_size
    )
    _apply_overrides(config, dict(overrides or {}), where)
    dtype = dtype_rule(config) if dtype_rule else torch.float32
    model = LatentDiffusion(config, empty=True, dtype=dtype)
    convert = None if dtype == torch.float32 else dtype  # fp32 tensors stay mapped from the file
    strict_load(
        model.unet,
        keymaps.rename(
            _weights(folder / "unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), convert),
            keymaps.unet_to_diffusers(unet),
            reverse=True,
        ),
        "UNet",
        f"{folder / 'unet'}",
    )
    model.first_stage_model = load_diffusers_vae(folder / "vae", convert)
    te = _weights(folder / "text_encoder", ("model.safetensors", "pytorch_model.bin"))
    te = {k: v for k, v in te.items() if not NOT_WEIGHTS.search(k)}
    if text.kind == "bert":
        te = {k.removeprefix("bert."): v for k, v in te.items() if not k.startswith(("pooler.", "bert.pooler."))}
        state = {"transformer." + k: v for k, v in te.items()}
    else:
        # Files written by transformers 5 drop the `text_model.` prefix; older ones have it.
        state = {"transformer." + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.items()}
    state.update({k[len("text_encoder.") :]: v for k, v in extra.items() if k.startswith("text_encoder.")})
    if text.kind == "openclip" and "text_projection" not in state:
        # diffusers keeps neither of these (SD 2 never reads them); zeros stand in for them.
        state["text_projection"] = torch.zeros(text.hidden_size, text.hidden_size)
        state["logit_scale"] = torch.zeros(())
    strict_load(model.text_encoder, state, "text encoder", f"{folder / 'text_encoder'}")
    if (folder / "tokenizer").is_dir():
        if text.kind == "bert":
            model.text_encoder.tokenizer_folder = folder / "tokenizer"
        else:
            tokenizer = ClipTokenizer.from_folder(folder / "tokenizer", text.max_length)
            model.text_encoder.use_tokenizer(tokenizer, f"{folder / 'tokenizer'}")
    if "alphas_cumprod" in extra:
        model.alphas_cumprod = extra["alphas_cumprod"].float()
    return model.eval()


def save_diffusers(model: LatentDiffusion, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers pipeline folder. Written beside the destination, then renamed into place:
    an interrupted conversion never leaves a half-written model."""
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        _write_diffusers(model, tmp, dtype)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cast(state, dtype):
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}


def _write_diffusers(model: LatentDiffusion, out: Path, dtype) -> None:
    c = model.config
    latent = c.image_size // c.vae.downsample_factor
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (out / sub).mkdir()
    write_json(out / "unet" / "config.json", unet_config_to_diffusers(c.unet, latent))
    write_safetensors(
        out / "unet" / "diffusion_pytorch_model.safetensors",
        _cast(keymaps.rename(model.unet.state_dict(), keymaps.unet_to_diffusers(c.unet)), dtype),
        {"format": "pt"},
    )
    write_json(out / "vae" / "config.json", vae_config_to_diffusers(c.vae, c.image_size))
    write_safetensors(
        out / "vae" / "diffusion_pytorch_model.safetensors",
        _cast(keymaps.vae_to_diffusers_state(model.vae.state_dict(), c.vae), dtype),
        {"format": "pt"},
    )
    te = model.text_encoder
    extra: dict[str, torch.Tensor] = {}
    # CLIP weights are written with the `text_model.` prefix that every transformers release reads.
    hf_state = {k: v for k, v in te.transformer.state_dict().items() if not NOT_WEIGHTS.search(k)}
    hf_config = te.hf_model.config.to_dict()
    if c.text.kind == "openclip":
        # diffusers' SD 2 text encoder stops at the layer SD 2 reads; carry the rest along.
        keep = c.text.num_layers - c.text.skip_last_layers
        for k in list(hf_state):
            if k.startswith("text_model.encoder.layers.") and int(k.split(".")[3]) >= keep:
                extra["text_encoder.transformer." + k] = hf_state.pop(k)
        extra["text_encoder.text_projection"] = te.text_projection.detach()
        extra["text_encoder.logit_scale"] = te.logit_scale.detach()
        hf_config["num_hidden_layers"] = keep
    hf_config["architectures"] = ["BertModel" if c.text.kind == "bert" else "CLIPTextModel"]
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        hf_config.pop(k, None)
    write_json(out / "text_encoder" / "config.json", hf_config)
    write_safetensors(out / "text_encoder" / "model.safetensors", _cast(hf_state, dtype), {"format": "pt"})
    if c.text.kind == "bert":
        te.tokenizer.save(out / "tokenizer")
        tokenizer_class = "BertTokenizer"
    else:
        _write_clip_tokenizer(out / "tokenizer", te.tokenizer)
        tokenizer_class = "CLIPTokenizer"
    scheduler = c.schedule.diffusers or {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
    }
    scheduler = {
        **scheduler,
        "num_train_timesteps": c.schedule.num_train_timesteps,
        "beta_start": c.schedule.beta_start,
        "beta_end": c.schedule.beta_end,
        "beta_schedule": c.schedule.beta_schedule,
        "prediction_type": c.schedule.prediction_type,
    }
    write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    if model.alphas_cumprod is not None:
        extra["alphas_cumprod"] = model.alphas_cumprod
    if extra:
        write_safetensors(out / EXTRA, extra, {"format": "pt"})
    pipeline = "StableDiffusionInpaintPipeline" if c.unet.in_channels == 9 else "StableDiffusionPipeline"
    write_json(
        out / "model_index.json",
        {
            "_class_name": pipeline,
            "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", hf_config["architectures"][0]],
            "tokenizer": ["transformers", tokenizer_class],
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        },
    )
    write_json(out / "ldmkit.json", c.to_dict())


def _write_clip_tokenizer(folder: Path, tokenizer: ClipTokenizer) -> None:
    """tokenizer.json for current transformers, vocab.json + merges.txt for older readers."""
    tokenizer.save(folder)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    write_json(folder / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
