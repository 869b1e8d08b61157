"""A model file's held-out loss by a training config's own validation protocol (the held-out images of
its `val`, fixed noise per image, uniform timesteps: the `val_loss` its run logs in metrics.jsonl), so
that a finished or shipped model and the run that continues it are scored alike. Each model given is
loaded as that config's `init_from`.

    python benchmarks/heldout_loss.py CONFIG.yaml MODEL.safetensors ... [--batches N]
"""

import argparse
import json
import tempfile

import torch

from ldmkit.config import load_yaml
from ldmkit.training.ldm import LDMTask, LDMTrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batches", type=int, help="validation batches (default: the config's val_batches)")
    args = ap.parse_args()
    for model in args.models:
        config = load_yaml(LDMTrainConfig, args.config)
        config.init_from, config.autoencoder, config.latent_cache = model, None, False
        config.val_batches = args.batches or config.val_batches
        torch.set_num_threads(config.run.threads)
        with tempfile.TemporaryDirectory() as run_dir:
            config.run.dir = run_dir
            config.check()
            loss = LDMTask(config).evaluate(0).get("val_loss")
        print(json.dumps({"model": model, "val_batches": config.val_batches, "val_loss": loss}))


if __name__ == "__main__":
    main()
