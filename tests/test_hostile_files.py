"""Names and files a hostile request or command line can give: a LoRA named in a prompt resolves only to a
file inside the LoRA folder, refusals read the same whether or not the file exists elsewhere, prompts
read no file, and images declaring huge sizes are refused before they are decoded."""

import os

import pytest
import torch
from test_bad_input import png_declaring

from ldmkit.checkpoints.lora_files import find_lora, list_loras
from ldmkit.errors import ConfigError


def refusal(name: str, folder) -> str:
    """find_lora's message for `name`, with the name itself blanked out so that two can be compared."""
    with pytest.raises(ConfigError) as e:
        find_lora(name, folder)
    message = str(e.value)
    assert "\n" not in message
    return message.replace(repr(name), "NAME")


@pytest.fixture
def lora_folder(tmp_path):
    """loras/ (style, a symlink out of it, a dangling one, a subfolder) beside outside/secret."""
    loras, outside = tmp_path / "loras", tmp_path / "outside"
    loras.mkdir()
    outside.mkdir()
    (loras / "style.safetensors").write_bytes(b"inside")
    (outside / "secret.safetensors").write_bytes(b"outside")
    (loras / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (loras / "dangling.safetensors").symlink_to(outside / "nosuch.safetensors")
    (loras / "sub").mkdir()
    (loras / "sub" / "deep.safetensors").write_bytes(b"inside, one level down")
    (loras / "folder.safetensors").mkdir()  # a folder with a LoRA suffix is not a LoRA
    return loras, outside


def test_a_lora_name_resolves_only_inside_its_folder(lora_folder):
    loras, outside = lora_folder
    assert find_lora("style", loras) == loras / "style.safetensors"
    assert find_lora("style", str(loras)) == loras / "style.safetensors"
    missing = refusal("nosuch", loras)
    assert missing.startswith("unknown LoRA NAME") and "available: style" in missing
    assert str(outside) not in missing


# (a name for a file that exists outside the folder, the same name for one that does not)
ESCAPES = {
    "relative": ("../outside/secret", "../outside/nosuch"),
    "through the folder": ("../loras/../outside/secret", "../loras/../outside/nosuch"),
    "absolute": ("{outside}/secret", "{outside}/nosuch"),
    "symlink": ("link", "dangling"),
    "symlink via a subfolder": ("sub/../link", "sub/../dangling"),
    "subfolder": ("sub/deep", "sub/nosuch"),
    "a folder with a LoRA suffix": ("folder", "nofolder"),
}


@pytest.mark.parametrize("exists, absent", ESCAPES.values(), ids=ESCAPES.keys())
def test_a_name_leaving_the_folder_is_refused_like_a_missing_one(lora_folder, exists, absent):
    loras, outside = lora_folder
    exists, absent = exists.format(outside=outside), absent.format(outside=outside)
    assert refusal(exists, loras) == refusal(absent, loras) == refusal("nosuch", loras)


@pytest.mark.parametrize("name", ["style\0", "..", ".", "/", "C:/x", "C:style", "\\\\host\\share\\style", "a" * 5000])
def test_odd_names_are_refused_like_a_missing_one(lora_folder, name):
    loras, _ = lora_folder
    assert refusal(name, loras) == refusal("nosuch", loras)


def test_only_findable_names_are_listed_and_the_list_is_bounded(lora_folder, tmp_path):
    loras, _ = lora_folder
    assert list_loras(loras) == ["style"]
    many = tmp_path / "many"
    many.mkdir()
    for i in range(200):
        (many / f"lora{i:03d}.pt").write_bytes(b"x")
    assert [find_lora(n, many).name for n in list_loras(many)] == [f"lora{i:03d}.pt" for i in range(200)]
    message = refusal("nosuch", many)
    assert len(message) < 600 and "lora000" in message and "lora199" not in message and "more" in message
    assert refusal("x", None) == refusal("../x", None)


def test_prompts_read_no_embedding_file(tmp_path, monkeypatch):
    """Only embeddings loaded from the folder are known by name; a prompt naming a file reads nothing."""
    from safetensors.torch import save_file

    from ldmkit.checkpoints import files
    from ldmkit.models import embeddings as embeddings_module
    from ldmkit.models.embeddings import Embeddings
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny
    from ldmkit.models.prompts import encode_prompts

    encoder = LatentDiffusion(tiny()).text_encoder.eval()
    folder, outside = tmp_path / "embeddings", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    emb = Embeddings(encoder)
    dim = emb._token_embedding().embedding_dim
    save_file({"emb_params": torch.randn(2, dim)}, str(folder / "mine.safetensors"))
    save_file({"emb_params": torch.randn(2, dim)}, str(outside / "theirs.safetensors"))
    assert emb.load_folder(folder) == ["mine"]

    def spy(*args, **kwargs):
        raise AssertionError(f"read {args}")

    for module, name in ((files, "read_tensors"), (files, "safe_torch_load"), (embeddings_module, "read_embedding")):
        monkeypatch.setattr(module, name, spy)
    rel = os.path.relpath(outside / "theirs", folder)
    for prompt in (f"a {rel}", f"a {outside / 'theirs.safetensors'}", "a <embedding:../outside/theirs>", "a theirs"):
        assert emb.used_in(prompt) == []
        with torch.no_grad():
            encode_prompts(encoder, [prompt], None, "webui", emb)
    assert emb.used_in("a mine, mine") == ["mine", "mine"]


def test_emoji_eval_refuses_a_huge_image_in_one_line(tmp_path):
    from ldmkit.evaluation.emoji_eval import load_set

    (tmp_path / "a.png").write_bytes(png_declaring(100_000, 100_000))
    (tmp_path / "a.txt").write_text("grinning face, smileys & emotion, noto style")
    with pytest.raises(ConfigError, match="declares more than") as e:
        load_set(tmp_path, 16)
    assert str(tmp_path / "a.png") in str(e.value) and "\n" not in str(e.value)
