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

    STRATEGIES = ("later", "earlier", "range")

    def check(self) -> None:
        """What the fields say alone (the number of timesteps is the model's, known when the task starts)."""
        if self.strategy not in self.STRATEGIES:
            raise ConfigError(f"timestep_bias.strategy: {self.strategy!r}; allowed: {', '.join(self.STRATEGIES)}")
        if not (self.multiplier > 0 and 0 < self.portion <= 1):
            raise ConfigError(
                f"timestep_bias: multiplier {self.multiplier}, portion {self.portion}; "
                "allowed: multiplier > 0, 0 < portion <= 1"
            )

    def weights(self, steps: int) -> torch.Tensor:
        """Each of `steps` timestep indices' probability."""
        self.check()
        if self.strategy == "range":
            if not 0 <= self.begin < self.end <= steps:
                raise ConfigError(
                    f"timestep_bias: range [{self.begin}, {self.end}); allowed: 0 <= begin < end <= {steps}, "
                    "the model's timesteps"
                )
            part = slice(self.begin, self.end)
        else:
            n = int(self.portion * steps)
            if n == 0:  # a bias that biases nothing is a mistake, not a uniform draw
                raise ConfigError(f"timestep_bias.portion: {self.portion} of {steps} timesteps is none of them")
            part = slice(steps - n, steps) if self.strategy == "later" else slice(0, n)
        w = torch.ones(steps, dtype=torch.float64)
        w[part] *= self.multiplier
        return w / w.sum()
