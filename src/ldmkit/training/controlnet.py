"""`ldmkit train-controlnet`: a ControlNet learns to steer a frozen base model with hints made from
the training images themselves (Canny edges by default, as the original edge ControlNets were).

The loss is the base model's own denoising loss with the ControlNet's residuals added, so only the
ControlNet gets gradients. Half the prompts are dropped by default, as the ControlNet paper does: the
hint alone must then carry the layout, which is what makes control work without a caption."""

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ldmkit.checkpoints.files import atomic_write
from ldmkit.data.images import DataConfig, open_dataset
from ldmkit.errors import ConfigError
from ldmkit.training.ldm import LDMTask, check_cond_dropout
from ldmkit.training.loop import RunConfig, image_grid


@dataclass
class ControlSampleConfig:
    n: int = 4  # validation scenes (shapes) or first images (folders), one column each
    seed: int = 0
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "dpmpp_2m_karras"


@dataclass
class ControlNetTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: str = ""  # the frozen model to control (ours, an SD file, a diffusers folder)
    hint: str = "canny"  # the preprocessor that makes a hint from each training image
    init_from: str | None = None  # continue from an existing ControlNet
    hint_block_channels: tuple[int, ...] | None = None  # default: (16, 32, 96, 256) cut to the base's factor
    cond_dropout: float = 0.5
    min_snr_gamma: float | None = None
    ema_decay: float = 0.999
    latent_cache: bool = True
    sample: ControlSampleConfig = field(default_factory=ControlSampleConfig)
    val_batches: int = 2

    def __post_init__(self):
        from ldmkit.pipelines.control import PREPROCESSORS

        if not self.base:
            raise ConfigError("base: the model to control is required")
        self.base = str(Path(self.base).expanduser())
        if self.hint not in PREPROCESSORS:
            raise ConfigError(f"hint: {self.hint!r}; allowed: {', '.join(PREPROCESSORS)}")
        check_cond_dropout(self.cond_dropout)


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


class ControlNetTask(LDMTask):
    name = "controlnet"
    needs_images = True  # the hints come from the images

    def __init__(self, config: ControlNetTrainConfig):
        from ldmkit.checkpoints.controlnet_files import load_controlnet
        from ldmkit.checkpoints.single_file import load_model
        from ldmkit.models.controlnet import ControlNet

        self.model = load_model(config.base)
        self.model.unet.requires_grad_(False).eval()
        f = self.model.vae.config.downsample_factor
        if config.init_from:
            net = load_controlnet(config.init_from, base=self.model.unet.config)
        else:
            stages = int(np.log2(f)) + 1
            chs = config.hint_block_channels or (16, 32, 96, 256)[:stages]
            torch.manual_seed(config.run.seed)
            net = ControlNet.from_unet(self.model.unet, hint_block_channels=tuple(chs))
        if net.control_config.downsample_factor != f:
            raise ConfigError(
                f"hint_block_channels: {net.control_config.hint_block_channels} downsample by "
                f"{net.control_config.downsample_factor}, the base's autoencoder by {f}"
            )
        self.net = net
        self.setup(config, net)
        self.scale_measured = True  # the base model's scale factor

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
        with self.ema_weights():
            for image, caption in self._sample_scenes():
                source = tensor_to_pil(image[None])[0]
                hint = hints_from(image[None], self.config.hint)[0]
                hint_image = Image.fromarray((hint.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
                settings = dict(steps=s.steps, cfg=s.cfg, sampler=s.sampler, seed=s.seed)
                control = [ControlInput(self.net, source, self.config.hint, name=f"step-{step}")]
                rows[0].append(hint_image)
                rows[1].append(pipe(caption, **settings).images[0])
                rows[2].append(pipe(caption, control=control, **settings).images[0])
        folder.mkdir(parents=True, exist_ok=True)
        grid = image_grid(rows)
        atomic_write(folder / f"samples-{step:08d}.png", lambda tmp: grid.save(tmp, format="PNG"))

    def finish(self, folder: Path) -> None:
        from ldmkit.checkpoints.controlnet_files import save_controlnet

        with self.ema_weights():
            save_controlnet(self.net, folder / "controlnet.safetensors")
