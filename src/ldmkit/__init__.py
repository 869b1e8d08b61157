"""ldmkit: latent diffusion models (Rombach et al., CVPR 2022), written to be read."""

__version__ = "0.1.0"

from ldmkit.errors import CheckpointError, ConfigError, LdmkitError, UnsupportedModelError  # noqa: E402

__all__ = ["CheckpointError", "ConfigError", "LdmkitError", "UnsupportedModelError", "__version__"]
