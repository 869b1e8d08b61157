"""`ldmkit train-text-encoder`: a model's BERT text tower (our MiniLM) taught that two wordings of one
scene are one caption. Its top layers are trained so that every wording gives, position by position, the
states the frozen tower gives the scene's canonical wording ("X below Y" those of "Y above X"), and every
other caption, the empty one included, the states it had.

Why: the frozen MiniLM's states say almost perfectly which shape a caption names first, but only in part
which one goes on top, which is the order combined with the relation word (benchmarks/text_binding_probe.py).
A UNet trained on canonical captions (data.relations: canonical) need only read the order; this tower hands
it every wording as the canonical one. The states are distilled, not the tower retrained with the UNet: the
UNet is untouched, and the product is the model with its tower's changed layers, which its file carries
beside the package's tower.

The pairs come from the shapes world's scenes (data/shapes.py `wordings`): item i is scene i // 2 in its
wording i % 2 (a scene without a relation has one wording, given twice), so relations are seen both ways
round as often as the rest of the world is seen."""

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.data.images import DataConfig, Order
from ldmkit.data.shapes import SPLITS, sample_scene, wordings
from ldmkit.errors import ConfigError
from ldmkit.training import distributed as dist
from ldmkit.training.loop import RunConfig

log = logging.getLogger(__name__)
EVAL_BATCH = 128  # captions per pass when validating


@dataclass
class TextTowerTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: str = "shapes"  # the model whose tower is taught (its UNet is copied unchanged)
    layers: int = 2  # the tower's top layers trained; the rest stay the frozen tower's
    data: DataConfig = field(default_factory=DataConfig)  # the shapes scenes whose captions are paired
    val: DataConfig | None = None  # held-out scenes (default: the shapes "val" split, val_scenes of them)
    val_scenes: int = 400
    dtype: str | None = None  # the saved model's: fp32 (as loaded), fp16 or bf16

    def __post_init__(self):
        from ldmkit.checkpoints.single_file import parse_dtype
        from ldmkit.config import model_name
        from ldmkit.errors import CheckpointError

        self.model = model_name(self.model)
        if self.data.kind != "shapes" or (self.val is not None and self.val.kind != "shapes"):
            raise ConfigError("data.kind: the wordings paired come from the shapes world's scenes (kind: shapes)")
        if self.layers < 1:
            raise ConfigError(f"layers: {self.layers}; allowed: 1 to the tower's layers")
        if self.val_scenes < 1:
            raise ConfigError(f"val_scenes: {self.val_scenes}; allowed: 1 or more")
        try:
            parse_dtype(self.dtype)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None


class WordingPairs:
    """(caption, canonical caption) pairs of a split's scenes; item i is scene i // 2's wording i % 2."""

    def __init__(self, config: DataConfig):
        self.config = config

    def __len__(self) -> int:
        return 2 * self.config.n

    def pair(self, i: int) -> tuple[str, str]:
        c = self.config
        scene = i // 2
        intent = sample_scene(c.split, scene, c.seed, c.size).intent
        pairs = wordings(intent, [SPLITS[c.split], c.seed, scene, 5])
        return pairs[i % len(pairs)]


class TextTowerTask:
    name = "text"

    def __init__(self, config: TextTowerTrainConfig):
        from ldmkit.pipelines import Pipeline

        self.config = c = config
        torch.manual_seed(c.run.seed)
        self.model = Pipeline.load(c.model, precision="fp32").model.requires_grad_(False).eval()
        tower = self.model.text_encoder
        kind = "CLIP" if self.model.config.conditioner or self.model.config.sd3 else tower.config.kind
        if kind != "bert":
            raise ConfigError(f"model {c.model}: its text tower is {kind}; this trains a BERT tower's (our MiniLM)")
        tower.check_top(c.layers, "layers")
        self.layers = tower.top_layers(c.layers).requires_grad_(True)  # trained in place, in the model's tower
        self.params = list(self.layers.parameters())
        self.teacher = copy.deepcopy(tower).requires_grad_(False)  # what the states are to be
        self.opt = torch.optim.AdamW(self.params, lr=c.run.lr, weight_decay=c.run.weight_decay)
        self.data = WordingPairs(c.data)
        self.order = Order(len(self.data), c.run.seed)
        val = WordingPairs(c.val or DataConfig(kind="shapes", split="val", n=c.val_scenes, size=c.data.size))
        self.val = self.validation(list(dict.fromkeys(val.pair(i) for i in range(len(val)))))
        self.frozen: dict | None = None  # the untrained tower's validation errors, measured once

    @torch.no_grad()
    def validation(self, pairs: list[tuple[str, str]]) -> dict:
        """The held-out pairs split into the restated wordings (a relation stated other than canonically) and
        the captions kept as they are, in chunks of (captions, the frozen tower's target states)."""
        out = {}
        restated, kept = [p for p in pairs if p[0] != p[1]], [p for p in pairs if p[0] == p[1]]
        for key, group in [("restated", restated), ("kept", kept)]:
            chunks = [group[s : s + EVAL_BATCH] for s in range(0, len(group), EVAL_BATCH)]
            out[key] = [([p[0] for p in ch], self.teacher([p[1] for p in ch])) for ch in chunks]
        return out

    def student(self, captions: list[str]) -> torch.Tensor:
        """The tower's states [B, T, D]: the frozen layers without gradients, the trained ones with."""
        tower, top = self.model.text_encoder, self.config.layers
        tokens = tower.tokenizer(captions)
        with torch.no_grad():
            below = tower.bert_below(tokens["input_ids"], tokens["attention_mask"], top)
        return tower.bert_top(below, tokens["attention_mask"], top)

    def loss(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """Mean squared error over every position, padding included (the UNet attends to all of them)."""
        sources, targets = (list(t) for t in zip(*pairs))
        with torch.no_grad():
            target = self.teacher(targets)
        return F.mse_loss(self.student(sources), target)

    def train_step(self, step: int, indices: range, lr: float) -> dict:
        for g in self.opt.param_groups:
            g["lr"] = lr
        # the empty caption (guidance's unconditional) in every batch, kept as it is
        pairs = [self.data.pair(self.order.item(g)) for g in indices] + [("", "")]
        self.opt.zero_grad(set_to_none=True)
        with self.config.run.autocast():
            loss = self.loss(pairs)
        loss.backward()
        dist.sum_grads_(self.params)
        self.opt.step()
        return {**dist.sum_values({"loss": loss.item() / dist.size()}), "lr": lr}

    @torch.no_grad()
    def errors(self, tower=None) -> dict:
        """Validation error of the restated wordings and of the captions kept, for `tower` (default: ours)."""
        out = {}
        for key, chunks in self.val.items():
            total, n = 0.0, 0
            for sources, target in chunks:
                states = self.student(sources) if tower is None else tower(sources)
                total += F.mse_loss(states, target).item() * len(sources)
                n += len(sources)
            out[key] = total / max(1, n)
        return out

    def evaluate(self, step: int) -> dict:
        if self.frozen is None:
            self.frozen = self.errors(self.teacher)
        now = self.errors()
        frozen = self.frozen["restated"]
        log.info(
            "step %d: val restated %.5f (frozen tower %.5f), kept %.5f", step, now["restated"], frozen, now["kept"]
        )
        return {
            "val_restated": round(now["restated"], 6),
            "val_kept": round(now["kept"], 6),
            "frozen_restated": round(frozen, 6),
            "score": -now["restated"],
        }

    def sample(self, step: int, folder: Path) -> None:
        """No pictures: the tower's evaluation is its states' error (benchmarks/relation_forms.py judges images)."""

    def state_dict(self) -> dict:
        return {"text": self.layers.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        if "text" not in d:
            raise ConfigError("the checkpoint is not a text tower run's: resume with the config it was trained with")
        self.layers.load_state_dict(d["text"])
        self.opt.load_state_dict(d["opt"])

    def finish(self, folder: Path) -> None:
        from ldmkit.checkpoints.single_file import parse_dtype, save_single_file
        from ldmkit.data.vocabulary import grown

        # the tower now reads the wordings it was taught: a closed vocabulary grows by their words, so that
        # they are no longer reported as changing nothing (an open vocabulary, (), stays open)
        taught = (caption for i in range(len(self.data)) for caption in self.data.pair(i))
        self.model.config.vocabulary = grown(self.model.config.vocabulary, taught)
        save_single_file(self.model, folder / "model.safetensors", parse_dtype(self.config.dtype))
