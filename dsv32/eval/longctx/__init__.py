"""The long-context suite: copy, needle, multi-key retrieval and perplexity by position, under
dense attention, DSA and the baselines at the same key budget (`dsv32 eval longctx`)."""

from dsv32.eval.longctx.run import model_forward, run_suite, variant_list, write_results
from dsv32.eval.longctx.score import oracle_model, score_sample
from dsv32.eval.longctx.selectors import VARIANTS, Selector
from dsv32.eval.longctx.tasks import TASKS, LongCtxError, Sample, build_tasks

__all__ = ["TASKS", "VARIANTS", "LongCtxError", "Sample", "Selector", "build_tasks", "model_forward",
           "oracle_model", "run_suite", "score_sample", "variant_list", "write_results"]
