"""Running models: for now a simple contiguous-cache generator (the paged engine comes later)."""

from dsv32.engine.simple import generate, sample_next

__all__ = ["generate", "sample_next"]
