"""The original single-file layout (`.safetensors` / `.ckpt`): read it into our model, write ours as it.

Our own files are the same layout plus the model config as JSON in the safetensors header, so a
file written by ldmkit loads in tools that read SD files, and ldmkit needs no guessing to read it.
SDXL's text towers have their own names there (`conditioner.embedders.N`, sgm.py); SD3's files, whose
denoiser is a transformer and whose towers may come separately, are read and written by sd3_files.py."""

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps, sgm
from ldmkit.checkpoints.components import strict_load, strip_prefix
from ldmkit.checkpoints.detect import METADATA_KEY, NOT_WEIGHTS, OPENCLIP, UNET, VAE, detect, vae_config_from_weights
from ldmkit.checkpoints.files import DIFFUSERS, SAFETENSORS, read_tensors, sniff, write_safetensors
from ldmkit.errors import CheckpointError
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.models.ldm import LatentDiffusion, ModelConfig
from ldmkit.models.text import TextEncoder, package_folder
from ldmkit.models.tokenizers import ClipTokenizer

TEXT = "cond_stage_model."
CONDITIONER = "conditioner."
TOKENIZER_KEY = "ldmkit_tokenizer"  # SDXL's second tower's: ldmkit_tokenizer_2
SHARES_KEY = "ldmkit_shares"  # a bundled UNet-only file's header: the bundled file holding its other parts


def text_state_from_file(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The text encoder's weights in our module's names."""
    if kind == "openclip":
        hf = keymaps.openclip_to_hf(strip_prefix(state, OPENCLIP))
        return {("transformer." + k if k.startswith("text_model.") else k): v for k, v in hf.items()}
    return strip_prefix(state, TEXT)


def text_state_to_file(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    if kind == "openclip":
        hf = {k.removeprefix("transformer."): v for k, v in state.items()}
        return {OPENCLIP + k: v for k, v in keymaps.hf_to_openclip(hf).items()}
    return {TEXT + k: v for k, v in state.items()}


def package_text_state(package: str) -> dict[str, torch.Tensor]:
    """The weights of a text tower that ships in a pip package (the default MiniLM)."""
    from safetensors.torch import load_file

    folder = package_folder(package)
    return {
        k: v
        for k, v in load_file(str(folder / "model.safetensors")).items()
        if not NOT_WEIGHTS.search(k) and not k.startswith("pooler.")
    }


def load_package_text_encoder(
    encoder: TextEncoder, changed: dict[str, torch.Tensor] | None = None, where: str = ""
) -> None:
    """A package tower's weights, with `changed` (the tensors a model's training changed, which its file
    carries: keys as the encoder's own, `transformer.*`) in place of the package's."""
    state = package_text_state(encoder.config.package)
    if changed:
        stray = sorted(k for k in changed if not k.startswith("transformer.") or k[len("transformer.") :] not in state)
        if stray:
            raise CheckpointError(f"{where}: text encoder: unexpected weight(s) {', '.join(stray[:3])}")
        state.update({k.removeprefix("transformer."): v for k, v in changed.items()})
    strict_load(encoder.transformer, state, "text encoder", where or str(package_folder(encoder.config.package)))


def text_changed_from_package(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """The tower's tensors that differ from its package's (a model that trained its top layers): a file
    carries these alone, the package the rest."""
    package = package_text_state(encoder.config.package)
    changed = {}
    for k, v in encoder.transformer.state_dict().items():
        if k in package and not torch.equal(v, package[k].to(v.device, v.dtype)):
            changed["transformer." + k] = v
    return changed


def build(
    config: ModelConfig, state: dict[str, torch.Tensor], where: str, dtype: torch.dtype = torch.float32
) -> LatentDiffusion:
    """A LatentDiffusion with every component strictly loaded from original-layout `state`, its UNet
    and autoencoder in `dtype`."""
    alphas_cumprod = state.get("alphas_cumprod")
    if config.text.kind != "bert":  # a BERT tower's `transformer.encoder.*` is its own layout, no CLIP's
        state = keymaps.clip_with_text_model_level(state)
    state = {k: v for k, v in state.items() if not NOT_WEIGHTS.search(k)}
    model = LatentDiffusion(config, empty=True, dtype=dtype)
    unet = strip_prefix(state, UNET)
    vae = keymaps.vae_linear_attention_to_conv(strip_prefix(state, VAE))
    known = (UNET, VAE, sgm.EMBEDDERS if config.conditioner else TEXT)
    stray = [k for k in state if not k.startswith(known)]
    if stray:
        raise CheckpointError(f"{where}: unexpected tensor(s) outside the model: {', '.join(sorted(stray)[:3])}")
    strict_load(model.unet, unet, "UNet", where)
    strict_load(model.vae, vae, "autoencoder", where)
    if config.conditioner:
        towers = sgm.state_from_file(state, sgm.tower_kinds(state, where))
        strict_load(model.conditioner, towers, "text towers", where)
        return _with_schedule(model, alphas_cumprod, config, where)
    text = text_state_from_file(state, config.text.kind)
    if config.text.package:  # the file carries only what the model changed in the package's tower
        load_package_text_encoder(model.text_encoder, text, where)
    else:
        strict_load(model.text_encoder, text, "text encoder", where)
    return _with_schedule(model, alphas_cumprod, config, where)


def _with_schedule(model: LatentDiffusion, alphas_cumprod, config: ModelConfig, where: str) -> LatentDiffusion:
    if alphas_cumprod is not None:
        if alphas_cumprod.shape != (config.schedule.num_train_timesteps,):
            raise CheckpointError(
                f"{where}: alphas_cumprod has shape {tuple(alphas_cumprod.shape)}, "
                f"expected ({config.schedule.num_train_timesteps},)"
            )
        model.alphas_cumprod = alphas_cumprod.float()
    return model.eval()


def _towers(model: LatentDiffusion) -> list[TextEncoder]:
    return list(model.conditioner.embedders) if model.config.conditioner else [model.text_encoder]


def _tokenizer_key(index: int) -> str:
    return TOKENIZER_KEY if index == 0 else f"{TOKENIZER_KEY}_{index + 1}"


DtypeRule = Callable[[ModelConfig], torch.dtype]


def load_single_file(
    path: str | Path,
    overrides: dict | None = None,
    dtype_rule: DtypeRule | None = None,
    text_encoders: str | Path | None = None,
):
    """dtype_rule: the UNet's and autoencoder's dtype for the detected config (default fp32). Not fp32
    and a safetensors file: their tensors are converted as they are read (files.read_tensors).
    text_encoders: a folder with the text towers an SD3 file lacks (sd3_towers.TextEncodersFolder)."""
    from ldmkit.checkpoints import sd3_files
    from ldmkit.checkpoints.video_files import refuse_video_model

    state, metadata = read_model_tensors(path)  # mapped, not read: detection needs only names and shapes
    refuse_video_model(path, state)
    if sd3_files.file_family(state, metadata) is not None:
        return sd3_files.load_sd3_file(path, state, metadata, overrides, dtype_rule, text_encoders)
    sd3_files.refuse_text_encoders(text_encoders, path)
    config = detect(state, metadata, str(path), overrides)
    dtype = dtype_rule(config) if dtype_rule else torch.float32
    if dtype != torch.float32 and sniff(path) == SAFETENSORS:
        del state
        state, _ = read_model_tensors(path, lambda k: dtype if k.startswith((UNET, VAE)) else None)
    model = build(config, state, str(path), dtype)
    for i, tower in enumerate(_towers(model)):
        if _tokenizer_key(i) in metadata:
            tokenizer = ClipTokenizer.from_header(metadata[_tokenizer_key(i)], tower.config.max_length, str(path))
            tower.use_tokenizer(tokenizer, str(path))
    return model


def read_model_tensors(path: str | Path, rule=None) -> tuple[dict[str, torch.Tensor], dict]:
    """A model file's tensors and header (files.read_tensors; `rule` as there). A bundled file that
    holds only its UNet (bundled.Bundled.shares) gets its other parts from the bundled file it shares."""
    from ldmkit.bundled import shared_file

    state, metadata = read_tensors(path, rule)
    base = shared_file(Path(path))
    if base is None and SHARES_KEY in metadata:
        raise CheckpointError(
            f"{path}: only a UNet, made to run with the autoencoder and text tower of the bundled "
            f"{metadata[SHARES_KEY]}; load it by its bundled name (ldmkit models lists them)"
        )
    if base is not None:
        shared, _ = read_tensors(base, rule)
        state = {**{k: v for k, v in shared.items() if not k.startswith(UNET)}, **state}
    return state, metadata


def load_model(
    path: str | Path,
    vae: str | Path | None = None,
    overrides: dict | None = None,
    dtype_rule: DtypeRule | None = None,
    text_encoders: str | Path | None = None,
) -> LatentDiffusion:
    """Load a model from a single file or a diffusers folder; `vae` replaces its autoencoder.
    dtype_rule, text_encoders: see load_single_file."""
    if sniff(path) == DIFFUSERS:
        from ldmkit.checkpoints.diffusers_folder import load_diffusers

        if text_encoders is not None:
            raise CheckpointError(f"--text-encoders {text_encoders}: for SD3 single files; {path} is a folder")
        model = load_diffusers(path, overrides, dtype_rule)
    else:
        model = load_single_file(path, overrides, dtype_rule, text_encoders)
    if vae is not None:
        replace_vae(model, vae)
    return model


def load_vae_file(path: str | Path) -> AutoencoderKL:
    """A standalone autoencoder: an original-layout VAE file (with or without `first_stage_model.`),
    a diffusers-layout VAE file, or a diffusers vae/ folder."""
    where = str(path)
    if sniff(path) == DIFFUSERS:
        from ldmkit.checkpoints.diffusers_folder import load_diffusers_vae

        return load_diffusers_vae(Path(path))
    state, metadata = read_tensors(path)
    if any(k.startswith(VAE) for k in state):
        state = strip_prefix(state, VAE)
    if "ldmkit_vae" in metadata:  # ours: the config is in the header
        import json

        from ldmkit.config import from_dict

        config = from_dict(AutoencoderConfig, json.loads(metadata["ldmkit_vae"]), f"{where} header")
        vae = AutoencoderKL(config)
        strict_load(vae, state, "autoencoder", where)
        return vae.eval()
    state = {k: v for k, v in state.items() if not NOT_WEIGHTS.search(k)}
    if any(k.startswith("encoder.down_blocks.") for k in state):
        from ldmkit.checkpoints.diffusers_folder import vae_config_from_diffusers_weights

        config = vae_config_from_diffusers_weights(state, where)
        state = keymaps.vae_from_diffusers(state, config)
    elif any(k.startswith("encoder.down.") for k in state):
        config = vae_config_from_weights(state, where)
        state = keymaps.vae_linear_attention_to_conv(state)
    else:
        raise CheckpointError(
            f"{where}: not an autoencoder (VAE) file: no encoder.down.* or encoder.down_blocks.* weights"
        )
    vae = AutoencoderKL(config)
    strict_load(vae, state, "autoencoder", where)
    return vae.eval()


def replace_vae(model: LatentDiffusion, path: str | Path) -> None:
    """Swap in a separately distributed VAE (fine-tuned decoders). The latent scale stays the
    model's: the UNet was trained with it."""
    vae = load_vae_file(path)
    old = model.vae.config
    if vae.config.embed_dim != old.embed_dim:
        raise CheckpointError(
            f"{path}: VAE latent has {vae.config.embed_dim} channels, the model needs {old.embed_dim}"
        )
    vae.config.scale_factor, vae.config.shift_factor = old.scale_factor, old.shift_factor
    model.first_stage_model = vae
    model.config.vae = vae.config


def model_state(model: LatentDiffusion, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our model's tensors in the original single-file layout."""
    if model.config.sd3:
        from ldmkit.checkpoints.sd3_files import sd3_state

        return sd3_state(model, dtype)
    own = model.state_dict()
    text = {k[len(TEXT) :]: v for k, v in own.items() if k.startswith(TEXT)}
    state = {k: v for k, v in own.items() if not k.startswith((TEXT, CONDITIONER)) and not NOT_WEIGHTS.search(k)}
    if model.config.conditioner:
        towers = {k[len(CONDITIONER) :]: v for k, v in own.items() if k.startswith(CONDITIONER)}
        towers = {k: v for k, v in towers.items() if not NOT_WEIGHTS.search(k)}
        state.update(sgm.state_to_file(towers, [c.kind for c in model.config.text_configs]))
    elif model.config.text.package:
        state.update(text_state_to_file(text_changed_from_package(model.text_encoder), model.config.text.kind))
    else:
        text = {k: v for k, v in text.items() if not NOT_WEIGHTS.search(k)}
        tc = model.config.text
        if tc.kind == "openclip" and tc.skip_last_layers == 0:
            # A tower that came from a diffusers folder stops at the layer SD 2 reads. SD 2 files
            # have one block more, which readers (ours included) skip: write it as zeros so the
            # file means the same in every tool.
            last = f"transformer.text_model.encoder.layers.{tc.num_layers - 1}."
            pad = f"transformer.text_model.encoder.layers.{tc.num_layers}."
            text.update({pad + k[len(last) :]: torch.zeros_like(v) for k, v in text.items() if k.startswith(last)})
        state.update(text_state_to_file(text, tc.kind))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if model.alphas_cumprod is not None:
        state["alphas_cumprod"] = model.alphas_cumprod.float()  # the schedule stays fp32
    return state


def save_single_file(model: LatentDiffusion, path: str | Path, dtype: torch.dtype | None = None) -> None:
    if model.config.sd3:
        from ldmkit.checkpoints.sd3_files import save_sd3_file

        return save_sd3_file(model, path, dtype)
    config = model.config.to_dict()
    tc = model.config.text
    if tc.kind == "openclip" and tc.skip_last_layers == 0 and not tc.package and not model.config.conditioner:
        # model_state writes the unread last block SD 2 files have (as zeros): the header says so.
        config["text"].update(num_layers=tc.num_layers + 1, skip_last_layers=1)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config)}
    for i, tower in enumerate(_towers(model)):
        tokenizer = tower.tokenizer if tower.config.kind != "bert" else None
        if tokenizer is not None and not tokenizer.is_bundled():
            metadata[_tokenizer_key(i)] = tokenizer.to_header()  # a folder's own vocabulary travels with the file
    write_safetensors(path, model_state(model, dtype), metadata)


def parse_dtype(name: str | None) -> torch.dtype | None:
    table = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise CheckpointError(f"dtype {name!r}; allowed: fp32, fp16, bf16")
    return table[name]
