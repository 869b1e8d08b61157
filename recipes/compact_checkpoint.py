"""A training checkpoint made small enough to keep in git: every fp32 tensor in it (the weights, their
averages, Adam's moments) stored as bf16, half the file. Loading casts each back to fp32 (the model's
and the optimiser's load_state_dict do, and EMA.load_state_dict), so a resumed run trains in full
precision from values rounded to bf16's 8 bits: a weight moves by at most 0.4% of itself, about one
optimiser step at the learning rates used here (tests/test_stage_checkpoints.py measures it).

python recipes/compact_checkpoint.py ~/runs/shapes-f2-ldm/checkpoints/step-00004000.pt \
    recipes/stage-checkpoints/shapes-f2-ldm-step-00004000.pt"""

import sys

import torch


def compact(value):
    """The same nesting of dicts and lists, each fp32 tensor in it bf16 (ints, steps and the rest kept)."""
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(compact(v) for v in value)
    if torch.is_tensor(value) and value.dtype == torch.float32 and value.dim() > 0:
        return value.bfloat16()
    return value


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    torch.save(compact(torch.load(src, map_location="cpu", weights_only=True)), dst)
