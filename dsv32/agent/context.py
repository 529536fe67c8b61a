"""Test-time context management for search agents (spec §4): what the model sees once its context
fills up, derived from the full log, which is never edited.

The log is the conversation as it happened (task, replies, tool results) with context events
`{"role": "context", "strategy": ..., ...}` where management acted. `view(log)` replays it: each
event applies its strategy to the messages before it, and later messages follow the result. So a
strategy is a pure function from a view to a smaller view, and any past view can be rebuilt.

Trigger (§4): "when token usage exceeds 80% of the context window"; the usage of the next call is
its prompt plus the new tokens it may write. Strategies (§4):
  summary               "summarise the overflowed trajectory and re-start the rollout"
  discard-75            "drop the first 75% of the tool-call history"
  discard-all           "reset the context by dropping all previous tool-call history"
  parallel-fewest-step  "samples N independent trajectories and keeps the one with the fewest
                        steps" (no management inside an attempt: each runs until its window is full)
  none                  no management: the run ends when the next call no longer fits.
What is kept besides the tool history is not in the paper (§8); here it is the head of the
conversation: everything up to and including the last user (or developer) message.
"""

from __future__ import annotations

STRATEGIES = ("none", "summary", "discard-75", "discard-all", "parallel-fewest-step")
TRIGGER = 0.8        # §4: share of the context window
SUMMARY_REQUEST = (
    "Your context is almost full. Summarise your work on the task so far: what you found (with "
    "sources), what you tried, and what remains to be done. The history will be replaced by your "
    "summary, so write everything you need to continue from it alone.")
SUMMARY_HEADER = "\n\n## Progress so far (your summary of the earlier steps)\n\n"


def triggered(prompt_tokens: int, max_new_tokens: int, window: int, share: float = TRIGGER) -> bool:
    """§4 trigger: the next call (its prompt plus the new tokens it may write) would use more than
    `share` of the context window."""
    return prompt_tokens + max_new_tokens > share * window


def split(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(head, rounds): the messages up to and including the last user or developer message, and
    after it the tool-call rounds, each an assistant message with its tool results."""
    last = max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)
    head, rounds = messages[:last + 1], []
    for m in messages[last + 1:]:
        if m["role"] == "tool" and rounds:
            rounds[-1].append(m)
        else:
            rounds.append([m])
    return head, rounds


def discard_75(messages: list[dict]) -> list[dict]:
    """§4 Discard-75%: drop the oldest three quarters of the tool-call rounds (rounded up, so at
    least 75% go), keeping the newest quarter: 8 rounds keep 2, 5 keep 1, 3 keep none."""
    head, rounds = split(messages)
    return head + [m for r in rounds[len(rounds) - len(rounds) // 4:] for m in r]


def discard_all(messages: list[dict]) -> list[dict]:
    """§4 Discard-all: reset to the task, every tool-call round dropped."""
    return split(messages)[0]


def summarized(messages: list[dict], summary: str) -> list[dict]:
    """§4 Summary: the rollout re-starts from the task, its last user message followed by the
    model's summary of the overflowed trajectory (where the summary goes is not in the paper)."""
    head, _ = split(messages)
    if not head:
        return []
    task = head[-1]
    return head[:-1] + [{**task, "content": task["content"] + SUMMARY_HEADER + summary}]


def apply(event: dict, messages: list[dict]) -> list[dict]:
    """The view after a context event."""
    strategy = event["strategy"]
    if strategy == "discard-75":
        return discard_75(messages)
    if strategy == "discard-all":
        return discard_all(messages)
    if strategy == "summary":
        return summarized(messages, event["summary"])
    raise ValueError(f"no context event for strategy {strategy!r}")


def view(log: list[dict]) -> list[dict]:
    """The messages the model sees: the log replayed, each context event applied to what came
    before it."""
    out: list[dict] = []
    for entry in log:
        if entry["role"] == "context":
            out = apply(entry, out)
        else:
            out.append(entry)
    return out


def fewest_steps(steps: list[int], answered: list[bool]) -> int | None:
    """§4 Parallel-fewest-step: the index of the attempt with the fewest steps among those that
    answered (the first on ties), or None if none did."""
    best = [i for i in range(len(steps)) if answered[i]]
    return min(best, key=lambda i: steps[i]) if best else None
