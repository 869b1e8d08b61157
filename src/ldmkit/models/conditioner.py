"""SDXL's text conditioning (Podell et al. 2023): two CLIP towers read side by side, their hidden states
concatenated along the channels, and a pooled vector from the last tower for the UNet's addition
embedding. Named as the original code names it (`conditioner.embedders.N`), so an SDXL file loads by
name: the base has OpenAI CLIP ViT-L (`embedders.0`, penultimate layer) and OpenCLIP ViT-bigG
(`embedders.1`, penultimate layer and the projected pooled output); the refiner bigG alone.

The popular web UI tokenizes a prompt once and gives both towers the same ids, each padded with its own
pad token (CLIP-L the end-of-text token, bigG id 0); diffusers tokenizes with each tower's own tokenizer.
Both are offered: `encode_ids` (web UI chunks) and `encode_texts` (diffusers' truncation)."""

import torch
from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.models.text import TextEncoder, TextEncoderConfig, check_clip_skip


class Conditioner(nn.Module):
    def __init__(self, configs: list[TextEncoderConfig]):
        super().__init__()
        if not configs or not configs[-1].pooled:
            raise ConfigError("Conditioner: the last text tower must give the pooled vector (pooled: true)")
        self.embedders = nn.ModuleList(TextEncoder(c) for c in configs)
        self._shared: bool | None = None

    @property
    def config(self) -> TextEncoderConfig:
        """The first tower's: its tokenizer splits prompts into the web UI's chunks."""
        return self.embedders[0].config

    @property
    def tokenizer(self):
        return self.embedders[0].tokenizer

    @property
    def width(self) -> int:
        return sum(e.config.hidden_size for e in self.embedders)

    def check_clip_skip(self, clip_skip: int) -> None:
        for e in self.embedders:
            check_clip_skip(e.config, clip_skip)

    def shares_vocabulary(self) -> bool:
        """Whether one tokenization serves every tower (the web UI's way): the same vocabulary."""
        if self._shared is None:  # tokenizers are set once, when the model is read
            first = self.embedders[0].tokenizer
            self._shared = all(e.tokenizer.same_vocabulary(first) for e in self.embedders[1:])
        return self._shared

    def encode_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, clip_skip: int | None = None
    ) -> torch.Tensor:
        return self.encode_with_pooled(input_ids, attention_mask, clip_skip)[0]

    def encode_with_pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, clip_skip: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One tokenization for every tower (web UI): each tower's own pad id where the mask is 0."""
        if len(self.embedders) > 1 and not self.shares_vocabulary():
            raise ConfigError(
                "the two text towers' tokenizers have different vocabularies: use prompt_mode 'truncate' "
                "(each tower tokenizes on its own, as diffusers does)"
            )
        states, pooled = [], None
        for e in self.embedders:
            ids = input_ids
            if attention_mask is not None:
                ids = torch.where(attention_mask.bool(), input_ids, e.tokenizer.special_ids[2])
            hidden, pooled = e.encode_with_pooled(ids, clip_skip)
            states.append(hidden)
        return torch.cat(states, dim=-1), pooled

    def encode_texts(self, prompts: list[str], clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tower tokenizes with its own tokenizer, truncated at its length (diffusers' encode_prompt)."""
        device = next(self.parameters()).device
        states, pooled = [], None
        for e in self.embedders:
            ids = e.tokenizer(prompts)["input_ids"].to(device)
            hidden, pooled = e.encode_with_pooled(ids, clip_skip)
            states.append(hidden)
        return torch.cat(states, dim=-1), pooled

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_texts(prompts)[0]
