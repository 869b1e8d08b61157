"""Strict, per-component loading: every weight the module has must be in the file with the right
shape, and every tensor in the file must be a weight of the module (after the NOT_WEIGHTS
allow-list). A missing or extra weight is an error naming the file, never a silently random layer."""

import torch
from torch import nn

from ldmkit.errors import CheckpointError


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def check_state(module: nn.Module, state: dict[str, torch.Tensor], component: str, where: str) -> None:
    """The checks strict_load makes, alone: the same names, shapes and (non-float) dtypes. On an empty
    (meta) module it allocates nothing, so declared sizes are checked against the file's before a model of
    those sizes is built."""
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing:
        raise CheckpointError(f"{where}: {component}: missing weight(s) {_few(missing)}")
    if unexpected:
        raise CheckpointError(f"{where}: {component}: unexpected weight(s) {_few(unexpected)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{where}: {component}: weight {k} has shape {tuple(state[k].shape)}, the model needs {tuple(v.shape)}"
            )
        if not (state[k].is_floating_point() or state[k].dtype == v.dtype):
            raise CheckpointError(f"{where}: {component}: weight {k} has dtype {state[k].dtype}, expected {v.dtype}")


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], component: str, where: str) -> None:
    check_state(module, state, component, where)
    expected = module.state_dict()
    if any(t.is_meta for t in expected.values()):
        # An empty module (LatentDiffusion(..., empty=True)): it takes the file's tensors themselves, in
        # the dtype it was declared with, instead of copying them into a second, randomly initialised set.
        state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
    else:
        module.load_state_dict(state, strict=True)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def stored_dtypes(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()})


def layer_indices(keys, prefix: str, where: str) -> list[int]:
    """The layer numbers after `prefix` in the keys, sorted. Each must be a whole number: a depth is then a
    count the file itself bounds (every layer has a key), never a number read off one name."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            part = k[len(prefix) :].split(".")[0]
            if not (part.isascii() and part.isdigit()):
                raise CheckpointError(f"{where}: {k}: {part!r} is no layer number")
            found.add(int(part))
    return sorted(found)
