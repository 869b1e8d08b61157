"""Which timesteps a denoising task trains on: each equally often, or some more often than others."""

from dataclasses import dataclass

import torch

from ldmkit.errors import ConfigError


@dataclass
class TimestepBias:
    """diffusers' --timestep_bias_* (its SDXL training script): the timesteps of one part of [0, T) drawn
    `multiplier` times as often as the others -- "later" the noisiest `portion` (where the layout is
    decided), "earlier" the least noisy, "range" the indices [begin, end)."""

    strategy: str = "later"
    multiplier: float = 2.0
    portion: float = 0.25
    begin: int = 0
    end: int = 1000

    def weights(self, steps: int) -> torch.Tensor:
        """Each timestep index's probability."""
        n = int(self.portion * steps)
        part = {"later": slice(steps - n, steps), "earlier": slice(0, n), "range": slice(self.begin, self.end)}
        if self.strategy not in part:
            raise ConfigError(f"timestep_bias.strategy: {self.strategy!r}; allowed: {', '.join(part)}")
        if not (self.multiplier > 0 and 0 < self.portion <= 1 and 0 <= self.begin < self.end <= steps):
            raise ConfigError(
                f"timestep_bias: multiplier {self.multiplier}, portion {self.portion}, range [{self.begin}, "
                f"{self.end}); allowed: multiplier > 0, 0 < portion <= 1, 0 <= begin < end <= {steps}"
            )
        w = torch.ones(steps, dtype=torch.float64)
        w[part[self.strategy]] *= self.multiplier
        return w / w.sum()
