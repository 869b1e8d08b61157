"""Prompts as the popular web UI reads them: emphasis, BREAK, and long prompts in 75-token chunks.

    (word)        weight x 1.1        ((word)) x 1.21
    [word]        weight / 1.1
    (word:1.5)    weight 1.5          \\( \\) \\[ \\]  literal brackets
    BREAK         start a new 75-token chunk

Each chunk is encoded on its own ([BOS] 75 tokens [EOS], 77 positions) and the chunks are
concatenated along the token axis; every token's hidden state is multiplied by its weight, then the
whole is rescaled to its unweighted mean (the web UI's rule), per image. An unbalanced bracket is
not an error: a stray closer is literal text, an unclosed opener applies to the rest of the prompt
(as in the web UI), and a warning says so. `mode="truncate"` is diffusers' behaviour instead: no
syntax, one chunk, truncated at 77 tokens."""

import logging
import re
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch

from ldmkit.errors import ConfigError

log = logging.getLogger(__name__)

BREAK = "BREAK"
_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
COMMA_BACKTRACK = 20  # the web UI's "prompt word wrap length limit"


@dataclass
class Fragment:
    text: str
    weight: float


def parse_emphasis(prompt: str) -> list[Fragment]:
    """The prompt as (text, weight) fragments; BREAK is a fragment of its own with weight -1."""
    out: list[Fragment] = []
    round_open: list[int] = []
    square_open: list[int] = []
    unbalanced = False

    def scale(start: int, factor: float) -> None:
        for f in out[start:]:
            f.weight *= factor

    for m in _TOKEN.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\") and len(text) == 2:
            out.append(Fragment(text[1], 1.0))
        elif text == "(":
            round_open.append(len(out))
        elif text == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif text == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif text == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            if text in (")", "]") or weight is not None:
                unbalanced = True
            for i, part in enumerate(_BREAK_SPLIT.split(text)):
                if i:
                    out.append(Fragment(BREAK, -1.0))
                out.append(Fragment(part, 1.0))
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    if round_open or square_open or unbalanced:
        log.warning(
            "unbalanced bracket in prompt %r: read as the web UI does (a stray closer is literal text, "
            "an unclosed opener emphasises the rest)",
            prompt,
        )
    merged: list[Fragment] = []
    for f in out:
        if merged and merged[-1].weight == f.weight and f.text != BREAK and merged[-1].text != BREAK:
            merged[-1].text += f.text
        else:
            merged.append(f)
    return merged or [Fragment("", 1.0)]


@dataclass
class Chunks:
    ids: list[list[int]]  # each chunk's content tokens (no BOS/EOS), at most 75
    weights: list[list[float]]


def tokenize_weighted(prompt: str, tokenize, size: int, comma_id: int | None) -> Chunks:
    """Fragments -> chunks of at most `size` tokens, as the web UI splits them: BREAK closes a
    chunk; a full chunk is cut after its last comma if that comma is within 20 tokens of the end."""
    ids: list[list[int]] = [[]]
    weights: list[list[float]] = [[]]
    last_comma = -1
    for frag in parse_emphasis(prompt):
        if frag.text == BREAK:
            ids.append([])
            weights.append([])
            last_comma = -1
            continue
        for tok in tokenize(frag.text):
            if len(ids[-1]) == size:
                cut = last_comma + 1
                if last_comma >= 0 and size - cut <= COMMA_BACKTRACK:
                    ids.append(ids[-1][cut:])
                    weights.append(weights[-1][cut:])
                    del ids[-2][cut:], weights[-2][cut:]
                else:
                    ids.append([])
                    weights.append([])
                last_comma = -1
            if tok == comma_id:
                last_comma = len(ids[-1])
            ids[-1].append(tok)
            weights[-1].append(frag.weight)
    return Chunks(ids, weights)


PROMPT_MODES = ("webui", "truncate")


def check_prompt_mode(mode: str) -> None:
    """webui: the popular web UI's emphasis syntax and 75-token chunks; truncate: as diffusers."""
    if mode not in PROMPT_MODES:
        raise ConfigError(f"prompt mode {mode!r}; allowed: {', '.join(PROMPT_MODES)}")


class PromptStates(NamedTuple):
    context: torch.Tensor  # [B, 77*k, D]
    uncond: torch.Tensor | None  # the negative prompts', or None
    pooled: torch.Tensor | None = None  # [B, P] (SDXL's towers): the first chunk's, as the web UI
    uncond_pooled: torch.Tensor | None = None


def encode_prompts(
    text_encoder,
    prompts: list[str],
    negatives: list[str] | None = None,
    mode: str = "webui",
    embeddings=None,
    clip_skip: int | None = None,
    max_chunks: int | None = None,
) -> PromptStates:
    """Prompt states for the prompts and (if given) their negative prompts, both padded to the same
    number of chunks k. `embeddings` (ldmkit.models.embeddings.Embeddings): textual inversion names in
    the prompts become their vectors (web UI mode). `clip_skip`: the layer read (None: the model's
    own). `max_chunks`: prompts of more 75-token chunks are refused before any is encoded (each chunk
    lengthens every cross-attention of every step). A text encoder that pools (SDXL's conditioner)
    also gives the pooled vectors."""
    check_prompt_mode(mode)
    device = next(text_encoder.parameters()).device
    pools = hasattr(text_encoder, "encode_texts")  # SDXL's conditioner
    encode_ids = text_encoder.encode_ids if clip_skip is None else partial(text_encoder.encode_ids, clip_skip=clip_skip)
    if mode == "truncate":
        used = [n for t in prompts + (negatives or []) for n in (embeddings.used_in(t) if embeddings else [])]
        if used:
            raise ConfigError(f"embedding {used[0]!r} in a prompt: textual inversion works in the webui prompt mode")

        def plain(texts):
            if pools:
                return text_encoder.encode_texts(texts, clip_skip)
            t = text_encoder.tokenizer(texts)
            return encode_ids(t["input_ids"].to(device), t["attention_mask"].to(device)), None

        (context, pooled), (uncond, uncond_pooled) = (
            plain(prompts),
            (plain(negatives) if negatives is not None else (None, None)),
        )
        return PromptStates(context, uncond, pooled, uncond_pooled)

    if pools:
        encode = partial(text_encoder.encode_with_pooled, clip_skip=clip_skip)
    else:
        encode = lambda ids, mask: (encode_ids(ids, mask), None)  # noqa: E731
    tok = text_encoder.tokenizer
    size = tok.max_length - 2
    bos, eos, pad = tok.special_ids
    comma = (tok.content_ids(",") or [None])[0]

    content = embeddings.tokenize(tok.content_ids) if embeddings is not None else tok.content_ids

    def split(texts):
        return [tokenize_weighted(t, content, size, comma) for t in texts]

    everything = split(prompts) + (split(negatives) if negatives is not None else [])
    k = max(len(c.ids) for c in everything)
    if max_chunks is not None and k > max_chunks:
        raise ConfigError(
            f"prompt: {k} chunks of {size} tokens (BREAK starts a new one); allowed: at most {max_chunks}"
        )
    encoded, pooled = [], []
    for chunks in everything:
        per_chunk = []
        for j in range(k):
            toks = chunks.ids[j] if j < len(chunks.ids) else []
            ws = chunks.weights[j] if j < len(chunks.weights) else []
            ids = torch.tensor([[bos] + toks + [eos] + [pad] * (size - len(toks))], device=device)
            mask = torch.tensor([[1] * (len(toks) + 2) + [0] * (size - len(toks))], device=device)
            w = torch.tensor([1.0] + ws + [1.0] * (size + 1 - len(ws)), device=device)
            z, p = encode(ids, mask)
            if j == 0:
                pooled.append(p)
            per_chunk.append((z[0], w))
        encoded.append(_weighted(per_chunk))
    n = len(prompts)
    context = torch.stack(encoded[:n])
    uncond = torch.stack(encoded[n:]) if negatives is not None else None
    if not pools:
        return PromptStates(context, uncond)
    return PromptStates(
        context, uncond, torch.cat(pooled[:n]), torch.cat(pooled[n:]) if negatives is not None else None
    )


def _weighted(per_chunk: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The chunks' states joined, each token's multiplied by its weight, the mean restored."""
    z = torch.cat([c[0] for c in per_chunk])
    w = torch.cat([c[1] for c in per_chunk])
    if bool((w != 1).any()):
        mean = z.mean()
        z = z * w[:, None]
        # The web UI's rule restores the mean; it is undefined when the mean is ~0 (a text tower
        # whose final norm has no bias, e.g. random weights): then the weights stand alone.
        if z.mean().abs() > 1e-4 * z.abs().mean():
            z = z * (mean / z.mean())
    return z
