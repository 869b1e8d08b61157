"""`ldmkit train-embedding`: textual inversion (Gal et al. 2022). New word vectors, and nothing else,
learn to make a frozen model draw what the training images show when a prompt says the word.

The vectors start as the token vectors of `init_words`; captions are the data's own with `replace`
swapped for the new word (or, without `replace`, the word put in front). The text tower runs with
gradients only through the new rows of its token embedding."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.checkpoints.files import write_safetensors
from ldmkit.errors import ConfigError
from ldmkit.training.latent_task import DenoisingTrainConfig, LatentTask, SampleConfig, load_frozen


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
        ids = te.tokenizer.content_ids(config.init_words)
        if not ids:
            raise ConfigError(f"init_words {config.init_words!r}: no tokens")
        self.embeddings = Embeddings(te)
        table = token_embedding(te)
        self.embeddings.add(config.word, table.weight[ids].detach().clone(), "train-embedding")
        self.vectors = nn.ParameterDict({"vectors": nn.Parameter(table.extra.clone())})
        super().__init__(config, model, self.vectors)
        self.model.unet.eval()

    def _caption(self, caption: str) -> str:
        c = self.config
        if c.replace:
            return caption.replace(c.replace, c.word)
        return f"{c.word} {caption}"

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """With gradients into the new vectors (the base class encodes without any)."""
        from ldmkit.models.embeddings import token_embedding
        from ldmkit.models.prompts import encode_prompts

        # a differentiable view of the Parameter (assigning the Parameter itself would make it the text tower's)
        token_embedding(self.model.text_encoder).extra = self.vectors["vectors"] * 1.0
        captions = [self._caption(c) if c else c for c in captions]
        with torch.enable_grad():
            return encode_prompts(self.model.text_encoder, captions, None, "webui", self.embeddings)[0]

    def loss(self, images, items, captions, gs, extra=None, reduce: bool = True):
        # A batch whose captions never say the word leaves the vectors out of the graph: tie them in
        # with weight 0, so that backward and the optimiser step see the same parameters every time.
        return super().loss(images, items, captions, gs, extra, reduce) + 0.0 * self.vectors["vectors"].sum()

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.models.embeddings import token_embedding
        from ldmkit.pipelines import Pipeline

        with self.ema.applied():
            pipe = Pipeline(self.model, name=f"step-{step}")
            pipe.embeddings = self.embeddings
            token_embedding(self.model.text_encoder).extra = self.vectors["vectors"].detach().clone()
            self.prompt_grid(pipe, step, folder)

    def finish(self, folder: Path) -> None:
        """The popular UI's .safetensors layout: {"emb_params": [n, d]}, named after the word."""
        with self.ema.applied():
            vectors = self.vectors["vectors"].detach().clone()
        write_safetensors(folder / f"{self.config.word}.safetensors", {"emb_params": vectors})
