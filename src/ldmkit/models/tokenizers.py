"""Tokenizers. A model folder's own tokenizer is used when it has one (its vocabulary, merges, added
tokens such as textual-inversion words, special tokens and length). A single-file checkpoint carries
none, so the CLIP BPE vocabulary ships with ldmkit (clip_bpe/, MIT, OpenAI) and is rebuilt here into
the vocabulary transformers' CLIPTokenizer takes; ldmkit's own single files carry the folder's
tokenizer in their header when it is not that one. So does T5 v1.1's (SD3's third tower; t5_tokenizer/,
Apache-2.0, Google), for SD3 single files and standalone T5 files, which carry none. The BERT-family
tokenizer comes from the folder of the encoder it belongs to."""

import functools
import gzip
import html
import json
import tempfile
from importlib import resources
from pathlib import Path

import ftfy
import torch

CLIP_VOCAB_SIZE = 49408
FILES = ("tokenizer.json", "tokenizer_config.json")  # what transformers writes for a CLIPTokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: printable bytes map to
    themselves and come first; the others follow, mapped to code points from 256 up. The order
    matters: it is the order of the first 256 vocabulary ids."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


@functools.cache
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json in CLIP's exact order: 256 byte symbols, their 256 `</w>` forms, one token per
    merge (48,894), then the two specials -- 49,408 ids."""
    path = resources.files("ldmkit.models") / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(tokens) == CLIP_VOCAB_SIZE
    return {t: i for i, t in enumerate(tokens)}, merges


def clean_prompt(text: str) -> str:
    """CLIP's own text cleaning (fix mojibake, unescape HTML entities twice, trim), which
    transformers' fast tokenizer leaves out; without it "&amp;" tokenizes differently."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class ClipTokenizer:
    """Prompts -> [B, max_length] ids: BOS, up to max_length - 2 tokens, EOS, then padding.
    SD 1 pads with EOS; SD 2 (OpenCLIP) pads with "!" (id 0)."""

    def __init__(self, max_length: int = 77, pad_token: str = EOS, hf=None):
        """hf: a transformers CLIPTokenizer to use (a folder's); by default the bundled vocabulary."""
        from transformers import CLIPTokenizer

        self.max_length = max_length
        self.pad_token = pad_token
        if hf is None:
            vocab, merges = clip_vocab_and_merges()
            hf = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length)
        self.hf = hf

    @classmethod
    def from_folder(cls, folder: Path, max_length: int) -> "ClipTokenizer":
        """A diffusers/transformers tokenizer folder, read offline. Prompts are padded to its
        model_max_length, but never beyond the text encoder's positions (`max_length`)."""
        from transformers import CLIPTokenizer

        hf = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        length = min(int(hf.model_max_length), max_length)
        return cls(length, hf.pad_token, hf)

    def to_header(self) -> str:
        """The whole tokenizer as one string (its tokenizer.json and tokenizer_config.json), for a
        single file's header."""
        with tempfile.TemporaryDirectory() as d:
            self.hf.save_pretrained(d)
            return json.dumps({name: (Path(d) / name).read_text() for name in FILES})

    @classmethod
    def from_header(cls, text: str, max_length: int, where: str) -> "ClipTokenizer":
        try:
            files = json.loads(text)
            with tempfile.TemporaryDirectory() as d:
                for name in FILES:
                    (Path(d) / name).write_text(files[name])
                return cls.from_folder(Path(d), max_length)
        except (ValueError, KeyError, TypeError, OSError) as e:
            from ldmkit.errors import CheckpointError

            raise CheckpointError(f"{where}: the tokenizer in the file header cannot be read ({e})") from None

    def is_bundled(self) -> bool:
        """Whether this is the CLIP vocabulary ldmkit ships (so a single file need not carry it)."""
        vocab, _ = clip_vocab_and_merges()
        return len(self.hf) == CLIP_VOCAB_SIZE and self.hf.get_vocab() == vocab

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = self.hf(
            [clean_prompt(p) for p in prompts],
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def same_vocabulary(self, other: "ClipTokenizer") -> bool:
        return self.hf.get_vocab() == other.hf.get_vocab()

    def save(self, folder: Path) -> None:
        """Write a diffusers/transformers tokenizer folder (vocab.json, merges.txt, config)."""
        self.hf.save_pretrained(str(folder))

    def content_ids(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS (for chunked, weighted prompts)."""
        return self.hf(clean_prompt(text), add_special_tokens=False)["input_ids"] if text.strip() else []

    @property
    def special_ids(self) -> tuple[int, int, int]:
        """(start, end, pad) ids."""
        return self.hf.bos_token_id, self.hf.eos_token_id, self.hf.pad_token_id


class BertTokenizer:
    """WordPiece tokenizer of a BERT-family encoder, padded to a fixed length with its mask."""

    def __init__(self, folder: Path, max_length: int = 77):
        from transformers import AutoTokenizer

        self.max_length = max_length
        self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = self.hf(
            list(prompts), max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def save(self, folder: Path) -> None:
        self.hf.save_pretrained(str(folder))

    def content_ids(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"] if text.strip() else []

    @property
    def special_ids(self) -> tuple[int, int, int]:
        """(start, end, pad) ids: [CLS], [SEP], [PAD]."""
        return self.hf.cls_token_id, self.hf.sep_token_id, self.hf.pad_token_id


T5_FILES_FOLDER = "t5_tokenizer"


class T5Tokenizer:
    """T5's SentencePiece (Unigram) tokenizer, from a model folder's own files (transformers'
    T5TokenizerFast, offline), or without a folder T5 v1.1's, which ships with ldmkit: no start token,
    the end-of-text token `</s>` last, padded with `<pad>`. The length is the caller's (SD3: its
    max_sequence_length), not the tokenizer's."""

    def __init__(self, folder: Path | None = None):
        from transformers import T5TokenizerFast

        folder = bundled_t5_folder() if folder is None else folder
        self.hf = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)

    def __len__(self) -> int:
        return len(self.hf)

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        """[B, max_length] ids, truncated (keeping `</s>` last) and padded to max_length."""
        out = self.hf(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return out["input_ids"]

    def lengths(self, prompts: list[str]) -> list[int]:
        """Each prompt's whole length in tokens, `</s>` included (what truncation would cut from)."""
        return [len(ids) for ids in self.hf(list(prompts), verbose=False)["input_ids"]]

    def save(self, folder: Path) -> None:
        self.hf.save_pretrained(str(folder))

    def is_bundled(self) -> bool:
        """Whether this is T5 v1.1's vocabulary, the one ldmkit ships (so a single file need not carry it)."""
        return _t5_model(self.hf) == _t5_model(T5Tokenizer().hf)

    def to_header(self) -> str:
        """The whole tokenizer as one string (the files save_pretrained writes), for a single file's header."""
        with tempfile.TemporaryDirectory() as d:
            self.hf.save_pretrained(d)
            return json.dumps({p.name: p.read_text() for p in sorted(Path(d).iterdir()) if p.is_file()})

    @classmethod
    def from_header(cls, text: str, where: str) -> "T5Tokenizer":
        try:
            files = json.loads(text)
            with tempfile.TemporaryDirectory() as d:
                for name, content in files.items():
                    if Path(name).name != name:
                        raise ValueError(f"file name {name!r}")
                    (Path(d) / name).write_text(content)
                return cls(Path(d))
        except (ValueError, TypeError, AttributeError, OSError) as e:
            from ldmkit.errors import CheckpointError

            raise CheckpointError(f"{where}: the T5 tokenizer in the file header cannot be read ({e})") from None


def bundled_t5_folder() -> Path:
    return Path(str(resources.files("ldmkit.models") / T5_FILES_FOLDER))


def _t5_model(hf) -> dict:
    """The vocabulary and scores of a fast tokenizer (its `model` section)."""
    return json.loads(hf.backend_tokenizer.to_str())["model"]
