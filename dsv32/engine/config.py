"""EngineConfig: the engine's run-time knobs (batching, the paged cache, graphs), read-only after
construction like every config here; derive a variant with `dataclasses.replace`."""

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    prefill_chunk: int = 512
    block_size: int = 64
    num_blocks: int | None = None            # None: sized from memory
    kv_cache_dtype: str = "auto"             # "auto" = the model's dtype, or "fp8"
    memory_fraction: float = 0.85            # CUDA: share of free memory for the cache
    prefix_caching: bool = True
    mha_prefill_below: int | None = None     # default: index_topk
    max_model_len: int | None = None         # default: max_position_embeddings
    paged_decode: bool = True                # decode reads the paged cache with the DSA kernels;
                                             # False: gather each sequence's cache (the reference)
    cuda_graphs: bool = False                # decode with static inputs, replayed as CUDA graphs on
                                             # CUDA (eagerly elsewhere); RL steps stay eager (graphs.py)
    speculative_tokens: int = 0              # k drafts per decode step from the MTP module (chained
                                             # for k > 1), verified by one forward; 0 = off. With
                                             # cuda_graphs its fixed-shape forwards are graphed
    batch_invariant: bool = False            # every forward's numbers per row independent of the batch
                                             # (model/batch_invariant.py): absorbed MQA everywhere, fixed
                                             # key sets, tiled GEMMs, no paged kernels or graphs. With the
                                             # trainer's replay_logprobs(batch_invariant=True): equal bits

    def __post_init__(self):
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {self.speculative_tokens}")

    @property
    def draft_slots(self) -> int:
        return draft_slots(self.speculative_tokens)


def draft_slots(k: int) -> int:
    """Cache slots a decoding sequence needs past its tokens with k drafts: the k its verifying
    forward feeds, and the k - 1 positions past the accepted ones that chained drafting writes."""
    return 2 * k - 1 if k else 0
