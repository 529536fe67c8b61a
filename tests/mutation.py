"""Mutation check: plant small plausible bugs in the package, one at a time, and see whether the
tests notice.

    python tests/mutation.py                          # every mutant, table on stdout
    python tests/mutation.py --only engine,chat       # mutants of dsv32/engine and dsv32/chat
    python tests/mutation.py --only cache-hash-unchained,mtp-concat-swapped   # or by id
    python tests/mutation.py --list                   # the mutants, and whether each still applies
    python tests/mutation.py --report /tmp/mutation/report.md                 # + report.json

Each mutant is an exact snippet of one file (it must occur exactly once) and its replacement. The
file is rewritten in place, `python -m pytest -x -q -p no:cacheprovider <the mutant's tests>` runs
with a timeout, and the original bytes are put back (checked by SHA-256) whatever happens:
failure, timeout, Ctrl-C or SIGTERM. Results:

  killed     the tests failed (or timed out, or could not import the mutated module)
  survived   the tests passed: a bug they do not see
  error      the mutant could not be applied (snippet missing or not unique), no test file of
             it exists, or pytest itself broke (usage error, nothing collected)

A mutant marked `equivalent` changes no behaviour (the reason says why); it is run and listed but
left out of the kill rate. The kill rate is killed / (killed + survived) over the others.

First a baseline run of every test path involved, on the unmutated tree: tests that already fail
there are deselected from every mutant's run (and listed), so a red test elsewhere cannot pass for
a kill. This is a report, not a gate: the exit status is 0 unless the script itself fails (a file
it could not restore, a bad argument).

Not a test module: pytest does not collect it (its name does not start with test_), and it imports
nothing from dsv32 or the tests, so no mutant can break it. See docs/testing.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT  # the tree mutated and tested: ROOT, or a scratch copy of it with --copy
DEFAULT_TIMEOUT = 300.0

# ---- test subsets: small enough that one mutant runs in well under a minute on a CPU ----
ENGINE = ("tests/engine/test_engine_invariants.py", "tests/engine/test_engine.py", "tests/engine/test_runner.py",
          "tests/rl/test_rollout.py")
SAMPLER = ("tests/engine/test_simple.py::test_sampling_truncation_by_hand",
           "tests/engine/test_simple.py::test_seeded_sampling_is_reproducible",
           "tests/engine/test_simple.py::test_batched_sampling_matches_each_row_alone",
           "tests/engine/test_simple.py::test_generation_limits") + ENGINE
CHAT = ("tests/chat",)
TOKENIZER = ("tests/test_tokenizer.py",)
LLM = ("tests/engine/test_llm.py",)
GRAPHS = ("tests/engine/test_engine.py::test_graph_shaped_decode_equals_the_model",)
RL = ("tests/rl",)
MODEL = ("tests/model/test_model.py", "tests/model/test_parity_transformers.py")
MTP = MODEL + ("tests/train/test_losses.py",)
SELECTION = MODEL + ("tests/rl/test_rollout.py",)
SPEC = ("tests/engine/test_speculative.py",)
INVARIANT = ("tests/rl/test_batch_invariant.py",)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str                  # relative to the repository root
    original: str              # exact text, occurring exactly once in the file
    replacement: str
    tests: tuple[str, ...]     # test files, folders or node ids (missing files are skipped)
    description: str
    equivalent: bool = False   # changes no behaviour: listed, run, but not counted
    reason: str = ""           # why it is equivalent (required when it is)

    @property
    def area(self) -> str:
        """engine, chat, rl, model, ...: the package folder the mutant lives in."""
        parts = Path(self.file).parts
        return parts[1] if len(parts) > 2 and parts[0] == "dsv32" else parts[0]


E, C, S, SM = "dsv32/engine/cache.py", "dsv32/engine/scheduler.py", "dsv32/engine/sampler.py", "dsv32/engine/engine.py"
RUN, BAT, GR, LL = "dsv32/engine/runner.py", "dsv32/engine/batch.py", "dsv32/engine/graphs.py", "dsv32/engine/llm.py"
TOK = "dsv32/tokenizer.py"
ENC, PAR = "dsv32/chat/encode.py", "dsv32/chat/parse.py"
OBJ, ROL = "dsv32/rl/objective.py", "dsv32/rl/rollout.py"
MLA, MOE, TR, IDX = "dsv32/model/mla.py", "dsv32/model/moe.py", "dsv32/model/transformer.py", "dsv32/model/indexer.py"

SPX, BI = "dsv32/engine/speculative.py", "dsv32/model/batch_invariant.py"

MUTANTS: list[Mutant] = [
    # ---- engine/speculative.py and the runner's drafting; model/batch_invariant.py ----
    Mutant("spec-recover-from-target", SPX,
           "    r = (p_n - q_n).clamp(min=0)",
           "    r = p_n.clone()",
           SPEC, "after a rejection the next token is drawn from p itself, not norm(max(p - q, 0)): biased"),
    Mutant("spec-accept-ratio-inverted", SPX,
           "    ok = (u * q_draft < p_draft).int()",
           "    ok = (u * p_draft < q_draft).int()",
           SPEC, "a draft is accepted with probability min(1, q/p) instead of min(1, p/q)"),
    Mutant("spec-hash-without-next-token", SM,
           "hash_overlap=1 if ec.speculative_tokens else 0",
           "hash_overlap=0",
           SPEC, "a prefix-cache block is reused where the token after it differs: its last MTP entry is stale"),
    Mutant("spec-records-rejected-positions", RUN,
           "self._record(seqs, batch, out, counts=[m + 1 for m in n])",
           "self._record(seqs, batch, out)",
           SPEC, "RL records keep the expert ids of rejected drafts' positions",
           equivalent=True, reason="the next step feeds those positions again and overwrites their records; "
                                   "past a finished sequence's end the scheduler drops them (_drop_records_past)"),
    Mutant("invariant-untiled-mm", BI,
           "            return tiled_mm(*args)",
           "            return func(*args, **kwargs)",
           INVARIANT, "the batch-invariant mode runs mm as BLAS chooses: rows depend on the batch"),
    Mutant("invariant-unsorted-keys", BI,
           "    return idx.sort(-1).values",
           "    return idx",
           INVARIANT, "fixed key sets keep the indexer's order: a query sums its keys in another order in the replay"),
    # ---- engine/cache.py: block hashes, prefix lookup, block accounting ----
    Mutant("cache-hash-unchained", E,
           'h = hashlib.sha256(parent or b"")',
           "h = hashlib.sha256()",
           ENGINE, "block_hash ignores the parent hash: a block matches whatever prefix precedes it"),
    Mutant("cache-prefix-whole-prompt", E,
           "for i in range(0, len(tokens) - 1 - (len(tokens) - 1) % bs, bs):",
           "for i in range(0, len(tokens) - len(tokens) % bs, bs):",
           ENGINE, "lookup_prefix may serve a block-aligned prompt wholly from cache, leaving no token to compute"),
    Mutant("cache-take-keeps-hash", E,
           "                del self.by_hash[h]",
           "                pass",
           ENGINE, "a free block handed out again stays findable under its old prefix hash (stale hits)"),
    Mutant("cache-revive-not-counted", E,
           "return fresh + sum(1 for b in cached if self.ref[b] == 0)",
           "return fresh",
           ENGINE, "blocks_needed forgets that reviving a freed cached block uses up a free block"),
    Mutant("cache-shared-ref-reset", E,
           "                self.ref[b] += 1",
           "                self.ref[b] = 1",
           ENGINE, "allocate resets a shared cached block's refcount to 1 instead of incrementing it"),
    Mutant("cache-release-order", E,
           "for b in reversed(table):  # later blocks go first",
           "for b in table:  # later blocks go first",
           ENGINE, "release frees a table's first blocks first: LRU eviction cuts prefix chains at their root"),
    # ---- engine/scheduler.py: preemption, admission, budgets ----
    Mutant("sched-preempt-oldest", C,
           "for other in reversed(self.running):",
           "for other in self.running:",
           ENGINE, "_youngest_other picks the oldest running sequence as the preemption victim"),
    Mutant("sched-self-victim-keeps-going", C,
           "                if victim is seq:\n                    break",
           "                if victim is seq:\n                    pass",
           ENGINE, "a sequence that preempted itself keeps preempting younger ones for a block it gave up"),
    Mutant("sched-requeue-at-back", C,
           "        self.waiting.appendleft(seq)",
           "        self.waiting.append(seq)",
           ENGINE, "a preempted sequence re-enters at the back of the waiting queue, not the front"),
    Mutant("sched-decode-budget", C,
           "budget = self.budget - len(plan.decodes)",
           "budget = self.budget",
           ENGINE, "prefill budget ignores this step's decode tokens: a step can exceed max_num_batched_tokens"),
    Mutant("sched-admit-exact-fit", C,
           "if self.blocks.blocks_needed(need, cached) > self.blocks.num_free:",
           "if self.blocks.blocks_needed(need, cached) >= self.blocks.num_free:",
           ENGINE, "admission refuses a request that needs exactly the free blocks"),
    Mutant("sched-hashes-dropped", C,
           "            seq.block_hashes = hashes",
           "            seq.block_hashes = []",
           ENGINE, "admission forgets the cached blocks' hashes",
           equivalent=True,
           reason="computed() rebuilds missing hashes from block 0 with _hash_at (the same chain) before "
                  "anything reads them, and register() skips hashes already present"),
    # ---- engine/sampler.py: truncation and the log-prob RL trains against ----
    Mutant("sampler-topk-strict", S,
           "keep = sorted_x >= sorted_x.gather(",
           "keep = sorted_x > sorted_x.gather(",
           SAMPLER, "top-k keeps only values strictly above the k-th (k-1 tokens, ties dropped)"),
    Mutant("sampler-topp-exclusive", S,
           "keep &= (p.cumsum(-1) - p < tp) | (tp >= 1.0)",
           "keep &= (p.cumsum(-1) < tp) | (tp >= 1.0)",
           SAMPLER, "top-p drops the token that crosses the threshold: the kept mass stays below top_p"),
    Mutant("sampler-keep-gather", S,
           "keep = torch.empty_like(keep).scatter_(1, order, keep)",
           "keep = keep.gather(1, order)",
           SAMPLER, "the sorted keep mask is mapped back to vocabulary order with the wrong permutation"),
    Mutant("sampler-logprob-raw", S,
           "tokens, logprobs = tok.tolist(), lp.gather(1, tok[:, None]).squeeze(1).tolist()",
           "tokens, logprobs = tok.tolist(), logits.float().log_softmax(-1).gather(1, tok[:, None]).squeeze(1).tolist()",
           SAMPLER, "the sampled token's log-prob is taken under the raw softmax, not the processed distribution"),
    # ---- engine/scheduler.py (postprocess): the finish rules; engine/engine.py: step outputs ----
    Mutant("engine-max-tokens-plus-one", C,
           "n_out >= p.max_tokens",
           "n_out > p.max_tokens",
           SAMPLER, "a request generates max_tokens + 1 tokens"),
    Mutant("engine-context-plus-one", C,
           "len(seq.tokens) >= self.max_model_len",
           "len(seq.tokens) > self.max_model_len",
           ENGINE, "a sequence may grow to max_model_len + 1 tokens"),
    Mutant("engine-ignore-eos-ignored", C,
           "(s.token == self.eos_token_id and not p.ignore_eos)",
           "(s.token == self.eos_token_id)",
           SAMPLER, "ignore_eos=True still stops at the end-of-sentence token"),
    Mutant("sched-decode-not-computed", C,
           "            self.computed(seq, n_tokens[id(seq)])",
           "            self.computed(seq, n_tokens[id(seq)] - 1)",
           ENGINE, "decode steps never count their token as computed: blocks filled by generated tokens are "
                   "never registered for reuse (and the next decode rewrites the same slot)"),
    Mutant("engine-step-resends", SM,
           "        seq.num_emitted = b\n",
           "",
           ENGINE, "each StepOutput repeats every token of the request so far, not only the new ones"),
    # ---- engine/runner.py, batch.py, graphs.py: a step's forwards and their inputs; RL records ----
    Mutant("engine-expert-position", RUN,
           "getattr(seq, field)[a + j] = per_seq[j]",
           "getattr(seq, field)[j] = per_seq[j]",
           ENGINE, "expert ids of a later chunk or decode step are recorded from position 0, overwriting the first"),
    Mutant("runner-chunk-sampled", RUN,
           "sample_rows=tuple(i for i, s in enumerate(seqs) if b == len(s.tokens)),",
           "sample_rows=tuple(range(len(seqs))),",
           ENGINE, "every prefill chunk samples a token, also one that ends before the prompt does"),
    Mutant("batch-decode-shape-unchecked", BAT,
           "(s == 2 and bool((positions[:, 1] == positions[:, 0] + 1).all()))",
           "s == 2",
           ENGINE, "two new tokens at positions that are not consecutive count as a decode step for the paged kernels"),
    Mutant("graphs-padding-on-block-0", GR,
           "rows += [[self.scratch] * self.nb] * (b - n)",
           "rows += [[0] * self.nb] * (b - n)",
           GRAPHS, "padded graph rows write their (garbage) entries into block 0, which a sequence may hold"),
    Mutant("llm-stop-string-not-aborted", LL,
           "                            self.engine.abort(rid)\n",
           "",
           LLM, "a stop string cuts the text but the request runs on to max_tokens"),
    # ---- tokenizer.py: the Detokenizer ----
    Mutant("detok-stop-earliest-start", TOK,
           "hits = [(i + len(s), -len(s), i)",
           "hits = [(i, -len(s), i)",
           TOKENIZER, "the text ends at the stop string that begins first, not the one completed first"),
    Mutant("detok-no-utf8-holdback", TOK,
           'if not text.endswith("\\ufffd") or final:',
           "if True:",
           TOKENIZER, "a token ending inside a UTF-8 character releases a replacement character"),
    Mutant("detok-holdback-one-short", TOK,
           "max(map(len, self.stop)) - 1",
           "max(map(len, self.stop)) - 2",
           TOKENIZER, "the start of a stop string split across feeds is released before the stop string completes"),
    # ---- chat/encode.py: the thinking-context rule, tool blocks, arguments ----
    Mutant("chat-drop-at-last-user-only", ENC,
           'm["role"] in ("user", "developer")), default=-1)',
           'm["role"] == "user"), default=-1)',
           CHAT, "past reasoning is dropped at the last user message, ignoring a later developer message"),
    Mutant("chat-assistant-thinking-ge", ENC,
           "in_thinking = thinking and i > last_user",
           "in_thinking = thinking and i >= last_user",
           CHAT, "an assistant turn at the last user index counts as after it",
           equivalent=True,
           reason="i is an assistant message and last_user a user/developer index or -1: i == last_user never holds"),
    Mutant("chat-results-close-early", ENC,
           'tail = f"\\n</function_results>\\n\\n{think}" if results == calls else ""',
           'tail = f"\\n</function_results>\\n\\n{think}" if results == 1 else ""',
           CHAT, "the <function_results> block closes after the first result, not the last"),
    Mutant("chat-string-args-json", ENC,
           'f"{v if isinstance(v, str) else to_json(v)}</{DSML}parameter>"',
           'f"{to_json(v)}</{DSML}parameter>"',
           CHAT, 'string="true" tool arguments are rendered JSON-quoted instead of raw'),
    Mutant("chat-empty-reasoning-no-think-end", ENC,
           'reasoning = (message.get("reasoning_content") or "") + THINK_END if thinking else ""',
           'reasoning = (message.get("reasoning_content") or "") + THINK_END if thinking and message.get("reasoning_content") else ""',
           CHAT, "a thinking-mode reply with empty reasoning (tool calls only) loses its </think>"),
    # ---- chat/parse.py: strict and streaming parsers ----
    Mutant("parse-holdback-short", PAR,
           "for q in range(max(0, len(buf) - longest + 1), len(buf)):",
           "for q in range(max(0, len(buf) - longest + 2), len(buf)):",
           CHAT, "the stream parser holds back one character too few of a split special token"),
    Mutant("parse-think-end-in-content", PAR,
           '_check_plain(text, i, p, _FORBIDDEN + (THINK_END,), "content")',
           '_check_plain(text, i, p, _FORBIDDEN, "content")',
           CHAT, "the strict parser accepts </think> inside the content"),
    Mutant("parse-invoke-one-newline", PAR,
           """_INVOKE_HEAD = re.compile(r'\\s*name="(.*?)">\\n\\n?', re.DOTALL)""",
           """_INVOKE_HEAD = re.compile(r'\\s*name="(.*?)">\\n', re.DOTALL)""",
           CHAT, "an invoke head ending in two newlines (the official quirk) is rejected"),
    # ---- rl/objective.py: GRPO with the V3.2 stabilisers ----
    Mutant("obj-adv-global-mean", OBJ,
           "return (r - (sums / counts)[idx]).to(rewards.dtype)",
           "return (r - r.mean()).to(rewards.dtype)",
           RL, "advantages subtract the batch mean instead of each group's mean"),
    Mutant("obj-mask-sign", OBJ,
           "div = sequence_mean(logp_old - logp, action)",
           "div = sequence_mean(logp - logp_old, action)",
           RL, "the off-policy mask measures log(pi_theta / pi_old): the divergence with the wrong sign"),
    Mutant("obj-mask-zero-adv", OBJ,
           "(~((adv < 0) & (div > delta)))",
           "(~((adv <= 0) & (div > delta)))",
           RL, "the off-policy mask also masks zero-advantage sequences"),
    Mutant("obj-mask-hits-kl", OBJ,
           "per_token = per_token - beta[:, None] * kl",
           "per_token = (per_token - beta[:, None] * kl) * m[:, None]",
           RL, "the off-policy sequence mask also zeroes the KL term"),
    Mutant("obj-kept-no-renorm", OBJ,
           "norm = torch.where(keep.truncated, top + sums.log(), x.logsumexp(-1))",
           "norm = x.logsumexp(-1)",
           RL, "Keep Sampling Mask: log-probs not renormalised over the kept set"),
    Mutant("obj-seq-mean-padded", OBJ,
           "return (x * a).sum(-1) / a.sum(-1).clamp(min=1)",
           "return (x * a).sum(-1) / a.shape[-1]",
           RL, "sequence_mean divides by the padded length T instead of the sequence's |o_i|"),
    Mutant("obj-clip-max", OBJ,
           "surrogate = torch.minimum(unclipped, clipped)",
           "surrogate = torch.maximum(unclipped, clipped)",
           RL, "the clipped surrogate takes the optimistic branch (max instead of min)"),
    # ---- rl/rollout.py: what the trainer replays ----
    Mutant("rollout-action-unshifted", ROL,
           "action[:, 1:].to(device),",
           "action[:, :-1].to(device),",
           RL, "pack: the action mask is not shifted with the targets"),
    Mutant("rollout-tool-tokens-trained", ROL,
           "t.action += [False] * len(ids)",
           "t.action += [True] * len(ids)",
           RL, "tool-result tokens appended between turns carry the policy loss"),
    Mutant("rollout-routes-replaced", ROL,
           "return torch.cat([first, new[old:]])",
           "return new",
           RL, "a later turn's re-prefill routes replace the routes the earlier turns sampled with"),
    # ---- model/mla.py ----
    Mutant("mla-sparse-mask-dropped", MLA,
           "            mask = selected_mask(idx, mask)",
           "            pass",
           MODEL, "sparse MHA attends to every causal key, not only the indexer's selection"),
    Mutant("mla-batch-row-offset", MLA,
           "rows = torch.where(idx >= 0, idx + t * torch.arange(b, device=idx.device)[:, None, None], -1)",
           "rows = torch.where(idx >= 0, idx, -1)",
           MODEL, "sparse MQA reads every sequence's selected keys from the first sequence's rows"),
    Mutant("mla-rmsnorm-dim", MLA,
           "x.float().pow(2).mean(-1, keepdim=True)",
           "x.float().pow(2).mean(1, keepdim=True)",
           MODEL, "RMSNorm reduces over the sequence dim instead of the feature dim"),
    # ---- model/moe.py: the gate ----
    Mutant("moe-renorm-all-experts", MOE,
           "weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)",
           "weights = weights / (scores.sum(-1, keepdim=True) + 1e-20)",
           MODEL, "top-k weights renormalised over all experts' scores, not the chosen ones"),
    Mutant("moe-bias-in-weights", MOE,
           "weights = scores.gather(1, ids)",
           "weights = (scores + self.e_score_correction_bias).gather(1, ids)",
           MODEL, "the score-correction bias leaks into the mixing weights"),
    Mutant("moe-choice-without-bias", MOE,
           "choice = scores.detach() + self.e_score_correction_bias",
           "choice = scores.detach()",
           MODEL, "expert selection ignores the score-correction bias (aux-loss-free balancing has no effect)"),
    Mutant("moe-group-score-top1", MOE,
           "group_scores = g.topk(2, dim=-1).values.sum(-1)",
           "group_scores = g.max(dim=-1).values",
           MODEL, "groups ranked by their best expert instead of their best two"),
    # ---- model/transformer.py: MTP and the block ----
    Mutant("mtp-emb-wrong-position", TR,
           "self.embed_tokens(input_ids[:, k:k + n])",
           "self.embed_tokens(input_ids[:, k - 1:k - 1 + n])",
           MTP, "MTP depth k is fed emb(t_{i+k-1}) instead of emb(t_{i+k})"),
    Mutant("mtp-concat-swapped", TR,
           "torch.cat([self.enorm(emb), self.hnorm(h)], -1)",
           "torch.cat([self.hnorm(h), self.enorm(emb)], -1)",
           MTP, "MTP concatenates [hnorm(h); enorm(emb)] instead of [enorm(emb); hnorm(h)]"),
    Mutant("mtp-depth-length", TR,
           "n = h.shape[1] - 1  ",
           "n = h.shape[1] - k  ",
           MTP, "MTP depth k shortens the previous depth's hidden by k instead of 1 (wrong for 2+ MTP layers)"),
    Mutant("block-ffn-wrong-norm", TR,
           "h = self.post_attention_layernorm(x)",
           "h = self.input_layernorm(x)",
           MODEL, "the FFN/MoE input goes through the attention's RMSNorm weights"),
    # ---- model/indexer.py ----
    Mutant("idx-k-end-off-by-one", IDX,
           "k_end = mask.shape[-1] - mask.flip(-1).int().argmax(-1)",
           "k_end = mask.shape[-1] - 1 - mask.flip(-1).int().argmax(-1)",
           MODEL, "the indexer skips each query's last allowed key (its own position)"),
    Mutant("idx-pack-prepend-zero", IDX,
           "prepend=torch.full_like(x[..., :1], -1)",
           "prepend=torch.full_like(x[..., :1], 0)",
           SELECTION, "pack_selection measures the first gap from 0 instead of -1"),
    Mutant("idx-all-keys-one-short", IDX,
           "return (torch.arange(k, device=positions.device) >= k - n_keys).to(torch.uint16)",
           "return (torch.arange(k, device=positions.device) > k - n_keys).to(torch.uint16)",
           SELECTION, "all_keys_selection packs one key too few for positions below index_topk"),
]


# ---- applying a mutant, and always undoing it ----


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RestoreError(RuntimeError):
    """A mutated file could not be put back as it was: the tree needs a human."""


class _signals_held:
    """Hold SIGINT and SIGTERM back (they are delivered on exit) while a file is being rewritten."""

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False


class Applied:
    """Context manager: the mutant written into its file, the original bytes (and mtime) restored on
    exit, however it is left. If someone else edited the file meanwhile, only the mutated snippet is
    reverted, never their edit."""

    def __init__(self, path: Path, original: bytes, mutated: bytes, m: Mutant):
        self.path, self.original, self.mutated, self.m = path, original, mutated, m
        self.stat = path.stat()

    def __enter__(self):
        with _signals_held():  # never leave the mutant written without the restore armed
            self._write()
        return self

    def _write(self):
        self.path.write_bytes(self.mutated)
        # a mutant of the same size written within the original's second would let Python reuse the
        # original's .pyc (it checks mtime in whole seconds and size): make the mtime differ
        if int(self.path.stat().st_mtime) == int(self.stat.st_mtime):
            os.utime(self.path, ns=(self.stat.st_atime_ns, self.stat.st_mtime_ns + 2_000_000_000))

    def __exit__(self, *exc):
        with _signals_held():
            self.restore()
        return False

    def restore(self) -> None:
        now = self.path.read_bytes()
        if now == self.mutated:
            self.path.write_bytes(self.original)
        elif now == self.original:
            pass
        else:  # edited by someone else while the mutant ran: revert our snippet only
            text = now.decode()
            if text.count(self.m.replacement) != 1:
                raise RestoreError(f"{self.m.file} changed while mutant {self.m.id} was applied and the "
                                   f"mutated snippet is no longer found once: restore it by hand "
                                   f"(replace {self.m.replacement!r} by {self.m.original!r})")
            self.path.write_bytes(text.replace(self.m.replacement, self.m.original).encode())
            print(f"  note: {self.m.file} was edited during the run; reverted only the mutant", flush=True)
            return
        os.utime(self.path, ns=(self.stat.st_atime_ns, self.stat.st_mtime_ns))  # the original .pyc stays valid
        if sha256(self.path.read_bytes()) != sha256(self.original):
            raise RestoreError(f"{self.m.file}: checksum after restoring mutant {self.m.id} differs from the original")


@dataclass
class Result:
    id: str
    file: str
    line: int | None
    description: str
    result: str                 # killed / survived / error
    detail: str = ""            # how: failed test, timeout, import error; or the error
    seconds: float = 0.0
    equivalent: bool = False
    reason: str = ""
    tests: list[str] = field(default_factory=list)
    output_tail: str = ""       # the last lines of pytest's output (JSON report only)


def check(m: Mutant) -> tuple[str | None, int | None]:
    """(error or None, line of the snippet) for the mutant against the file as it is now."""
    path = WORK / m.file
    if not path.exists():
        return f"file {m.file} does not exist", None
    if m.original == m.replacement:
        return "replacement equals the original", None
    if m.equivalent and not m.reason:
        return "marked equivalent without a reason", None
    text = path.read_text()
    n = text.count(m.original)
    if n != 1:
        return f"snippet {'not found' if n == 0 else f'occurs {n} times'} in {m.file}: {m.original!r}", None
    return None, text[:text.index(m.original)].count("\n") + 1


def existing(tests) -> list[str]:
    """The test paths (or node ids) whose file or folder exists now."""
    return [t for t in tests if (WORK / t.split("::")[0]).exists()]


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def pytest(args: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, output, seconds) of one pytest run in its own process group,
    killed as a group on timeout or interruption."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no .pyc of a mutant is ever written
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=WORK, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        return None, out or "", time.monotonic() - t0
    except BaseException:
        _kill(proc)
        proc.communicate()
        raise


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this script started for the run
    except ProcessLookupError:
        pass


def _first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:200]
    for line in out.splitlines():
        if "Error" in line and not line.startswith(" "):
            return line.strip()[:200]
    return ""


def classify(rc: int | None, out: str) -> tuple[str, str]:
    if rc is None:
        return "killed", "timeout"
    if rc == 0:  # say what passed: a survivor that ran few tests points at the subset
        return "survived", next((l.strip("= ") for l in reversed(out.splitlines()) if " passed" in l), "")
    if rc == 1:
        return "killed", _first_failure(out)
    if rc == 2:  # collection error: the mutated module does not import
        return "killed", "collection/import error: " + _first_failure(out)
    tail = " | ".join(out.strip().splitlines()[-3:])[:300]
    return "error", f"pytest exit status {rc}: {tail}"


# ---- baseline ----


def baseline(paths: list[str], timeout: float) -> tuple[list[str], list[str], str]:
    """Run every path on the unmutated tree (without -x): (node ids that fail, paths that fail to
    collect, summary line)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *paths]
    proc = subprocess.Popen(cmd, cwd=WORK, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout * 3)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        raise SystemExit(f"mutation: the baseline run of {' '.join(paths)} timed out")
    except BaseException:
        _kill(proc)
        proc.communicate()
        raise
    failed, broken = [], []
    for line in out.splitlines():
        m = re.match(r"^(FAILED|ERROR) (\S+?)(?: - .*)?$", line)
        if m:
            node = m.group(2)
            (failed if "::" in node else broken).append(node)
    summary = next((l.strip("= ") for l in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", l)), "")
    if proc.returncode not in (0, 1) and not broken:
        raise SystemExit(f"mutation: the baseline run failed (pytest exit {proc.returncode}):\n{out[-3000:]}")
    return sorted(set(failed)), sorted(set(broken)), summary


# ---- reporting ----


def kill_rate(results: list[Result]) -> tuple[int, int, float | None]:
    counted = [r for r in results if not r.equivalent and r.result in ("killed", "survived")]
    killed = sum(r.result == "killed" for r in counted)
    return killed, len(counted), (killed / len(counted) if counted else None)


def table(results: list[Result]) -> str:
    rows = [("id", "file", "description", "result", "seconds")]
    for r in results:
        res = r.result + (" (equivalent)" if r.equivalent else "") + (f" ({r.detail})" if r.detail == "timeout" else "")
        rows.append((r.id, f"{r.file}:{r.line or '?'}", r.description, res, f"{r.seconds:.1f}"))
    w = [min(max(len(row[i]) for row in rows), 90) for i in range(5)]
    line = lambda row: "  ".join(c[:w[i]].ljust(w[i]) for i, c in enumerate(row)).rstrip()
    return "\n".join([line(rows[0]), "  ".join("-" * x for x in w)] + [line(r) for r in rows[1:]])


def markdown(results: list[Result], meta: dict) -> str:
    killed, counted, rate = kill_rate(results)
    out = ["# Mutation check", "",
           f"- date: {meta['date']}", f"- commit: `{meta['commit']}`" + (" (with uncommitted changes)" if meta["dirty"] else ""),
           f"- mutants: {len(results)} ({sum(r.equivalent for r in results)} marked equivalent, "
           f"{sum(r.result == 'error' for r in results)} errors)",
           f"- **kill rate: {killed}/{counted}" + (f" = {rate:.0%}**" if rate is not None else "**"),
           f"- mutants applied: {meta['tree']}",
           f"- runtime: {meta['seconds']:.0f} s (baseline {meta['baseline_seconds']:.0f} s: {meta['baseline_summary']})", ""]
    if meta["baseline_failures"] or meta["baseline_broken"]:
        out += ["Failing before any mutation, deselected from every run:", ""]
        out += [f"- `{n}`" for n in meta["baseline_failures"] + meta["baseline_broken"]] + [""]
    out += ["| id | file | description | result | detail | s |", "|---|---|---|---|---|---|"]
    for r in results:
        res = r.result + (" (equivalent)" if r.equivalent else "")
        res = f"**{res}**" if r.result != "killed" and not r.equivalent else res
        detail = (r.reason if r.equivalent else r.detail).replace("|", "\\|")
        out.append(f"| `{r.id}` | {r.file}:{r.line or '?'} | {r.description.replace('|', '/')} | {res} | {detail[:160]} | {r.seconds:.1f} |")
    survivors = [r for r in results if r.result == "survived" and not r.equivalent]
    out += ["", "## Survivors", ""]
    out += [f"- `{r.id}` ({r.file}:{r.line}): {r.description}. Tests run: {', '.join(r.tests)}" for r in survivors] or ["none"]
    errors = [r for r in results if r.result == "error"]
    if errors:
        out += ["", "## Errors (fix the mutant list)", ""] + [f"- `{r.id}`: {r.detail}" for r in errors]
    return "\n".join(out) + "\n"


def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def make_copy() -> Path:
    """A scratch copy of the tree (tracked and untracked, non-ignored files) whose own dsv32 the
    tests import: the checkout is never touched, so others can keep working and testing in it."""
    files = [f for f in git("ls-files", "-co", "--exclude-standard", "-z").split("\0") if f]
    if not files:
        raise SystemExit("mutation: --copy needs a git checkout (git ls-files listed nothing)")
    dst = Path(tempfile.mkdtemp(prefix="dsv32-mutation-"))
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    got = subprocess.run([sys.executable, "-c", "import dsv32; print(dsv32.__file__)"], cwd=dst,
                         capture_output=True, text=True).stdout.strip()
    if not got.startswith(str(dst)):
        shutil.rmtree(dst)
        raise SystemExit(f"mutation: --copy: the copy's tests would import dsv32 from {got!r}, not the copy")
    return dst


# ---- main ----


def select(only: str | None) -> list[Mutant]:
    ids = {m.id for m in MUTANTS}
    if len(ids) != len(MUTANTS):
        raise SystemExit("mutation: duplicate mutant ids")
    if not only:
        return list(MUTANTS)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    areas = {m.area for m in MUTANTS}
    unknown = [k for k in keys if k not in areas and k not in ids]
    if unknown:
        raise SystemExit(f"mutation: --only {','.join(unknown)}: not an area ({', '.join(sorted(areas))}) nor a mutant id")
    return [m for m in MUTANTS if m.area in keys or m.id in keys]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated areas (engine, chat, rl, model) and/or mutant ids")
    ap.add_argument("--list", action="store_true", help="list the mutants and check each still applies; run nothing")
    ap.add_argument("--report", type=Path, help="write a markdown report here and a JSON file beside it")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per mutant (default 300)")
    ap.add_argument("--copy", action="store_true",
                    help="mutate a scratch copy of the tree instead of the checkout (safe while others work in it)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline run of the unmutated tree")
    args = ap.parse_args(argv)
    mutants = select(args.only)

    if args.list:
        for m in mutants:
            err, line = check(m)
            tests = existing(m.tests)
            status = f"ERROR: {err}" if err else ("ERROR: no test path exists" if not tests else "ok")
            eq = f"  [equivalent: {m.reason}]" if m.equivalent else ""
            print(f"{m.id:36} {m.file}:{line or '?':<4} {status}\n    {m.description}{eq}\n    tests: {' '.join(tests)}")
        return 0

    signal.signal(signal.SIGTERM, _on_sigterm)
    global WORK
    if args.copy:
        WORK = make_copy()
        print(f"working in a copy of the tree: {WORK}", flush=True)
    try:
        return run(args, mutants)
    finally:
        if WORK != ROOT:
            shutil.rmtree(WORK, ignore_errors=True)


def run(args, mutants: list[Mutant]) -> int:
    t_start = time.monotonic()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "dsv32")), "timeout": args.timeout,
            "tree": "scratch copy" if WORK != ROOT else "in place",
            "baseline_failures": [], "baseline_broken": [], "baseline_summary": "skipped", "baseline_seconds": 0.0}
    before = {m.file: sha256((WORK / m.file).read_bytes()) for m in mutants if (WORK / m.file).exists()}

    deselect: list[str] = []
    broken: set[str] = set()
    if not args.no_baseline:
        paths = sorted({t.split("::")[0] for m in mutants for t in existing(m.tests)})
        paths = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]  # each file once
        print(f"baseline: {' '.join(paths)}", flush=True)
        t0 = time.monotonic()
        failed, broken_list, summary = baseline(paths, args.timeout)
        meta.update(baseline_failures=failed, baseline_broken=broken_list, baseline_summary=summary,
                    baseline_seconds=time.monotonic() - t0)
        deselect, broken = failed, set(broken_list)
        print(f"baseline: {summary} in {meta['baseline_seconds']:.0f} s", flush=True)
        for n in failed + broken_list:
            print(f"  WARNING: fails before any mutation, deselected: {n}", flush=True)

    results: list[Result] = []
    interrupted = False
    try:
        for k, m in enumerate(mutants, 1):
            err, line = check(m)
            tests = [t for t in existing(m.tests) if t.split("::")[0] not in broken]
            r = Result(m.id, m.file, line, m.description, "error", equivalent=m.equivalent, reason=m.reason, tests=tests)
            if err is None and not tests:
                err = "none of its test paths exists: " + " ".join(m.tests)
            if err is not None:
                r.detail = err
                print(f"[{k:2}/{len(mutants)}] {m.id:36} ERROR: {err}", flush=True)
                print(f"!!!!! mutant {m.id} could not be run: {err}", file=sys.stderr, flush=True)
                results.append(r)
                continue
            path = WORK / m.file
            original = path.read_bytes()
            mutated = original.decode().replace(m.original, m.replacement).encode()
            sel = [t for t in deselect if any(t.startswith(p.split("::")[0]) for p in tests)]
            with Applied(path, original, mutated, m):
                rc, out, secs = pytest(tests + [a for n in sel for a in ("--deselect", n)], args.timeout)
            r.result, r.detail = classify(rc, out)
            r.output_tail = "\n".join(out.strip().splitlines()[-15:])
            r.seconds = secs
            tag = r.result + (" (equivalent)" if m.equivalent else "") + (f": {r.detail}" if r.detail else "")
            print(f"[{k:2}/{len(mutants)}] {m.id:36} {tag[:150]}  ({secs:.1f} s)", flush=True)
            if r.result == "error":
                print(f"!!!!! mutant {m.id}: {r.detail}", file=sys.stderr, flush=True)
            results.append(r)
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = True
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}): the mutated file was restored; partial results follow", flush=True)
    finally:
        changed = [f for f, h in before.items() if sha256((WORK / f).read_bytes()) != h]
        if changed:  # only another editor's changes can show here: each mutant is verified on restore
            print(f"note: changed during the run (not by this script's restores): {', '.join(changed)}", flush=True)

    meta["seconds"] = time.monotonic() - t_start
    killed, counted, rate = kill_rate(results)
    print()
    print(table(results))
    print()
    print(f"kill rate: {killed}/{counted}" + (f" = {rate:.1%}" if rate is not None else "") +
          f" (equivalent excluded: {sum(r.equivalent for r in results)}, errors: {sum(r.result == 'error' for r in results)})"
          f"; {meta['seconds']:.0f} s in all")
    for r in results:
        if r.result == "survived" and not r.equivalent:
            print(f"  survived: {r.id}: {r.description}")
        if r.equivalent and r.result == "killed":
            print(f"  note: {r.id} is marked equivalent but was killed ({r.detail}): re-check the claim")
    errors = [r for r in results if r.result == "error"]
    if errors:
        print(f"\n!!!!! {len(errors)} mutant(s) in error: {', '.join(r.id for r in errors)}", file=sys.stderr)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(markdown(results, meta))
        data = {**meta, "kill_rate": rate, "killed": killed, "counted": counted,
                "results": [asdict(r) for r in results]}
        args.report.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"report: {args.report} and {args.report.with_suffix('.json')}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RestoreError as e:
        print(f"!!!!! mutation: {e}", file=sys.stderr)
        sys.exit(3)
