"""Textual inversion (Gal et al. 2022): learned word vectors used by name in prompts, as the popular
web UI does. A prompt word equal to an embedding's name becomes that embedding's n vectors.

Files read: the web UI's `.pt` ({"string_to_param": {"*": [n, d]}, ...}, through the safe loader) and
`.safetensors` ({"emb_params": [n, d]}), and diffusers' learned_embeds ({"<token>": [d]}). The vectors
get token ids past the vocabulary; the text tower's token embedding looks those up in an extra table
instead of its own, so nothing else in the encoder changes."""

import logging
import re
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.errors import CheckpointError, ConfigError, LdmkitError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".pt", ".safetensors", ".bin")


class ExtendedEmbedding(nn.Embedding):
    """A token embedding sharing the original's weight, plus rows for ids >= its size."""

    def __init__(self, base: nn.Embedding):
        super().__init__(base.num_embeddings, base.embedding_dim, _weight=base.weight)
        self.weight = base.weight  # the same Parameter: state dicts and LoRA merges see no difference
        self.register_buffer("extra", torch.zeros(0, base.embedding_dim), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids.clamp(max=self.num_embeddings - 1))
        beyond = ids >= self.num_embeddings
        if bool(beyond.any()):
            out = out.clone()
            out[beyond] = self.extra[ids[beyond] - self.num_embeddings].to(out.dtype)
        return out


def read_embedding(path: str | Path) -> torch.Tensor:
    """[n, d] vectors of an embedding file in any supported layout."""
    from ldmkit.checkpoints.files import SAFETENSORS, safe_torch_load, sniff

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such embedding file")
    if sniff(path) == SAFETENSORS:
        from ldmkit.checkpoints.files import read_tensors

        data: dict = read_tensors(path)[0]
    else:
        data = safe_torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a textual-inversion embedding")
    if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        vectors = next(iter(data["string_to_param"].values()))
    elif "emb_params" in data:
        vectors = data["emb_params"]
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = next(iter(data.values()))
    else:
        raise CheckpointError(f"{path}: not a textual-inversion embedding (no string_to_param or emb_params)")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        raise CheckpointError(f"{path}: embedding vectors of an unexpected shape")
    return vectors.detach().float().reshape(-1, vectors.shape[-1])


def token_embedding(text_encoder) -> ExtendedEmbedding:
    """The text tower's token embedding (CLIP's token_embedding, BERT's word_embeddings), extended."""
    emb = text_encoder.hf_model.embeddings
    attr = "word_embeddings" if text_encoder.config.kind == "bert" else "token_embedding"
    if not isinstance(getattr(emb, attr), ExtendedEmbedding):
        setattr(emb, attr, ExtendedEmbedding(getattr(emb, attr)))
    return getattr(emb, attr)


class Embeddings:
    """The embeddings a text encoder knows by name, and the prompt tokenisation that uses them."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self.vectors: dict[str, torch.Tensor] = {}
        self.ids: dict[str, list[int]] = {}

    def _token_embedding(self) -> ExtendedEmbedding:
        return token_embedding(self.text_encoder)

    def add(self, name: str, vectors: torch.Tensor, where: str = "embedding") -> None:
        table = self._token_embedding()
        if vectors.shape[-1] != table.embedding_dim:
            raise CheckpointError(
                f"{where}: vectors of size {vectors.shape[-1]}, but this model's text tower uses {table.embedding_dim} "
                "(an embedding for another model)"
            )
        if not re.fullmatch(r"[\w\-.]+", name):
            raise ConfigError(f"{where}: embedding name {name!r}; allowed: letters, digits, _ - .")
        self.vectors[name] = vectors
        rows = torch.cat(list(self.vectors.values())) if self.vectors else torch.zeros(0, table.embedding_dim)
        start = table.num_embeddings
        self.ids = {}
        for n, v in self.vectors.items():
            self.ids[n] = list(range(start, start + len(v)))
            start += len(v)
        table.extra = rows.to(table.weight.device)

    def load(self, path: str | Path) -> str:
        path = Path(path)
        self.add(path.stem, read_embedding(path), str(path))
        return path.stem

    def load_folder(self, folder: str | Path) -> list[str]:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such embeddings folder")
        loaded = []
        for p in sorted(folder.iterdir()):
            if p.suffix not in FILE_SUFFIXES:
                continue
            try:
                loaded.append(self.load(p))
            except LdmkitError as e:  # a folder may hold other files of these suffixes (a run's cache)
                log.warning("%s: skipped, not an embedding (%s)", p, str(e).splitlines()[0][:200])
        return loaded

    def _pattern(self) -> re.Pattern:
        names = "|".join(map(re.escape, sorted(self.ids, key=len, reverse=True)))
        return re.compile(r"(?<![\w\-.])(" + names + r")(?![\w\-])")

    def used_in(self, text: str) -> list[str]:
        return [m.group(1) for m in self._pattern().finditer(text)] if self.ids else []

    def tokenize(self, content_ids):
        """Wrap a tokenizer's content_ids: embedding names (whole words) become their vectors' ids."""
        if not self.ids:
            return content_ids
        pattern = self._pattern()

        def ids_of(text: str) -> list[int]:
            out, last = [], 0
            for m in pattern.finditer(text):
                out += content_ids(text[last : m.start()]) + self.ids[m.group(1)]
                last = m.end()
            return out + content_ids(text[last:])

        return ids_of
