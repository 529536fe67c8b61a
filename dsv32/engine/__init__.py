"""Running models: the paged engine (scheduler, paged cache, sampler), the offline `LLM` API, and
a simple contiguous-cache generator for watching a model run."""

from dsv32.engine.engine import LLM, Engine, EngineConfig, RequestOutput
from dsv32.engine.sampler import SamplingParams
from dsv32.engine.simple import generate

__all__ = ["LLM", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "generate"]
