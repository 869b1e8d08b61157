"""Generation: parameters (params.py) and the pipeline that runs them (generate.py)."""

from ldmkit.pipelines.generate import Interrupted, Pipeline, Result, StepInfo
from ldmkit.pipelines.params import GenerationParams

__all__ = ["GenerationParams", "Interrupted", "Pipeline", "Result", "StepInfo"]
