"""Textual inversion (Gal et al. 2022): learned word vectors used by name in prompts, as the popular
web UI does. A prompt word equal to an embedding's name becomes that embedding's n vectors.

Files read: the web UI's `.pt` ({"string_to_param": {"*": [n, d]}, ...}, through the safe loader) and
`.safetensors` ({"emb_params": [n, d]}), and diffusers' learned_embeds ({"<token>": [d]}). The vectors
get token ids past the vocabulary; the text tower's token embedding looks those up in an extra table
instead of its own, so nothing else in the encoder changes.

SDXL embeddings hold one set of vectors per tower ({"clip_l": [n, 768], "clip_g": [n, 1280]}, the web
UI's and diffusers' layout): the prompt is tokenized once (models/conditioner.py), the word gets the same
ids in both towers, and each tower's table holds its own vectors for them. The refiner reads clip_g."""

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


TOWER_KEYS = {"clip": "clip_l", "openclip": "clip_g"}  # an SDXL embedding's vectors for each tower kind


def read_embedding(path: str | Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """[n, d] vectors of an embedding file in any supported layout; an SDXL file's {"clip_l": [n, 768],
    "clip_g": [n, 1280]}."""
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
    if "clip_l" in data or "clip_g" in data:
        return _per_tower_file(data, path)
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


def _per_tower_file(data: dict, path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("clip_l", "clip_g"):
        v = data.get(key)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2):
            raise CheckpointError(f"{path}: embedding vectors {key!r} of an unexpected shape")
        out[key] = v.detach().float().reshape(-1, v.shape[-1])
    if len({len(v) for v in out.values()}) > 1:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in out.items())
        raise CheckpointError(f"{path}: the towers' vectors differ in number ({sizes})")
    return out


def _sizes(sizes: list[tuple[str | None, int]]) -> str:
    return " + ".join(f"{k} {d}" if k else str(d) for k, d in sizes)


def token_embedding(text_encoder) -> ExtendedEmbedding:
    """The text tower's token embedding (CLIP's token_embedding, BERT's word_embeddings), extended."""
    emb = text_encoder.hf_model.embeddings
    attr = "word_embeddings" if text_encoder.config.kind == "bert" else "token_embedding"
    if not isinstance(getattr(emb, attr), ExtendedEmbedding):
        setattr(emb, attr, ExtendedEmbedding(getattr(emb, attr)))
    return getattr(emb, attr)


def _pool_at_end_of_text(tower) -> None:
    """A CLIP tower whose config says eos_token_id 2 (SDXL's bigG, as published) pools at the largest id, as
    the original code did with the vocabulary's ids, where that is the end of text: with embedding ids past
    the vocabulary it would pool at the embedding. Pool at the first end-of-text token instead (the same
    token whenever no embedding is used; what the web UI pools, whose embeddings keep vocabulary ids)."""
    clip = tower.hf_model
    if tower.config.kind != "bert" and getattr(clip, "eos_token_id", None) == 2:
        clip.eos_token_id = tower.tokenizer.special_ids[1]


class Embeddings:
    """The embeddings a text encoder knows by name, and the prompt tokenisation that uses them. The text
    encoder may be SDXL's conditioner: then each tower gets its own vectors, at ids shared by all."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self.towers = list(getattr(text_encoder, "embedders", [text_encoder]))
        # an SDXL conditioner's towers take their vectors from a file's clip_l / clip_g; a lone tower all
        self.keys = [TOWER_KEYS.get(t.config.kind) if hasattr(text_encoder, "embedders") else None for t in self.towers]
        self.vectors: dict[str, torch.Tensor] = {}  # [n, sum of the towers' widths]: their vectors side by side
        self.ids: dict[str, list[int]] = {}

    def _token_embedding(self) -> ExtendedEmbedding:
        return token_embedding(self.towers[0])

    def _per_tower(self, vectors: torch.Tensor | dict[str, torch.Tensor], where: str) -> list[torch.Tensor]:
        """Each tower's [n, d] vectors, or one line saying why the embedding is for another model."""
        tables = [token_embedding(t) for t in self.towers]
        wanted = _sizes([(k, t.embedding_dim) for k, t in zip(self.keys, tables)])
        if isinstance(vectors, dict):
            given = _sizes([(k, v.shape[-1]) for k, v in vectors.items()])
            fits = None not in self.keys and all(k in vectors for k in self.keys)
            parts = [vectors[k] for k in self.keys] if fits else []
        else:
            given, fits, parts = str(vectors.shape[-1]), len(self.towers) == 1, [vectors]
        if not fits or any(v.shape[-1] != t.embedding_dim for v, t in zip(parts, tables)):
            many = len(tables) > 1
            raise CheckpointError(
                f"{where}: vectors of size {given}, but this model's text tower{'s use' if many else ' uses'} "
                f"{wanted} (an embedding for another model)"
            )
        return parts

    def add(self, name: str, vectors: torch.Tensor | dict[str, torch.Tensor], where: str = "embedding") -> None:
        parts = self._per_tower(vectors, where)
        if not re.fullmatch(r"[\w\-.]+", name):
            raise ConfigError(f"{where}: embedding name {name!r}; allowed: letters, digits, _ - .")
        self.vectors[name] = torch.cat(parts, dim=-1)
        tables = [token_embedding(t) for t in self.towers]
        first = start = max(t.num_embeddings for t in tables)  # the same ids in every tower
        self.ids = {}
        for n, v in self.vectors.items():
            self.ids[n] = list(range(start, start + len(v)))
            start += len(v)
        offset = 0
        for tower, table in zip(self.towers, tables):
            d, device = table.embedding_dim, table.weight.device
            rows = [v[:, offset : offset + d].float().to(device) for v in self.vectors.values()]
            table.extra = torch.cat([torch.zeros(first - table.num_embeddings, d, device=device), *rows])
            offset += d
            _pool_at_end_of_text(tower)

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
