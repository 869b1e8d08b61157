"""Generation pipelines: thin compositions of the text encoder, the sampler and the autoencoder."""

from ldmkit.pipelines.generate import GenerationParams, Interrupted, Pipeline, Result, StepInfo

__all__ = ["GenerationParams", "Interrupted", "Pipeline", "Result", "StepInfo"]
