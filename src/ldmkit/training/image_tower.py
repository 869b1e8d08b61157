"""`ldmkit train-image-encoder`: a small CLIP vision tower taught by ldmkit itself, so that image prompts
(IP-Adapters) work offline on the worlds ldmkit trains on, where no published tower has looked.

CLIP's objective (Radford et al. 2021), against a frozen text encoder: a model's own (`text_from`; the
bundled shapes model's MiniLM), its caption states mean-pooled and mapped by a learned linear layer into the
tower's embedding space. The images and captions of a batch are matched by a symmetric cross-entropy over
their cosine similarities times a learned temperature. Captions repeat in the shapes world ("a red circle"
several times in a batch of 256): every pair with the same caption is a match (the targets are spread over
them), so the loss's floor says what a perfect tower scores. Each process contrasts its own share of the
batch (no gathering across processes).

The tower is transformers' CLIPVisionModelWithProjection at a small size, its input normalised as CLIP's
(what the image processor does at inference), and it is saved as a folder, config.json beside
model.safetensors: exactly what --image-encoder reads for the published towers."""

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.checkpoints.files import write_json, write_safetensors
from ldmkit.config import model_name
from ldmkit.data.images import DataConfig, Order, load_batch, open_dataset
from ldmkit.errors import ConfigError
from ldmkit.training import distributed as dist
from ldmkit.training.loop import RunConfig

log = logging.getLogger(__name__)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TowerConfig:
    """The vision transformer's size (transformers' CLIPVisionConfig names); the image size is the data's."""

    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    patch_size: int = 8
    projection_dim: int = 256
    hidden_act: str = "gelu"


@dataclass
class ImageTowerTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text_from: str = "shapes"  # the model whose (frozen) text encoder the tower learns to agree with
    tower: TowerConfig = field(default_factory=TowerConfig)
    val: DataConfig | None = None  # held-out images (default: the shapes "val" split)
    val_images: int = 256

    def __post_init__(self):
        self.text_from = model_name(self.text_from)
        t = self.tower
        if t.hidden_size % t.num_attention_heads:
            raise ConfigError(f"tower.hidden_size {t.hidden_size} is no multiple of its {t.num_attention_heads} heads")
        if self.data.size % t.patch_size:
            raise ConfigError(f"data.size {self.data.size} is no multiple of tower.patch_size {t.patch_size}")


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> CLIP's input (what CLIPImageProcessor makes of them at the tower's own size)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return ((images + 1) / 2 - mean) / std


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor):
    """Symmetric cross-entropy of cosine similarities; `same` [B, B] marks the pairs that match."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    targets = same.float() / same.float().sum(dim=1, keepdim=True)
    return (
        -(targets * logits.log_softmax(dim=1)).sum(1).mean() - (targets * logits.log_softmax(dim=0)).sum(0).mean()
    ) / 2


class ImageTowerTask:
    def __init__(self, config: ImageTowerTrainConfig):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from ldmkit.pipelines import Pipeline

        self.config = c = config
        torch.manual_seed(c.run.seed)
        self.text_encoder = Pipeline.load(c.text_from, precision="fp32").model.text_encoder.requires_grad_(False).eval()
        self.tower = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=c.data.size, **asdict(c.tower)))
        self.memo: dict[str, torch.Tensor] = {}
        width = self.features(["a"]).shape[-1]
        self.text_proj = torch.nn.Linear(width, c.tower.projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.params = [*self.tower.parameters(), *self.text_proj.parameters(), self.logit_scale]
        # weight decay on matrices only: not on biases, norms, embeddings' class token or the temperature (CLIP's)
        decayed = [p for p in self.params if p.ndim >= 2]
        rest = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decayed, "weight_decay": c.run.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=c.run.lr)
        self.data = open_dataset(c.data)
        self.order = Order(len(self.data), c.run.seed)
        val = c.val or DataConfig(kind="shapes", split="val", n=c.val_images, size=c.data.size)
        self.val = open_dataset(val)

    @torch.no_grad()
    def features(self, captions: list[str]) -> torch.Tensor:
        """The frozen text encoder's mean-pooled caption states, each caption encoded once."""
        from ldmkit.models.prompts import encode_prompts

        missing = [t for t in dict.fromkeys(captions) if t not in self.memo]
        if missing:
            self.memo.update(
                zip(missing, encode_prompts(self.text_encoder, missing, None, mode="truncate").context.mean(1))
            )
        return torch.stack([self.memo[t] for t in captions])

    def embed(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower(normalise(images)).image_embeds, self.text_proj(self.features(captions))

    def loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        same = torch.tensor([[a == b for b in captions] for a in captions])
        image, text = self.embed(images, captions)
        return contrastive_loss(image, text, self.logit_scale.exp().clamp(max=100), same)

    # state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "tower": self.tower.state_dict(),
            "text_proj": self.text_proj.state_dict(),
            "logit_scale": self.logit_scale.detach().clone(),
            "opt": self.opt.state_dict(),
        }

    def load_state_dict(self, d: dict) -> None:
        self.tower.load_state_dict(d["tower"])
        self.text_proj.load_state_dict(d["text_proj"])
        with torch.no_grad():
            self.logit_scale.copy_(d["logit_scale"])
        self.opt.load_state_dict(d["opt"])

    def train_step(self, step: int, indices: range, lr: float) -> dict:
        c = self.config
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = load_batch(self.data, self.order, indices, c.data.flip, c.run.seed)
        images, captions, kept = batch if batch is not None else (None, [], [])
        if dist.global_count(len(kept)) == 0:
            return {"loss": 0.0, "skipped": float(len(indices) * dist.size())}
        self.tower.train()
        self.opt.zero_grad(set_to_none=True)
        if kept:
            with c.run.autocast():
                loss = self.loss(images, captions)
        else:  # nothing readable here while other processes have images: zero gradients to share
            loss = sum(p.sum() for p in self.params) * 0.0
        loss.backward()
        dist.sum_grads_(self.params)
        self.opt.step()
        values = dist.sum_values({"loss": loss.item() / dist.size()})
        return {**values, "lr": lr, "temperature": round(1 / self.logit_scale.exp().item(), 5)}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """On held-out images: the loss, and how often an image's nearest caption (among the distinct
        held-out captions) is its own (the score)."""
        self.tower.eval()
        loaded = [self.val.load(i) for i in range(min(len(self.val), self.config.val_images))]
        loaded = [item for item in loaded if item is not None]
        images, captions = torch.stack([x for x, _ in loaded]), [t for _, t in loaded]
        distinct = list(dict.fromkeys(captions))
        image = F.normalize(self.tower(normalise(images)).image_embeds, dim=-1)
        text = F.normalize(self.text_proj(self.features(distinct)), dim=-1)
        nearest = (image @ text.T).argmax(dim=1)
        top1 = sum(distinct[j] == t for j, t in zip(nearest.tolist(), captions)) / len(captions)
        loss = self.loss(images, captions).item()
        log.info("step %d: val loss %.4f, caption top-1 %.3f", step, loss, top1)
        return {"val_loss": round(loss, 5), "caption_top1": round(top1, 4), "score": top1}

    def sample(self, step: int, folder: Path) -> None:
        """No pictures for a tower: its evaluation is the retrieval score."""

    def finish(self, folder: Path) -> None:
        """RUN/image-encoder/: config.json and model.safetensors, as transformers saves a tower."""
        out = folder / "image-encoder"
        out.mkdir(parents=True, exist_ok=True)
        config = self.tower.config.to_dict()
        config["architectures"] = ["CLIPVisionModelWithProjection"]
        state = {k: v.detach().contiguous() for k, v in self.tower.state_dict().items()}
        write_safetensors(out / "model.safetensors", state, {"format": "pt"})
        write_json(out / "config.json", config)
