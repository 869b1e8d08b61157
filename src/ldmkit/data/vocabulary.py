"""The words a model was trained on. A model trained on a closed world (the shapes world, a small
captioned set) knows only its captions' words, and a prompt's other words change nothing it draws: they
are reported, never silently ignored. A model trained on many words (an open vocabulary) has none."""

import itertools
import re
from collections.abc import Iterable
from functools import lru_cache

MAX_CLOSED = 2000  # distinct words: more, and the captions are an open vocabulary (no warning would help)
# the web UI's prompt syntax is not words: <lora:...> tags, BREAK, emphasis weights (":1.2")
_SYNTAX = re.compile(r"<[^>]*>|\bBREAK\b|:\s*[-+]?\d*\.?\d+")
_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return _WORD.findall(_SYNTAX.sub(" ", text).lower())


def caption_vocabulary(captions: Iterable[str]) -> tuple[str, ...]:
    """Every word of the captions, sorted; () when there are more than MAX_CLOSED (an open vocabulary)."""
    seen: set[str] = set()
    for caption in captions:
        seen.update(words(caption))
        if len(seen) > MAX_CLOSED:
            return ()
    return tuple(sorted(seen))


def grown(vocabulary: tuple[str, ...], captions: Iterable[str]) -> tuple[str, ...]:
    """A closed vocabulary with the captions' words added; an open one, (), stays open."""
    return caption_vocabulary(itertools.chain(vocabulary, captions)) if vocabulary else ()


def unknown_words(texts: Iterable[str], vocabulary: Iterable[str]) -> list[str]:
    """The texts' words outside `vocabulary`, each once, in order; none when there is no vocabulary."""
    known = set(vocabulary)
    if not known:
        return []
    out: list[str] = []
    for text in texts:
        out += [w for w in words(text) if w not in known and w not in out]
    return out


@lru_cache(maxsize=1)
def shapes_vocabulary(n: int = 2000) -> tuple[str, ...]:
    """The words of the shapes world's training captions (those the bundled shapes models learned); 2000
    captions hold every word 5000 do."""
    from ldmkit.data.shapes import sample_scene

    return caption_vocabulary(sample_scene("train", i).caption for i in range(n))
