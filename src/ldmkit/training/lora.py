"""`ldmkit train-lora`: a LoRA for a frozen model's UNet, trained with the shared loop (resume, sample
grids, latent cache) and saved in the kohya layout and the diffusers/PEFT layout (models/lora.py reads both).

The adapters are PEFT's (`inject_adapter_in_model`), which fit our modules as they are: attention
projections by default, convolutions too when listed (LoCon), and the text tower's layers when
`text_target_modules` names them -- on SDXL, both towers' (CLIP-L and OpenCLIP-bigG). With `prior`, half
of every batch comes from regularisation images (prior preservation), which keeps a LoRA trained on a
few dozen images from overwriting the rest.

Files are named as the tools that read them expect: kohya's UNet layers by diffusers' module names for
SD 1.x/2.x (sd-scripts trains diffusers' UNet there) and by the original (sgm) names for SDXL (sd-scripts
trains the original SDXL code), the towers as `lora_te_` (one tower) or `lora_te1_` / `lora_te2_`; the
diffusers layout by `unet.`, `text_encoder.`, `text_encoder_2.`, with each network's PEFT config (rank,
alpha, target modules) in the metadata, as diffusers' save_lora_weights writes it."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.checkpoints.files import write_safetensors
from ldmkit.data.images import DataConfig, MixedOrder, PriorMix, open_dataset
from ldmkit.errors import ConfigError
from ldmkit.training.latent_task import DenoisingTrainConfig, LatentTask, SampleConfig, TextStates, load_frozen


@dataclass
class LoraTrainConfig(DenoisingTrainConfig):
    # Regularisation images from what the base already draws, half of every batch, so that a few dozen
    # new images do not overwrite it (prior preservation); none: the instance images only.
    prior: DataConfig | None = None
    base: str = ""  # the frozen model (ours, an SD file, a diffusers folder)
    rank: int = 8
    alpha: float = 8.0
    # Module name suffixes in our (original SD) layout, as PEFT matches them; in_layers.2 / out_layers.3 are
    # the resnets' convolutions (LoCon).
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # The text tower's layers to adapt too (empty: UNet only), e.g. q_proj, k_proj, v_proj, out_proj for
    # CLIP (on SDXL, both towers), or query, key, value for BERT-style towers such as MiniLM.
    text_target_modules: tuple[str, ...] = ()
    ema_decay: float = 0.0  # 0: the live weights are the result
    name: str = "lora"  # the saved files: NAME.safetensors (kohya) and NAME-diffusers.safetensors
    sample: SampleConfig = field(default_factory=SampleConfig)

    frozen_model = ("base", "the model to adapt")

    def check(self) -> None:
        if self.rank <= 0 or self.alpha <= 0:
            raise ConfigError(f"rank {self.rank}, alpha {self.alpha}; allowed: positive")
        super().check()


class LoraTask(LatentTask):
    name = "lora"

    def __init__(self, config: LoraTrainConfig):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        model = load_frozen(config.base)
        torch.manual_seed(config.run.seed)
        self.layers: dict[tuple[str, str], nn.Module] = {}
        for net, targets in (("unet", config.target_modules), ("text", config.text_target_modules)):
            if not targets:
                continue
            module = model.unet if net == "unet" else model.text_encoder
            peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(targets))
            try:
                inject_adapter_in_model(peft_config, module)
            except ValueError as e:
                raise ConfigError(f"{net} target modules {list(targets)}: {e}") from None
            self.layers.update({(net, n): m for n, m in module.named_modules() if isinstance(m, LoraLayer)})
        adapters = nn.ModuleDict()
        for (net, n), m in self.layers.items():
            key = f"{net}__" + n.replace(".", "__")
            adapters[key + "__down"] = m.lora_A["default"]
            adapters[key + "__up"] = m.lora_B["default"]
        self.adapters = adapters
        super().__init__(config, model, adapters)
        if config.prior is not None:
            self.data = PriorMix(self.data, open_dataset(config.prior))
            self.order = MixedOrder(self.data, config.run.seed)
        adapters.requires_grad_(True)  # after the base class, which freezes the text tower
        self.model.unet.eval()  # dropout-free base; the adapters train

    def text_states(self, captions: list[str]) -> TextStates:
        """With gradients when the text towers have adapters (the base class encodes without any). The
        empty prompt for condition dropout is encoded once, at the start."""
        if not self.config.text_target_modules:
            return super().text_states(captions)
        from ldmkit.models.prompts import encode_prompts

        with torch.enable_grad():
            states = encode_prompts(self.model.text_encoder, captions, None, mode="truncate")
        return TextStates(states.context, states.pooled)

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.pipelines import Pipeline

        with self.ema.applied():
            self.prompt_grid(Pipeline(self.model, name=f"step-{step}"), step, folder)

    def layer_names(self) -> dict[tuple[str, str], tuple[str, str, str]]:
        """Each adapted layer's (kohya name, diffusers network, module path in that network)."""
        from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers
        from ldmkit.checkpoints.lora_files import _text_towers

        unet = [n for net, n in self.layers if net == "unet"]
        theirs = rename({n + ".weight": None for n in unet}, unet_to_diffusers(self.model.config.unet))
        sgm = self.model.config.conditioner  # SDXL: sd-scripts names the UNet as the original code
        names = {}
        for n, k in zip(unet, theirs):
            path = k[: -len(".weight")]
            names[("unet", n)] = ("lora_unet_" + (n if sgm else path), "unet", path)
        for root, _, prefixes in _text_towers(self.model):  # prefixes: kohya's first, diffusers' network last
            head = root + "transformer."
            for net, n in self.layers:
                if net == "text" and n.startswith(head):  # transformers' own module path, as both tools name it
                    names[(net, n)] = (prefixes[0] + n[len(head) :], prefixes[-1].rstrip("."), n[len(head) :])
        return names

    def lora_files(self) -> tuple[dict, dict]:
        """(kohya, diffusers) state dicts of the adapters, named as those tools name them."""
        c = self.config
        kohya, diffusers = {}, {}
        for layer, (kohya_name, network, path) in self.layer_names().items():
            m = self.layers[layer]
            down, up = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
            key = kohya_name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = torch.tensor(float(c.alpha))
            diffusers[f"{network}.{path}.lora_A.weight"] = down
            diffusers[f"{network}.{path}.lora_B.weight"] = up
        return kohya, diffusers

    def diffusers_metadata(self) -> dict[str, str]:
        """The diffusers file's metadata: each network's PEFT config (rank, alpha, the adapted modules),
        keys prefixed by the network, as save_lora_weights writes it (diffusers builds the adapters from it)."""
        import json

        c = self.config
        targets: dict[str, list[str]] = {}
        for _, network, path in self.layer_names().values():
            # PEFT matches a target as the whole name or its tail: without transformers' `text_model.`
            # level, it matches towers with and without it (transformers 5 dropped it)
            targets.setdefault(network, []).append(path.removeprefix("text_model."))
        config = {}
        for network, modules in targets.items():
            config.update({f"{network}.r": c.rank, f"{network}.lora_alpha": c.alpha})
            config[f"{network}.target_modules"] = sorted(modules)
        return {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}

    def finish(self, folder: Path) -> None:
        with self.ema.applied():
            kohya, diffusers = self.lora_files()
        c = self.config
        meta = self.diffusers_metadata()
        write_safetensors(
            folder / f"{c.name}.safetensors", kohya, {"ss_network_dim": str(c.rank), "ss_network_alpha": str(c.alpha)}
        )
        write_safetensors(folder / f"{c.name}-diffusers.safetensors", diffusers, meta)
