"""Exponential moving average of a trained module's weights: what latent tasks evaluate, sample and save.

The averages read like the state dict they average (a mapping from the module's keys to tensors), and
that dict is what checkpoints store under "ema", so a run resumes with the averages it stopped with."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


class EMA(Mapping):
    """ema <- decay * ema + (1 - decay) * weights after every optimiser step, the decay warming up as
    (1 + step) / (10 + step) until it reaches `decay` (0: the averages are the live weights).

    With `into`, the averages are that module's own tensors, updated in place: a network that runs on
    the averaged weights (the consistency-distillation target) without copying them."""

    def __init__(self, module: torch.nn.Module, decay: float, into: torch.nn.Module | None = None):
        self.module, self.decay, self.into = module, decay, into
        self.state = into.state_dict() if into is not None else _clone(module)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """One fused lerp over every float tensor (the emoji UNet's 624 tensors: one kernel instead of
        two per tensor, benchmarks/optimizer_step.py); integer buffers are copied."""
        decay = min(self.decay, (1 + step) / (10 + step))
        state = self.module.state_dict()
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([self.state[k] for k in floats], [state[k] for k in floats], 1 - decay)
        for k, v in state.items():
            if not v.dtype.is_floating_point:
                self.state[k].copy_(v)

    # checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if self.into is not None:
            self.into.load_state_dict(state)
            self.state = self.into.state_dict()
        else:
            # in the module's own dtypes: a checkpoint kept at lower precision resumes into fp32 averages
            own = self.module.state_dict()
            self.state = {k: v.to(own[k].dtype) for k, v in state.items()}

    # evaluation -------------------------------------------------------------------------------------
    @contextmanager
    def applied(self):
        """The module with the averaged weights, in eval mode, for the duration; then the live weights,
        in train mode."""
        live = _clone(self.module)
        self.module.load_state_dict(self.state)
        self.module.eval()
        try:
            yield
        finally:
            self.module.load_state_dict(live)
            self.module.train()


def _clone(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
