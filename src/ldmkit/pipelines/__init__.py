"""Generation pipelines: thin compositions of the text encoder, the sampler and the autoencoder."""

from ldmkit.pipelines.generate import GenerationParams, Pipeline, Result, StepInfo

__all__ = ["GenerationParams", "Pipeline", "Result", "StepInfo"]
