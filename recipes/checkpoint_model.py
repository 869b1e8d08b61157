"""A stage-2 training checkpoint (`ldmkit train`, or `ldmkit distill-lcm`) as a model file (its EMA
weights, as the run's end would write them), so that a run can be judged midway without stopping it:

    python recipes/checkpoint_model.py ~/runs/RUN/checkpoints/step-00002000.pt OUT.safetensors
    ldmkit eval --model OUT.safetensors --split val --n 50 ...

The run's own config (config.json beside checkpoints/) rebuilds the task; nothing in the run folder is
changed."""

import json
import sys
import tempfile
from pathlib import Path

import torch

from ldmkit.config import from_dict
from ldmkit.training.lcm import DistillConfig, DistillTask
from ldmkit.training.ldm import LDMTask, LDMTrainConfig


def main(checkpoint: Path, out: Path) -> None:
    record = json.loads((checkpoint.parent.parent / "config.json").read_text())
    # a distillation's config names its teacher; a UNet's training has none
    Config, Task = (DistillConfig, DistillTask) if record.get("teacher") else (LDMTrainConfig, LDMTask)
    task = Task(from_dict(Config, record))
    task.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["task"])
    with tempfile.TemporaryDirectory(dir=out.parent) as folder:
        task.finish(Path(folder))
        (Path(folder) / "model.safetensors").replace(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python recipes/checkpoint_model.py CHECKPOINT.pt OUT.safetensors")
    main(Path(sys.argv[1]).expanduser(), Path(sys.argv[2]).expanduser())
