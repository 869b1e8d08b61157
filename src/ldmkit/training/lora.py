"""`ldmkit train-lora`: a LoRA for a frozen model's UNet, trained with the shared loop (resume, sample
grids, latent cache) and saved in the kohya layout and the diffusers/PEFT layout (models/lora.py reads both).

The adapters are PEFT's (`inject_adapter_in_model`), which fit our modules as they are: attention
projections by default, convolutions too when listed (LoCon), and the text tower's layers when
`text_target_modules` names them. With `prior`, half of every batch comes from regularisation images
(prior preservation), which keeps a LoRA trained on a few dozen images from overwriting the rest."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.checkpoints.files import write_safetensors
from ldmkit.data.images import DataConfig, MixedOrder, PriorMix, open_dataset
from ldmkit.errors import ConfigError
from ldmkit.training.latent_task import DenoisingTrainConfig, LatentTask, SampleConfig, load_frozen


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
    # CLIP, or query, key, value for BERT-style towers such as MiniLM.
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

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """With gradients when the text tower has adapters (the base class encodes without any). The
        empty prompt for condition dropout is encoded once, at the start."""
        if not self.config.text_target_modules:
            return super().encode_text(captions)
        from ldmkit.models.prompts import encode_prompts

        with torch.enable_grad():
            return encode_prompts(self.model.text_encoder, captions, None, mode="truncate")[0]

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.pipelines import Pipeline

        with self.ema.applied():
            self.prompt_grid(Pipeline(self.model, name=f"step-{step}"), step, folder)

    def lora_files(self) -> tuple[dict, dict]:
        """(kohya, diffusers) state dicts of the adapters, named as those tools name them."""
        from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers

        c = self.config
        unet = [n for net, n in self.layers if net == "unet"]
        theirs = rename({n + ".weight": None for n in unet}, unet_to_diffusers(self.model.config.unet))
        names = {("unet", n): ("lora_unet_", "unet.", k[: -len(".weight")]) for n, k in zip(unet, theirs)}
        for net, n in self.layers:
            if net == "text":  # transformers' own module path: what kohya and diffusers name text layers by
                names[(net, n)] = ("lora_te_", "text_encoder.", n.removeprefix("transformer."))
        kohya, diffusers = {}, {}
        for layer, (kohya_prefix, peft_prefix, path) in names.items():
            m = self.layers[layer]
            down, up = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
            key = kohya_prefix + path.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = torch.tensor(float(c.alpha))
            diffusers[f"{peft_prefix}{path}.lora_A.weight"] = down
            diffusers[f"{peft_prefix}{path}.lora_B.weight"] = up
        return kohya, diffusers

    def finish(self, folder: Path) -> None:
        import json

        with self.ema.applied():
            kohya, diffusers = self.lora_files()
        c = self.config
        meta = {"lora_adapter_metadata": json.dumps({"r": c.rank, "lora_alpha": c.alpha})}
        write_safetensors(
            folder / f"{c.name}.safetensors", kohya, {"ss_network_dim": str(c.rank), "ss_network_alpha": str(c.alpha)}
        )
        write_safetensors(folder / f"{c.name}-diffusers.safetensors", diffusers, meta)
