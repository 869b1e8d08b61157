"""Stable Diffusion 3's text conditioning (Esser et al. 2024): three towers read side by side.

    clip_l  OpenAI CLIP ViT-L/14      penultimate layer, unnormed [B, 77, 768];  pooled 768 (projected)
    clip_g  OpenCLIP ViT-bigG/14      penultimate layer, unnormed [B, 77, 1280]; pooled 1280 (projected)
    t5xxl   T5 v1.1 XXL encoder       last layer [B, L, 4096], L = max_sequence_length (default 256)

    context = [ pad(clip_l ‖ clip_g, to 4096 channels) ; t5xxl ]   -> [B, 77 + L, 4096]
    pooled  = clip_l pooled ‖ clip_g pooled                         -> [B, 2048]

Each tower tokenizes on its own (CLIP-L pads with its end-of-text token, bigG with "!", T5 with
`<pad>`, each as its folder's tokenizer says) and attends over its padding, as diffusers'
StableDiffusion3Pipeline.encode_prompt does. T5 is optional: without it its place is zeros of the
same shape, as diffusers gives. Clip skip moves both CLIP towers' layer (the pooled vectors stay the
last layer's); the web UI's numbering: 1 = the penultimate layer SD3 reads, 2 = diffusers' clip_skip=1.

Attribute names follow the SD3 single files (`text_encoders.clip_l.transformer.text_model.*`,
`text_encoders.clip_g.transformer.text_projection.weight`, `text_encoders.t5xxl.transformer.shared.weight`,
`text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight`, ...): a module
named `text_encoders` holding these loads them by name."""

import contextlib
import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.prompts import PromptStates
from ldmkit.models.text import TextEncoder, TextEncoderConfig, check_clip_skip, text_config_from_hf
from ldmkit.models.tokenizers import EOS, T5Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 256
# diffusers refuses more (T5 itself has no fixed length: its positions are relative buckets).
MAX_SEQUENCE_LENGTH = 512


@dataclass
class T5EncoderConfig:
    """The fields of transformers' T5Config that change an encoder's output (defaults: T5 v1.1 XXL)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # "gated-gelu" (v1.1: GEGLU with the tanh gelu) or "relu" (the first T5), or "[gated-]<activation>"
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        from transformers.activations import ACT2FN

        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACT2FN:
            raise ConfigError(
                f"T5 feed_forward_proj: {self.feed_forward_proj!r}; allowed: 'gated-gelu', 'relu' or "
                "'[gated-]<activation>'"
            )


def t5_config_from_hf(hf: dict) -> T5EncoderConfig:
    """Our config from a transformers T5 config.json (a diffusers text_encoder_3/ folder)."""
    fields = T5EncoderConfig.__dataclass_fields__
    return T5EncoderConfig(**{k: hf[k] for k in fields if k in hf})


def sd3_clip_config(hf: dict, pad_token: str, max_length: int) -> TextEncoderConfig:
    """One of SD3's CLIP towers from its transformers config (CLIPTextModelWithProjection's fields)."""
    c = text_config_from_hf(hf, "clip")
    return replace(
        c,
        pad_token=pad_token,
        max_length=min(max_length, c.max_position_embeddings),
        skip_last_layers=1,
        final_norm=False,
        pooled=True,
        projection_dim=hf.get("projection_dim") or c.hidden_size,
    )


@dataclass
class SD3TextConfig:
    clip_l: TextEncoderConfig
    clip_g: TextEncoderConfig
    t5xxl: T5EncoderConfig | None = None
    # The context's width: T5's d_model, which the transformer's joint_attention_dim must be; without
    # T5, the width of the zeros standing in its place.
    joint_width: int = 4096

    def __post_init__(self):
        for name in ("clip_l", "clip_g"):
            c = getattr(self, name)
            if c.kind != "clip" or not c.pooled:
                raise ConfigError(f"SD3TextConfig.{name}: a CLIP tower in transformers' layout with pooled: true")
        if self.t5xxl is not None and self.t5xxl.d_model != self.joint_width:
            raise ConfigError(
                f"SD3TextConfig: T5's width {self.t5xxl.d_model} is not the context width {self.joint_width}"
            )
        clip = self.clip_l.hidden_size + self.clip_g.hidden_size
        if clip > self.joint_width:
            raise ConfigError(
                f"SD3TextConfig: the CLIP towers' widths {self.clip_l.hidden_size} + {self.clip_g.hidden_size} "
                f"exceed the context width {self.joint_width} they are padded to"
            )

    @property
    def pooled_width(self) -> int:
        return (self.clip_l.projection_dim or self.clip_l.hidden_size) + (
            self.clip_g.projection_dim or self.clip_g.hidden_size
        )


def sd3_text_config(t5: bool = True) -> SD3TextConfig:
    """SD3 / SD3.5's towers at their real sizes."""
    common = dict(kind="clip", skip_last_layers=1, final_norm=False, pooled=True)
    clip_l = TextEncoderConfig(pad_token=EOS, projection_dim=768, **common)
    clip_g = TextEncoderConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_layers=32,
        num_heads=20,
        hidden_act="gelu",
        pad_token="!",
        projection_dim=1280,
        **common,
    )
    return SD3TextConfig(clip_l, clip_g, T5EncoderConfig() if t5 else None)


def check_max_sequence_length(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SEQUENCE_LENGTH:
        raise ConfigError(
            f"max_sequence_length: {n!r}; allowed: 1 to {MAX_SEQUENCE_LENGTH} T5 tokens "
            f"(SD3's default {DEFAULT_MAX_SEQUENCE_LENGTH})"
        )


class T5Encoder(nn.Module):
    """T5's encoder stack (transformers' T5EncoderModel) as `transformer`, and its tokenizer."""

    def __init__(self, config: T5EncoderConfig, empty: bool = False, dtype: torch.dtype = torch.float32):
        """empty: built on the meta device (no memory, no random init; XXL is 4.7 B weights) for a
        loader to fill with strict_load."""
        super().__init__()
        from transformers import T5Config, T5EncoderModel

        self.config = config
        hf = T5Config(**vars(config), is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)
        with torch.device("meta") if empty else contextlib.nullcontext():
            self.transformer = T5EncoderModel(hf).to(dtype)
        self.eval()
        self._tokenizer: T5Tokenizer | None = None

    def use_tokenizer(self, tokenizer: T5Tokenizer, where: str) -> None:
        if len(tokenizer) > self.config.vocab_size:
            raise CheckpointError(
                f"{where}: the tokenizer has {len(tokenizer)} tokens but T5 only {self.config.vocab_size} "
                "token embeddings"
            )
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> T5Tokenizer:
        if self._tokenizer is None:
            # T5's SentencePiece vocabulary does not ship with ldmkit: it comes with the weights.
            raise CheckpointError("the T5 text encoder has no tokenizer (a diffusers folder's tokenizer_3/ gives it)")
        return self._tokenizer

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # No attention mask: the padding is attended to, as diffusers and the SD3 reference do.
        return self.transformer(input_ids=input_ids).last_hidden_state


class SD3TextEncoders(nn.Module):
    """Prompts -> (context [B, 77 + L, joint_width], pooled [B, 2048]) for SD3's MMDiT."""

    def __init__(self, config: SD3TextConfig, empty_t5: bool = False, t5_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.clip_l = TextEncoder(config.clip_l)
        self.clip_g = TextEncoder(config.clip_g)
        self.t5xxl = None if config.t5xxl is None else T5Encoder(config.t5xxl, empty_t5, t5_dtype)

    def check_clip_skip(self, clip_skip: int) -> None:
        for tower in (self.clip_l, self.clip_g):
            check_clip_skip(tower.config, clip_skip)

    def tokens_over(self, prompts: list[str], max_sequence_length: int) -> list[tuple[int, int, int]]:
        """Per prompt: (its CLIP tokens, of which the CLIP towers drop, of which T5 drops), each count
        with the start/end tokens; T5's 0 without T5."""
        out = []
        t5 = self.t5xxl.tokenizer.lengths(prompts) if self.t5xxl is not None else [0] * len(prompts)
        for prompt, t5_len in zip(prompts, t5):
            clip = max(len(t.tokenizer.content_ids(prompt)) + 2 for t in (self.clip_l, self.clip_g))
            limit = min(t.tokenizer.max_length for t in (self.clip_l, self.clip_g))
            out.append((clip, max(0, clip - limit), max(0, t5_len - max_sequence_length)))
        return out

    def check_prompt_lengths(self, prompts: list[str], max_sequence_length: int, what: str = "prompt") -> None:
        """Refuse, in one line, a prompt that the tower reading furthest (T5; the CLIP towers without
        it) would truncate."""
        for i, (clip, clip_lost, t5_lost) in enumerate(self.tokens_over(prompts, max_sequence_length)):
            if self.t5xxl is not None and t5_lost:
                more = " or raise max_sequence_length" if max_sequence_length < MAX_SEQUENCE_LENGTH else ""
                raise ConfigError(
                    f"{what} {i + 1}: {max_sequence_length + t5_lost} T5 tokens, over max_sequence_length "
                    f"{max_sequence_length} (at most {MAX_SEQUENCE_LENGTH}): shorten it{more}"
                )
            if self.t5xxl is None and clip_lost:
                raise ConfigError(
                    f"{what} {i + 1}: {clip} CLIP tokens, over the {clip - clip_lost} the CLIP towers read "
                    "(this model has no T5 tower to read further): shorten it"
                )

    def truncation_notes(self, prompts: list[str], max_sequence_length: int, what: str = "prompt") -> list[str]:
        """One line per prompt that T5 truncates (without T5: that the CLIP towers truncate)."""
        notes = []
        for i, (clip, clip_lost, t5_lost) in enumerate(self.tokens_over(prompts, max_sequence_length)):
            if t5_lost:
                notes.append(
                    f"{what} {i + 1}: T5 reads its first {max_sequence_length} tokens (max_sequence_length); "
                    f"{t5_lost} dropped"
                )
            elif clip_lost and self.t5xxl is None:
                notes.append(
                    f"{what} {i + 1}: the CLIP towers read its first {clip - clip_lost} tokens; {clip_lost} dropped"
                )
        return notes

    def _say_truncation(self, prompts: list[str], max_sequence_length: int, what: str) -> None:
        for note in self.truncation_notes(prompts, max_sequence_length, what):
            log.warning(note)
        for i, (clip, clip_lost, _) in enumerate(self.tokens_over(prompts, max_sequence_length)):
            if clip_lost and self.t5xxl is not None:  # SD3's normal case for a long prompt: T5 reads on
                log.info(
                    "%s %d: the CLIP towers read its first %d tokens; %d dropped",
                    what,
                    i + 1,
                    clip - clip_lost,
                    clip_lost,
                )

    def encode_texts(
        self,
        prompts: list[str],
        clip_skip: int | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        strict: bool = False,
        what: str = "prompt",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) as diffusers' _get_clip_prompt_embeds x2 + _get_t5_prompt_embeds joined.
        A prompt longer than a tower reads is truncated, as diffusers does, and a log line says so;
        strict: refused instead (ConfigError), see check_prompt_lengths."""
        check_max_sequence_length(max_sequence_length)
        if clip_skip is not None:
            self.check_clip_skip(clip_skip)
        if strict:
            self.check_prompt_lengths(prompts, max_sequence_length, what)
        else:
            self._say_truncation(prompts, max_sequence_length, what)
        device = next(self.clip_l.parameters()).device
        states, pooled = [], []
        for tower in (self.clip_l, self.clip_g):
            hidden, p = tower.encode_with_pooled(tower.tokenizer(prompts)["input_ids"].to(device), clip_skip)
            states.append(hidden)
            pooled.append(p)
        clip = torch.cat(states, dim=-1)
        if self.t5xxl is None:
            t5 = clip.new_zeros(len(prompts), max_sequence_length, self.config.joint_width)
        else:
            ids = self.t5xxl.tokenizer(prompts, max_sequence_length)
            t5 = self.t5xxl.encode_ids(ids.to(next(self.t5xxl.parameters()).device))
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.device)], dim=-2), torch.cat(pooled, dim=-1)

    def encode_prompts(
        self,
        prompts: list[str],
        negatives: list[str] | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        strict: bool = False,
    ) -> PromptStates:
        """diffusers' StableDiffusion3Pipeline.encode_prompt (one prompt for all three towers). As there,
        clip_skip moves the prompts' layer only: negative prompts are read at the towers' own layer."""
        context, pooled = self.encode_texts(prompts, clip_skip, max_sequence_length, strict)
        if negatives is None:
            return PromptStates(context, None, pooled, None)
        if len(negatives) != len(prompts):
            raise ConfigError(f"negative prompts: {len(negatives)} for {len(prompts)} prompts; give one per prompt")
        uncond, uncond_pooled = self.encode_texts(negatives, None, max_sequence_length, strict, "negative prompt")
        return PromptStates(context, uncond, pooled, uncond_pooled)
