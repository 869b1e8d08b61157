"""train-lora and train-embedding on SDXL, on a random tiny SDXL model made by tests/test_sdxl.py (two
towers, CLIP-L and OpenCLIP-bigG, a UNet with the "text_time" addition embedding).

The training loss is the reference's (diffusers' train_text_to_image_lora_sdxl.py) computed by hand with
diffusers' own UNet, text towers and scheduler: the UNet is given the pooled bigG vector and the
micro-conditioning of an uncropped image of the training size, and a dropped caption is the encoded
empty prompt, pooled vector included. A trained LoRA (UNet and both towers) is saved in the kohya layout
(`lora_unet_` by the original sgm names, `lora_te1_`, `lora_te2_`) and the diffusers layout, and both
files, read by ldmkit or by diffusers' load_lora_weights, give the trained model's UNet output and towers'
states within 1e-5 of their scale. A trained embedding is saved as {clip_l, clip_g} and gives, in ldmkit
and in diffusers (load_textual_inversion once per tower), the same prompt states."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from test_sdxl import build, draw

from conftest import losses
from ldmkit.checkpoints.lora_files import read_lora
from ldmkit.checkpoints.single_file import load_model
from ldmkit.cli import main
from ldmkit.config import from_dict
from ldmkit.errors import ConfigError
from ldmkit.models.embeddings import Embeddings, read_embedding, token_embedding
from ldmkit.models.lora import LoraSet
from ldmkit.models.prompts import encode_prompts
from ldmkit.nn.embedding import size_embedding
from ldmkit.training.latent_task import TextStates
from ldmkit.training.loop import Trainer
from ldmkit.training.lora import LoraTask, LoraTrainConfig

BASE, REFINER = 9, 3  # draw(9): two towers, 3 UNet levels, an autoencoder that does not downsample
SIZE = 8  # training images: 8x8 latents through this autoencoder
PROMPTS = ["a red circle above a blue square", "two green stars"]
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]
RUN = dict(steps=3, batch_size=4, lr=0.05, warmup=1, log_every=1, eval_every=3, sample_every=3, ckpt_every=3)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A random tiny SDXL base model as a diffusers folder, and its configuration."""
    root = tmp_path_factory.mktemp("sdxl-train")
    spec = draw(BASE)
    assert not spec["refiner"] and len(spec["towers"]) == 2
    build(spec, root / "pipe", BASE)
    return spec, root / "pipe"


def config(folder, run_dir, **changes) -> dict:
    """A tiny run's config (the fields every latent task has), with `changes`."""
    data = dict(
        base=str(folder),
        data=dict(kind="shapes", split="train", n=8, size=SIZE),
        run=dict(dir=str(run_dir), seed=0, **RUN),
        sample=dict(prompts=["a red circle"], seeds=[0], steps=2, cfg=3.0, size=16),
        val_batches=1,
        cond_dropout=0.25,
    )
    data.update(changes)
    return data


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((ours - ref).abs().max() <= tol * max(1.0, float(ref.abs().max())))


def unet_inputs(spec: dict):
    g = torch.Generator().manual_seed(0)
    u = spec["unet"]
    x = torch.randn(2, 4, SIZE, SIZE + 4, generator=g)
    ctx = torch.randn(2, 5, u["cross_attention_dim"], generator=g)
    text_embeds = torch.randn(2, spec["towers"][-1]["projection_dim"], generator=g)
    time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 40, 40]])
    return x, torch.tensor([3, 901]), ctx, text_embeds, time_ids


@torch.no_grad()
def ours_of(model, spec: dict) -> tuple[torch.Tensor, ...]:
    """Our UNet output and both towers' states (side by side) and pooled vector."""
    x, t, ctx, text_embeds, time_ids = unet_inputs(spec)
    y = torch.cat([text_embeds, size_embedding(time_ids, spec["unet"]["addition_time_embed_dim"])], dim=-1)
    return (model.unet(x, t, ctx, y=y), *model.text_encoder.encode_texts(PROMPTS))


@torch.no_grad()
def theirs_of(ref, spec: dict) -> tuple[torch.Tensor, ...]:
    x, t, ctx, text_embeds, time_ids = unet_inputs(spec)
    out = ref.unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    hidden, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    return out, hidden, pooled


def reference_encode(ref, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_prompt of diffusers' train_text_to_image_lora_sdxl.py: each tower its own tokenizer (padded
    to 77), the penultimate layer's states side by side, the last tower's projected pooled output."""
    states = []
    for tokenizer, encoder in ((ref.tokenizer, ref.text_encoder), (ref.tokenizer_2, ref.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = encoder(ids.input_ids, output_hidden_states=True)
        pooled = out[0]
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def test_the_sdxl_loss_is_the_references_with_pooled_vector_and_micro_conditioning(sdxl, tmp_path):
    """The loss of one batch (latents known, noise, timesteps and dropout drawn per sample) equals the
    reference's computed with diffusers' networks; with other micro-conditioning it would not."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    spec, folder = sdxl
    task = LoraTask(from_dict(LoraTrainConfig, config(folder, tmp_path / "run", cond_dropout=0.5)))
    mean = torch.randn(4, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    task.cache = {"mean": mean, "std": torch.zeros_like(mean)}  # z0 = the scaled mean exactly
    items, gs = [0, 1, 2, 3], [0, 1, 2, 3]
    captions = [task.data.caption(i) for i in items]
    with torch.no_grad():
        loss = task.loss(None, items, captions, gs).item()
        z0, t, eps, u = task.draw(items, None, gs, 1000)
    dropped = (u < 0.5).tolist()
    assert any(dropped) and not all(dropped), u  # both kinds of sample in the batch

    ref = StableDiffusionXLPipeline.from_pretrained(str(folder))
    scheduler = DDPMScheduler.from_config(ref.scheduler.config)

    @torch.no_grad()
    def reference_loss(crop=(0, 0)) -> float:
        context, pooled = reference_encode(ref, ["" if d else c for c, d in zip(captions, dropped)])
        time_ids = torch.tensor([[SIZE, SIZE, *crop, SIZE, SIZE]] * len(items), dtype=torch.float32)
        noisy = scheduler.add_noise(z0, eps, t)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        pred = ref.unet(noisy, t, context, added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), eps.float(), reduction="mean").item()  # epsilon: the target is the noise

    want = reference_loss()
    assert math.isfinite(loss) and abs(loss - want) <= 1e-5 * want, (loss, want)
    assert abs(reference_loss(crop=(4, 0)) - want) > 1e-3 * want  # the check sees the micro-conditioning


def trained_lora(folder, run_dir):
    data = config(folder, run_dir, name="xl", rank=4, alpha=2.0, text_target_modules=TEXT)
    data["target_modules"] = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "in_layers.2"]
    c = from_dict(LoraTrainConfig, data)
    task = LoraTask(c)
    Trainer(task, c.run, config_record=data).fit(progress=False)
    return task


def test_train_lora_on_sdxl_adapts_the_unet_and_both_towers_and_its_files_equal_diffusers(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    spec, folder = sdxl
    run = tmp_path / "run"
    task = trained_lora(folder, run)
    assert len(losses(run)) == 3 and all(math.isfinite(v) for v in losses(run))
    assert (run / "samples" / "samples-00000003.png").exists()
    trained = {n.split(".")[0] + n.split(".")[1] if net == "text" else net for net, n in task.layers}
    assert trained == {"unet", "embedders0", "embedders1"}  # the UNet and each tower
    still = {n for (_, n), m in task.layers.items() if not m.lora_B["default"].weight.abs().max() > 0}
    # every layer moved but CLIP-L's last, whose output nothing reads (SDXL reads its penultimate layer)
    assert {n.rsplit(".", 1)[0] for n in still} == {"embedders.0.transformer.text_model.encoder.layers.2.self_attn"}

    kohya, diffusers = load_file(str(run / "xl.safetensors")), load_file(str(run / "xl-diffusers.safetensors"))
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # sd-scripts' names for SDXL's UNet
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    assert {k.split(".")[0] for k in diffusers} == {"unet", "text_encoder", "text_encoder_2"}

    base = load_model(folder)
    plain = ours_of(base, spec)
    task.model.requires_grad_(False).eval()
    want = ours_of(task.model, spec)
    for a, b, what in zip(want, plain, ("UNet", "towers' states", "pooled vector")):
        assert (a - b).abs().mean() > 1e-2, f"the trained LoRA changes nothing in the {what}"
    for name in ("xl", "xl-diffusers"):
        path = run / f"{name}.safetensors"
        fresh = load_model(folder)
        LoraSet(fresh).apply([(read_lora(path, fresh), 1.0)])
        for (net, n), m in task.layers.items():  # the merged weights are the trained layers'
            module = (fresh.unet if net == "unet" else fresh.text_encoder).get_submodule(n)
            merged = m.get_base_layer().weight + m.get_delta_weight("default")
            assert close(module.weight, merged), (name, n)
        for a, b, what in zip(want, ours_of(fresh, spec), ("UNet", "towers' states", "pooled vector")):
            assert close(b, a), f"{name} read by ldmkit: {what} differ by {(a - b).abs().max():.2e}"
        ref = StableDiffusionXLPipeline.from_pretrained(str(folder))
        ref.load_lora_weights(str(path))
        for a, b, what in zip(want, theirs_of(ref, spec), ("UNet", "towers' states", "pooled vector")):
            assert close(b, a), f"{name} read by diffusers: {what} differ by {(a - b).abs().max():.2e}"
    metadata = json.loads(read_metadata(run / "xl-diffusers.safetensors")["lora_adapter_metadata"])
    assert metadata["text_encoder_2.r"] == 4 and metadata["unet.lora_alpha"] == 2.0


def read_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_train_embedding_on_sdxl_saves_a_vector_pair_that_diffusers_reads_alike(sdxl, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    spec, folder = sdxl
    data = config(folder, tmp_path / "run", word="crimsonish", init_words="deep red", replace="red")
    data["sample"]["prompts"] = ["a crimsonish circle"]
    (tmp_path / "emb.yaml").write_text(yaml.safe_dump(data))
    assert main(["train-embedding", "--config", str(tmp_path / "emb.yaml"), "-q"]) == 0
    path = tmp_path / "run" / "crimsonish.safetensors"
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["embedding"] == str(path)
    assert len(losses(tmp_path / "run")) == 3 and all(math.isfinite(v) for v in losses(tmp_path / "run"))
    vectors = read_embedding(path)
    widths = [t["hidden_size"] for t in spec["towers"]]
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {"clip_l": (2, widths[0]), "clip_g": (2, widths[1])}

    ours = load_model(folder)
    te = ours.text_encoder
    ids = te.tokenizer.content_ids("deep red")
    for key, tower in zip(("clip_l", "clip_g"), te.embedders):  # each tower moved from its own start
        start = token_embedding(tower).weight[ids]
        assert not torch.allclose(vectors[key], start), key
    emb = Embeddings(te)
    assert emb.load(path) == "crimsonish"
    prompt = "a crimsonish circle on a mat"
    with torch.no_grad():
        got = encode_prompts(te, [prompt], mode="webui", embeddings=emb)
        plain = encode_prompts(te, [prompt], mode="webui")  # the word as text, not the embedding
    assert (got.context - plain.context).abs().mean() > 1e-3 and (got.pooled - plain.pooled).abs().mean() > 1e-3

    ref = StableDiffusionXLPipeline.from_pretrained(str(folder))
    for key, encoder, tokenizer in (
        ("clip_l", ref.text_encoder, ref.tokenizer),
        ("clip_g", ref.text_encoder_2, ref.tokenizer_2),
    ):
        ref.load_textual_inversion(vectors[key], token="crimsonish", text_encoder=encoder, tokenizer=tokenizer)
    with torch.no_grad():
        want, _, want_pooled, _ = ref.encode_prompt([prompt], device="cpu", do_classifier_free_guidance=False)
    assert close(got.context, want), f"hidden states differ by {(got.context - want).abs().max():.2e}"
    assert close(got.pooled, want_pooled), f"pooled vectors differ by {(got.pooled - want_pooled).abs().max():.2e}"


def test_dropped_captions_drop_the_pooled_vector_too(sdxl, tmp_path):
    """Condition dropout on SDXL: the empty prompt's states and pooled vector, as encoded at the start."""
    spec, folder = sdxl
    task = LoraTask(from_dict(LoraTrainConfig, config(folder, tmp_path / "run")))
    seen = {}
    task.predict = lambda zt, t, context, extra, y: seen.update(context=context, y=y) or torch.zeros_like(zt)
    mean = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    task.cache = {"mean": mean, "std": torch.zeros_like(mean)}
    task.config.cond_dropout = 0.999  # every caption dropped
    with torch.no_grad():
        task.loss(None, [0, 1], PROMPTS, [0, 1])
        empty: TextStates = task.text_states(["", ""])
    pooled_dim = spec["towers"][-1]["projection_dim"]
    assert torch.equal(seen["context"], empty.context) and torch.equal(seen["y"][:, :pooled_dim], empty.pooled)


def test_the_refiner_and_the_tasks_without_sdxl_conditioning_are_refused_in_one_line(sdxl, tmp_path):
    """The refiner's micro-conditioning is an aesthetic score no training data says; ControlNet training
    and LCM distillation do not give the UNet its `y`."""
    from ldmkit.training.controlnet import ControlNetTask, ControlNetTrainConfig

    spec = draw(REFINER)
    assert spec["refiner"]
    build(spec, tmp_path / "refiner", REFINER)
    with pytest.raises(ConfigError, match="the SDXL refiner .* cannot be trained") as e:
        LoraTask(from_dict(LoraTrainConfig, config(tmp_path / "refiner", tmp_path / "run")))
    assert "\n" not in str(e.value)
    data = config(sdxl[1], tmp_path / "control")
    del data["sample"]
    with pytest.raises(ConfigError, match="^train-controlnet: SDXL-style models .* not supported") as e:
        ControlNetTask(from_dict(ControlNetTrainConfig, data))
    assert "\n" not in str(e.value)


def test_an_sd1_lora_in_the_diffusers_layout_loads_in_diffusers(tmp_path):
    """The diffusers file's metadata holds each network's PEFT config under its prefix (`unet.r`,
    `text_encoder.lora_alpha`, ...), from which diffusers builds the adapters: also for SD 1.x (a tiny
    diffusers SD pipeline, CLIP tower), where both files equal the trained model in diffusers."""
    from diffusers import StableDiffusionPipeline

    from conftest import tiny_pipeline

    tiny_pipeline(tmp_path / "sd1")
    data = config(tmp_path / "sd1", tmp_path / "run", rank=4, alpha=2.0, text_target_modules=TEXT)
    data["data"]["size"] = 32
    task = LoraTask(from_dict(LoraTrainConfig, data))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in task.adapters.parameters():
            p.normal_(0, 0.1)  # as if trained: PEFT starts lora_B at zero
    task.finish(tmp_path)
    task.model.requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    ctx = torch.randn(1, 77, task.unet.config.context_dim, generator=g)
    te = task.model.text_encoder
    with torch.no_grad():
        want = task.unet(x, t, ctx), te.encode_ids(te.tokenizer(PROMPTS)["input_ids"])
    for name in ("lora", "lora-diffusers"):
        ref = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd1"), safety_checker=None)
        ref.load_lora_weights(str(tmp_path / f"{name}.safetensors"))
        with torch.no_grad():
            got = ref.unet(x, t, ctx).sample, ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        for a, b, what in zip(want, got, ("UNet", "text states")):
            assert close(b, a), f"{name} read by diffusers: {what} differ by {(a - b).abs().max():.2e}"
