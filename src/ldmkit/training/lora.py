"""`ldmkit train-lora`: a LoRA for a frozen model's UNet, trained with the shared loop (resume, sample
grids, latent cache) and saved in the kohya layout and the diffusers/PEFT layout (lora.py reads both).

The adapters are PEFT's (`inject_adapter_in_model`), which fit our modules as they are: attention
projections by default, convolutions too when listed (LoCon). Only the UNet is adapted: our text
tower is encoded without gradients."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.checkpoints.files import write_safetensors
from ldmkit.data.images import DataConfig
from ldmkit.errors import ConfigError
from ldmkit.training.ldm import LDMTask, SampleConfig
from ldmkit.training.loop import RunConfig


@dataclass
class LoraTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: str = ""  # the frozen model (ours, an SD file, a diffusers folder)
    rank: int = 8
    alpha: float = 8.0
    # Module name suffixes in our (original SD) layout, as PEFT matches them; in_layers.2 / out_layers.3 are
    # the resnets' convolutions (LoCon).
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    cond_dropout: float = 0.0
    min_snr_gamma: float | None = None
    ema_decay: float = 0.0  # 0: the live weights are the result
    latent_cache: bool = True
    name: str = "lora"  # the saved files: NAME.safetensors (kohya) and NAME-diffusers.safetensors
    sample: SampleConfig = field(default_factory=SampleConfig)
    val_batches: int = 2

    def __post_init__(self):
        if not self.base:
            raise ConfigError("base: the model to adapt is required")
        self.base = str(Path(self.base).expanduser())
        if self.rank <= 0 or self.alpha <= 0:
            raise ConfigError(f"rank {self.rank}, alpha {self.alpha}; allowed: positive")
        if not 0 <= self.cond_dropout < 1:
            raise ConfigError(f"cond_dropout: {self.cond_dropout}; allowed: 0 <= p < 1")


class LoraTask(LDMTask):
    name = "lora"

    def __init__(self, config: LoraTrainConfig):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        from ldmkit.checkpoints.single_file import load_model

        self.model = load_model(config.base)
        self.model.requires_grad_(False)
        torch.manual_seed(config.run.seed)
        peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules))
        try:
            inject_adapter_in_model(peft_config, self.model.unet)
        except ValueError as e:
            raise ConfigError(f"target_modules {list(config.target_modules)}: {e}") from None
        self.layers = {n: m for n, m in self.model.unet.named_modules() if isinstance(m, LoraLayer)}
        adapters = nn.ModuleDict()
        for n, m in self.layers.items():
            key = n.replace(".", "__")
            adapters[key + "__down"] = m.lora_A["default"]
            adapters[key + "__up"] = m.lora_B["default"]
        adapters.requires_grad_(True)
        self.adapters = adapters
        self.setup(config, adapters)
        self.model.unet.eval()  # dropout-free base; the adapters train
        self.scale_measured = True

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.pipelines import Pipeline

        with self.ema_weights():
            self.prompt_grid(Pipeline(self.model, name=f"step-{step}"), step, folder)

    def lora_files(self) -> tuple[dict, dict]:
        """(kohya, diffusers) state dicts of the adapters, named as those tools name them."""
        from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers

        c = self.config
        ours = list(self.layers)
        theirs = rename({n + ".weight": None for n in ours}, unet_to_diffusers(self.model.config.unet))
        kohya, diffusers = {}, {}
        for n, d in zip(ours, (k[: -len(".weight")] for k in theirs)):
            m = self.layers[n]
            down, up = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
            key = "lora_unet_" + d.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = torch.tensor(float(c.alpha))
            diffusers[f"unet.{d}.lora_A.weight"] = down
            diffusers[f"unet.{d}.lora_B.weight"] = up
        return kohya, diffusers

    def finish(self, folder: Path) -> None:
        import json

        with self.ema_weights():
            kohya, diffusers = self.lora_files()
        c = self.config
        meta = {"lora_adapter_metadata": json.dumps({"r": c.rank, "lora_alpha": c.alpha})}
        write_safetensors(
            folder / f"{c.name}.safetensors", kohya, {"ss_network_dim": str(c.rank), "ss_network_alpha": str(c.alpha)}
        )
        write_safetensors(folder / f"{c.name}-diffusers.safetensors", diffusers, meta)
