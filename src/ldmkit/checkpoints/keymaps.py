"""Key maps between our (= the original single-file) layout and other layouts.

Maps are built per config as lists of (our prefix, their prefix) pairs for modules; a key is
renamed by its longest matching prefix. Tensors that change shape between layouts (the VAE's
1x1 convolutions stored as linear layers by diffusers, OpenCLIP's fused q/k/v) are handled here too,
so every layout difference lives in this file."""

import re

import torch

from ldmkit.models.autoencoder import AutoencoderConfig
from ldmkit.models.unet import UNetConfig

PrefixMap = list[tuple[str, str]]

_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
]


def _sub(prefix_ours: str, prefix_theirs: str, inner: list[tuple[str, str]]) -> PrefixMap:
    return [(f"{prefix_ours}.{a}", f"{prefix_theirs}.{b}") for a, b in inner]


def unet_to_diffusers(c: UNetConfig) -> PrefixMap:
    """Module-prefix pairs (ours, diffusers UNet2DConditionModel)."""
    m: PrefixMap = [
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("time_cond_proj", "time_embedding.cond_proj"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    if isinstance(c.num_classes, int):
        m.append(("label_emb", "class_embedding"))
    elif c.num_classes == "sequential":
        to = "add_embedding" if c.addition_time_embed_dim else "class_embedding"  # SDXL's "text_time"
        m += [("label_emb.0.0", f"{to}.linear_1"), ("label_emb.0.2", f"{to}.linear_2")]
    levels = c.levels
    for level in range(levels):
        n = c.res_blocks_at(level)
        for j in range(n):
            i = c.input_block_index(level, j)
            m += _sub(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if c.has_attention(level):
                m.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}"))
        if level != levels - 1:
            m.append((f"input_blocks.{c.input_block_index(level, n)}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
    if c.middle_block != "none":
        m += _sub("middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    if c.middle_block == "attention":
        m.append(("middle_block.1", "mid_block.attentions.0"))
        m += _sub("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    for up, level in enumerate(reversed(range(levels))):
        n = c.res_blocks_at(level)
        for j in range(n + 1):
            i = c.output_block_index(level, j)
            m += _sub(f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}", _UNET_RESNET)
            if c.has_attention(level):
                m.append((f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}"))
        if level:
            idx = 2 if c.has_attention(level) else 1
            m.append(
                (f"output_blocks.{c.output_block_index(level, n)}.{idx}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            )
    return m


def controlnet_to_diffusers(c) -> PrefixMap:
    """Module-prefix pairs (ours = the original layout, diffusers ControlNetModel) for a ControlNetConfig."""
    m = [(a, b) for a, b in unet_to_diffusers(c.unet) if not a.startswith(("output_blocks.", "out."))]
    stages = len(c.hint_block_channels) - 1
    m.append(("input_hint_block.0", "controlnet_cond_embedding.conv_in"))
    m += [(f"input_hint_block.{2 + 2 * k}", f"controlnet_cond_embedding.blocks.{k}") for k in range(2 * stages)]
    m.append((f"input_hint_block.{2 + 4 * stages}", "controlnet_cond_embedding.conv_out"))
    skips = c.unet.input_block_index(c.unet.levels - 1, c.unet.res_blocks_at(c.unet.levels - 1))
    m += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(skips)]
    m.append(("middle_block_out.0", "controlnet_mid_block"))
    return m


def _vae_resnet(ours: str, theirs: str) -> PrefixMap:
    """A VAE residual block keeps its inner names but for the 1x1 shortcut."""
    return [(ours, theirs), (f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut")]


def vae_to_diffusers(c: AutoencoderConfig) -> PrefixMap:
    """Module-prefix pairs (ours, diffusers AutoencoderKL). The decoder's `up` is indexed by
    resolution level (0 = full size), diffusers' `up_blocks` by execution order: reversed."""
    attn = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
    m: PrefixMap = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    levels = len(c.channels)
    for part in ("encoder", "decoder"):
        m += [
            (f"{part}.conv_in", f"{part}.conv_in"),
            (f"{part}.conv_out", f"{part}.conv_out"),
            (f"{part}.norm_out", f"{part}.conv_norm_out"),
        ]
        m += _vae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        m += _vae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        m += _sub(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", attn)
    for level in range(levels):
        for j in range(c.num_res_blocks):
            m += _vae_resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}")
        if level != levels - 1:
            m.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
        up = levels - 1 - level
        for j in range(c.num_res_blocks + 1):
            m += _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}")
        if level:
            m.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return m


def rename(state: dict[str, torch.Tensor], pairs: PrefixMap, reverse: bool = False) -> dict[str, torch.Tensor]:
    """Rename keys by their longest matching module prefix (or the whole key, for a parameter that moves
    into a submodule); keys no pair matches are kept as they are (strict loading then reports them)."""
    if reverse:
        pairs = [(b, a) for a, b in pairs]
    table = dict(pairs)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in table:
                key = ".".join([table[prefix], *parts[cut:]])
                break
        out[key] = value
    return out


# --- video: SVD's UNet and temporal autoencoder <-> diffusers ---------------------------------------

_RESNET_IN_DIFFUSERS = re.compile(r"^(.*\.resnets\.\d+)\.(\w+)$")
_ATTENTION_IN_DIFFUSERS = re.compile(r"^.*\.attentions\.\d+$")


def video_unet_to_diffusers(c: UNetConfig) -> PrefixMap:
    """Module-prefix pairs (ours = the original video model, diffusers UNetSpatioTemporalConditionModel):
    the image UNet's, each residual block split into its spatial and temporal halves, each transformer
    given its temporal blocks and frame-position MLP."""
    m: PrefixMap = []
    blocks = set()
    for ours, theirs in unet_to_diffusers(c):
        resnet = _RESNET_IN_DIFFUSERS.match(theirs)
        if resnet and ours.startswith(("input_blocks", "middle_block", "output_blocks")):
            block, inner = resnet.groups()
            ours_inner = next(a for a, b in _UNET_RESNET if b == inner)
            ours_block = ours[: -len(ours_inner) - 1]
            m.append((ours, f"{block}.spatial_res_block.{inner}"))
            if inner != "conv_shortcut":  # the temporal block keeps its width
                m.append((f"{ours_block}.time_stack.{ours_inner}", f"{block}.temporal_res_block.{inner}"))
            blocks.add((ours_block, block))
        elif _ATTENTION_IN_DIFFUSERS.match(theirs):
            m += [
                (ours, theirs),
                (f"{ours}.time_stack", f"{theirs}.temporal_transformer_blocks"),
                (f"{ours}.time_pos_embed.0", f"{theirs}.time_pos_embed.linear_1"),
                (f"{ours}.time_pos_embed.2", f"{theirs}.time_pos_embed.linear_2"),
            ]
        else:
            m.append((ours, theirs))
    m += [(f"{ours}.time_mixer", f"{theirs}.time_mixer") for ours, theirs in sorted(blocks)]
    return m


def temporal_vae_to_diffusers(c: AutoencoderConfig) -> PrefixMap:
    """Module-prefix pairs (ours = the original video autoencoder, diffusers AutoencoderKLTemporalDecoder):
    the image autoencoder's encoder; the decoder's residual blocks split into spatial and temporal halves
    (the mixing factor, a bare parameter in the original, in diffusers' `time_mixer`); the output
    convolution's temporal part is diffusers' `time_conv_out`."""
    m: PrefixMap = []
    for ours, theirs in vae_to_diffusers(c):
        if not ours.startswith("decoder.") or ours.startswith("decoder.mid.attn_1") or ".upsample." in ours:
            m.append((ours, theirs))
        elif ours.endswith(".nin_shortcut"):
            m.append((ours, theirs.replace(".conv_shortcut", ".spatial_res_block.conv_shortcut")))
        elif ".block" in ours:
            m.append((ours, f"{theirs}.spatial_res_block"))
            m += _sub(f"{ours}.time_stack", f"{theirs}.temporal_res_block", _UNET_RESNET)
            m.append((f"{ours}.mix_factor", f"{theirs}.time_mixer.mix_factor"))
        else:
            m.append((ours, theirs))
    m.append(("decoder.conv_out.time_mix_conv", "decoder.time_conv_out"))
    return [(a, b) for a, b in m if not a.startswith("post_quant_conv")]


_VAE_ATTN_PROJ = re.compile(r"mid(_block)?\.(attn_1|attentions\.0)\.(q|k|v|proj_out|to_q|to_k|to_v|to_out\.0)\.weight$")


def vae_from_diffusers(state: dict[str, torch.Tensor], c: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state -> ours. Diffusers stores the mid-block attention projections
    as linear layers [C, C]; ours are 1x1 convolutions [C, C, 1, 1]. Older diffusers files name them
    query/key/value/proj_attn."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    fixed = {}
    for k, v in state.items():
        for old, new in legacy.items():
            if "attentions.0" in k and old in k:
                k = k.replace(old, new)
        fixed[k] = v
    out = rename(fixed, vae_to_diffusers(c), reverse=True)
    return {k: (v[:, :, None, None] if _VAE_ATTN_PROJ.search(k) and v.ndim == 2 else v) for k, v in out.items()}


def vae_to_diffusers_state(state: dict[str, torch.Tensor], c: AutoencoderConfig) -> dict[str, torch.Tensor]:
    out = rename(state, vae_to_diffusers(c))
    return {k: (v[:, :, 0, 0] if _VAE_ATTN_PROJ.search(k) and v.ndim == 4 else v) for k, v in out.items()}


def vae_linear_attention_to_conv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some single files (saved from diffusers by other tools) keep the VAE attention as [C, C]."""
    return {k: (v[:, :, None, None] if _VAE_ATTN_PROJ.search(k) and v.ndim == 2 else v) for k, v in state.items()}


# --- OpenCLIP (SD 2.x) <-> transformers CLIPTextModel -------------------------------------------

_OPENCLIP_LAYER = [
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
]


def openclip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (`token_embedding`, `transformer.resblocks.N`, fused `attn.in_proj_*`)
    -> transformers CLIPTextModel keys (`text_model.*`). Keys with no HF counterpart
    (`text_projection`, `logit_scale`) pass through unchanged."""
    out = {}
    for k, v in state.items():
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final.") :]] = v
        elif k.startswith("transformer.resblocks."):
            n, rest = k[len("transformer.resblocks.") :].split(".", 1)
            base = f"text_model.encoder.layers.{n}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_") :]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.clone()
                continue
            for a, b in _OPENCLIP_LAYER:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            out[base + rest] = v
        else:
            out[k] = v
    return out


def hf_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `openclip_to_hf` (q/k/v fused back into `in_proj`)."""
    out, qkv = {}, {}
    for k, v in state.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k[len("text_model.final_layer_norm.") :]] = v
        elif k.startswith("text_model.encoder.layers."):
            n, rest = k[len("text_model.encoder.layers.") :].split(".", 1)
            m = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if m:
                qkv.setdefault((n, m.group(2)), {})[m.group(1)] = v
                continue
            for a, b in _OPENCLIP_LAYER:
                if rest.startswith(b + "."):
                    rest = a + rest[len(b) :]
                    break
            out[f"transformer.resblocks.{n}.{rest}"] = v
        elif k == "text_model.embeddings.position_ids":
            continue
        else:
            out[k] = v
    for (n, kind), parts in qkv.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# --- CLIP (SD 1.x, SDXL's ViT-L) single files -----------------------------------------------------

_CLIP_BARE = re.compile(
    r"^(cond_stage_model|conditioner\.embedders\.\d+)\.transformer\.(embeddings|encoder|final_layer_norm)\."
)


def clip_with_text_model_level(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older SD 1.x files, and files written with transformers releases whose CLIPTextModel has no
    `text_model` level, name the CLIP tower `cond_stage_model.transformer.embeddings.*` (SDXL's
    `conditioner.embedders.0.transformer.embeddings.*`): put the level back, as the popular web UI
    does on load."""
    if not any(_CLIP_BARE.match(k) for k in state):
        return state
    return {(_CLIP_BARE.sub(r"\1.transformer.text_model.\2.", k)): v for k, v in state.items()}


# --- OpenCLIP vision towers (SVD's image embedder) <-> transformers CLIPVisionModelWithProjection ------------

_VISUAL = [
    ("conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("class_embedding", "vision_model.embeddings.class_embedding"),
    ("positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("ln_pre.weight", "vision_model.pre_layrnorm.weight"),
    ("ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    ("ln_post.weight", "vision_model.post_layernorm.weight"),
    ("ln_post.bias", "vision_model.post_layernorm.bias"),
]


def openclip_visual_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's `visual.*` (prefix stripped) -> transformers' vision tower keys; `proj` [width, embed] is
    the transposed `visual_projection.weight`. Keys neither knows pass through (strict loading reports them)."""
    blocks = {k: v for k, v in state.items() if k.startswith("transformer.resblocks.")}
    out = {k.replace("text_model.", "vision_model.", 1): v for k, v in openclip_to_hf(blocks).items()}
    table = dict(_VISUAL)
    for k, v in state.items():
        if k in blocks:
            continue
        out[table.get(k, k)] = v
    if "proj" in out:
        out["visual_projection.weight"] = out.pop("proj").t().contiguous()
    return out


def hf_to_openclip_visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = "vision_model.encoder.layers."
    blocks = {k.replace("vision_model.", "text_model.", 1): v for k, v in state.items() if k.startswith(layers)}
    out = hf_to_openclip(blocks)
    table = {b: a for a, b in _VISUAL}
    for k, v in state.items():
        if k.startswith(layers) or k == "vision_model.embeddings.position_ids":
            continue
        out[table.get(k, k)] = v
    if "visual_projection.weight" in out:
        out["proj"] = out.pop("visual_projection.weight").t().contiguous()
    return out
