"""`ldmkit train-embedding`: textual inversion (Gal et al. 2022). New word vectors, and nothing else,
learn to make a frozen model draw what the training images show when a prompt says the word.

The vectors start as the token vectors of `init_words`; captions are the data's own with `replace`
swapped for the new word (or, without `replace`, the word put in front). The text tower runs with
gradients only through the new rows of its token embedding.

On SDXL each tower learns its own vectors for the word (each started from its own token vectors of
`init_words`), and the file holds both, as `clip_l` (CLIP-L) and `clip_g` (OpenCLIP-bigG): the layout
the popular web UI and diffusers read."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.checkpoints.files import write_safetensors
from ldmkit.errors import ConfigError
from ldmkit.training.latent_task import DenoisingTrainConfig, LatentTask, SampleConfig, TextStates, load_frozen


@dataclass
class EmbeddingTrainConfig(DenoisingTrainConfig):
    base: str = ""  # the frozen model
    word: str = "newword"  # the name prompts will use (and the saved file's name)
    init_words: str = "*"  # the vectors start as these words' token vectors (one vector per token)
    replace: str | None = None  # in each caption, this text becomes `word`
    ema_decay: float = 0.0
    sample: SampleConfig = field(default_factory=SampleConfig)

    frozen_model = ("base", "the model to teach")


class EmbeddingTask(LatentTask):
    name = "embedding"

    def __init__(self, config: EmbeddingTrainConfig):
        from ldmkit.models.embeddings import Embeddings, token_embedding

        model = load_frozen(config.base)
        te = model.text_encoder
        # one tokenization for every tower (the web UI's), so the word's ids are the same in each
        ids = te.tokenizer.content_ids(config.init_words)
        if not ids:
            raise ConfigError(f"init_words {config.init_words!r}: no tokens")
        self.n = len(ids)
        self.embeddings = Embeddings(te)
        tables = [token_embedding(t) for t in self.embeddings.towers]
        start = [table.weight[ids].detach().clone() for table in tables]
        # a lone tower's vectors, or an SDXL file's per tower ({"clip_l": ..., "clip_g": ...})
        self.keys = ["vectors"] if self.embeddings.keys == [None] else self.embeddings.keys
        self.embeddings.add(config.word, start[0] if self.keys == ["vectors"] else dict(zip(self.keys, start)))
        self.vectors = nn.ParameterDict({k: nn.Parameter(t.extra.clone()) for k, t in zip(self.keys, tables)})
        super().__init__(config, model, self.vectors)
        self.model.unet.eval()

    def _set_vectors(self, detach: bool) -> None:
        """Each tower's extra token rows from the trained vectors: for training a differentiable view
        of the Parameter (assigning the Parameter itself would make it the text tower's)."""
        from ldmkit.models.embeddings import token_embedding

        for key, tower in zip(self.keys, self.embeddings.towers):
            v = self.vectors[key]
            token_embedding(tower).extra = v.detach().clone() if detach else v * 1.0

    def _caption(self, caption: str) -> str:
        c = self.config
        if c.replace:
            return caption.replace(c.replace, c.word)
        return f"{c.word} {caption}"

    def text_states(self, captions: list[str]) -> TextStates:
        """With gradients into the new vectors (the base class encodes without any)."""
        from ldmkit.models.prompts import encode_prompts

        self._set_vectors(detach=False)
        captions = [self._caption(c) if c else c for c in captions]
        with torch.enable_grad():
            states = encode_prompts(self.model.text_encoder, captions, None, "webui", self.embeddings)
        return TextStates(states.context, states.pooled)

    def loss(self, images, items, captions, gs, extra=None, reduce: bool = True):
        # A batch whose captions never say the word leaves the vectors out of the graph: tie them in
        # with weight 0, so that backward and the optimiser step see the same parameters every time.
        tie = sum(v.sum() for v in self.vectors.values())
        return super().loss(images, items, captions, gs, extra, reduce) + 0.0 * tie

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.pipelines import Pipeline

        with self.ema.applied():
            pipe = Pipeline(self.model, name=f"step-{step}")
            pipe.embeddings = self.embeddings
            self._set_vectors(detach=True)
            self.prompt_grid(pipe, step, folder)

    def finish(self, folder: Path) -> None:
        """The popular UI's .safetensors layout, named after the word: {"emb_params": [n, d]}, or on SDXL
        {"clip_l": [n, d_l], "clip_g": [n, d_g]} (the word's rows of each tower's table)."""
        with self.ema.applied():
            vectors = {k: self.vectors[k].detach()[-self.n :].clone() for k in self.keys}
        if self.keys == ["vectors"]:
            vectors = {"emb_params": vectors["vectors"]}
        write_safetensors(folder / f"{self.config.word}.safetensors", vectors)
