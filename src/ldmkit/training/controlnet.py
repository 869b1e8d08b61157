"""`ldmkit train-controlnet`: a ControlNet learns to steer a frozen base model with hints made from
the training images themselves (Canny edges by default, as the original edge ControlNets were).

The loss is the base model's own denoising loss with the ControlNet's residuals added, so only the
ControlNet gets gradients. Half the prompts are dropped by default, as the ControlNet paper does: the
hint alone must then carry the layout, which is what makes control work without a caption."""

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ldmkit.data.images import open_dataset
from ldmkit.errors import ConfigError
from ldmkit.training.latent_task import DenoisingTrainConfig, LatentTask, load_frozen


@dataclass
class ControlSampleConfig:
    n: int = 4  # validation scenes (shapes) or first images (folders), one column each
    seed: int = 0
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "dpmpp_2m_karras"


@dataclass
class ControlNetTrainConfig(DenoisingTrainConfig):
    base: str = ""  # the frozen model to control (ours, an SD file, a diffusers folder)
    hint: str = "canny"  # the preprocessor that makes a hint from each training image
    init_from: str | None = None  # continue from an existing ControlNet
    hint_block_channels: tuple[int, ...] | None = None  # default: (16, 32, 96, 256) cut to the base's factor
    cond_dropout: float = 0.5
    sample: ControlSampleConfig = field(default_factory=ControlSampleConfig)

    frozen_model = ("base", "the model to control")

    def check(self) -> None:
        from ldmkit.pipelines.control import PREPROCESSORS

        if self.hint not in PREPROCESSORS:
            raise ConfigError(f"hint: {self.hint!r}; allowed: {', '.join(PREPROCESSORS)}")
        super().check()


def hints_from(images: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, 3, H, W] hints in [0, 1] from training images in [-1, 1], through a preprocessor."""
    from PIL import Image

    from ldmkit.pipelines.control import preprocess

    out = []
    for x in images:
        a = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        hint = preprocess(kind, Image.fromarray(a), a.shape[1], a.shape[0])
        out.append(torch.from_numpy(np.asarray(hint, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


class ControlNetTask(LatentTask):
    name = "controlnet"
    refuses_sdxl = "train-controlnet"  # neither the ControlNet nor `predict` passes the UNet its y
    needs_images = True  # the hints come from the images

    def __init__(self, config: ControlNetTrainConfig):
        from ldmkit.checkpoints.controlnet_files import load_controlnet
        from ldmkit.models.controlnet import ControlNet

        model = load_frozen(config.base)
        model.unet.eval()
        f = model.vae.config.downsample_factor
        if config.init_from:
            net = load_controlnet(config.init_from, base=model.unet.config)
        else:
            stages = int(np.log2(f)) + 1
            chs = config.hint_block_channels or (16, 32, 96, 256)[:stages]
            torch.manual_seed(config.run.seed)
            net = ControlNet.from_unet(model.unet, hint_block_channels=tuple(chs))
        if net.control_config.downsample_factor != f:
            raise ConfigError(
                f"hint_block_channels: {net.control_config.hint_block_channels} downsample by "
                f"{net.control_config.downsample_factor}, the base's autoencoder by {f}"
            )
        self.net = net
        super().__init__(config, model, net)

    def extra_for(self, images):
        return None if images is None else hints_from(images, self.config.hint)

    def predict(self, zt, t, context, hints):
        return self.unet(zt, t, context, control=self.net(zt, hints, t, context))

    def _sample_scenes(self):
        c = self.config
        if c.data.kind == "shapes":
            data = open_dataset(replace(c.data, split="val", n=c.sample.n))
        else:
            data = self.data
        items = [data.load(i) for i in range(min(c.sample.n, len(data)))]
        return [it for it in items if it is not None]

    def sample(self, step: int, folder: Path) -> None:
        """Columns: one scene each. Rows: the hint, the base model without control, with control."""
        from PIL import Image

        from ldmkit.images import tensor_to_pil
        from ldmkit.pipelines import Pipeline
        from ldmkit.pipelines.control import ControlInput

        s = self.config.sample
        pipe = Pipeline(self.model, name="base")
        rows = [[], [], []]
        with self.ema.applied():
            for image, caption in self._sample_scenes():
                source = tensor_to_pil(image[None])[0]
                hint = hints_from(image[None], self.config.hint)[0]
                hint_image = Image.fromarray((hint.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
                settings = dict(steps=s.steps, cfg=s.cfg, sampler=s.sampler, seed=s.seed)
                control = [ControlInput(self.net, source, self.config.hint, name=f"step-{step}")]
                rows[0].append(hint_image)
                rows[1].append(pipe(caption, **settings).images[0])
                rows[2].append(pipe(caption, control=control, **settings).images[0])
        self.save_grid(rows, step, folder)

    def finish(self, folder: Path) -> None:
        from ldmkit.checkpoints.controlnet_files import save_controlnet

        with self.ema.applied():
            save_controlnet(self.net, folder / "controlnet.safetensors")
