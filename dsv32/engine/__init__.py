"""Running models: the paged engine (scheduler, model runner over the paged cache, sampler), one
engine shared by many threads (`SharedEngine`), the offline `LLM` API, and a simple
contiguous-cache generator for watching a model run."""

from dsv32.engine.config import EngineConfig
from dsv32.engine.engine import Engine, RequestOutput, StepOutput
from dsv32.engine.llm import LLM
from dsv32.engine.sampler import SamplingParams
from dsv32.engine.shared import EngineClosed, SharedEngine
from dsv32.engine.simple import generate

__all__ = ["LLM", "Engine", "EngineClosed", "EngineConfig", "RequestOutput", "SamplingParams", "SharedEngine", "StepOutput",
           "generate"]
