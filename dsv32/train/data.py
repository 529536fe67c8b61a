"""Training data from local files: plain text / source files and JSONL (`text`, or `messages` for
SFT), tokenised once, packed into fixed-length windows.

Pretraining packs documents back to back, each opened with BOS and closed with EOS, so no window
hides where one document ends and the next begins. Batches are a pure function of (seed, step):
a resumed run sees exactly the batches an uninterrupted one would.
"""

import json
from pathlib import Path

import numpy as np
import torch

from dsv32.train.losses import IGNORE


def read_documents(paths: list[str | Path]) -> list:
    """Each file is one document, except JSONL files: one document (a `text` string or a
    `messages` list) per line. Directories are walked for .txt, .md, .py and .jsonl files."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md", ".py", ".jsonl"))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"training data {p} does not exist")
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f.name}:{n}: not JSON ({e})") from None
                if "messages" in row:
                    docs.append(row["messages"])
                elif "text" in row:
                    docs.append(row["text"])
                else:
                    raise ValueError(f"{f.name}:{n}: a JSONL row needs 'text' or 'messages'")
        else:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise ValueError(f"no documents found in {', '.join(map(str, paths))}")
    return docs


class PackedData:
    """Token stream of all documents; batch(step) draws windows of seq_len + 1 tokens."""

    def __init__(self, ids: np.ndarray, seq_len: int, seed: int = 0):
        if len(ids) < seq_len + 2:
            raise ValueError(f"{len(ids)} tokens of data cannot fill one window of {seq_len + 1}")
        self.ids, self.seq_len, self.seed = ids, seq_len, seed

    @classmethod
    def from_documents(cls, docs: list[str], tokenizer, seq_len: int, seed: int = 0) -> "PackedData":
        chunks = [[tokenizer.bos_id] + tokenizer.encode(d) + [tokenizer.eos_id] for d in docs if isinstance(d, str)]
        return cls(np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks]), seq_len, seed)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels), each [batch_size, seq_len]; labels are the next tokens."""
        g = np.random.default_rng([self.seed, step])
        starts = g.integers(0, len(self.ids) - self.seq_len - 1, size=batch_size)
        w = np.stack([self.ids[s:s + self.seq_len + 1] for s in starts])
        w = torch.from_numpy(w)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class SFTData:
    """Conversations: the last assistant message is the target, everything before it the prompt
    (rendered with the V3.2 chat format); only target tokens carry labels."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, seed: int = 0):
        if not examples:
            raise ValueError("no SFT examples (JSONL rows with 'messages' ending in an assistant turn)")
        self.examples, self.seq_len, self.pad_id, self.seed = examples, seq_len, pad_id, seed

    @classmethod
    def from_documents(cls, docs: list, tokenizer, seq_len: int, thinking_mode: str = "chat", seed: int = 0):
        from dsv32.chat import encode_completion, encode_messages

        examples = []
        for msgs in docs:
            if isinstance(msgs, str) or not msgs or msgs[-1].get("role") != "assistant":
                continue
            prompt = tokenizer.encode(encode_messages(msgs[:-1], thinking_mode))
            target = tokenizer.encode(encode_completion(msgs[-1], thinking_mode))
            ids = (prompt + target)[: seq_len + 1]
            labels = ([IGNORE] * len(prompt) + target)[: seq_len + 1]
            examples.append((ids, labels))
        return cls(examples, seq_len, tokenizer.eos_id, seed)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: [batch_size, L], rows right-padded; L is the longest row rounded up to a multiple of
        64 (at most seq_len), not seq_len: padding past every row's end changes no loss (causal
        attention, IGNORE labels) and costs compute (a quarter or more of it for the agent
        experiment's trajectories)."""
        g = np.random.default_rng([self.seed, step])
        rows = [self.examples[i] for i in g.integers(0, len(self.examples), size=batch_size)]
        width = min(self.seq_len, -(-max(len(ids) - 1 for ids, _ in rows) // 64) * 64)
        x = torch.full((batch_size, width), self.pad_id)
        y = torch.full((batch_size, width), IGNORE)
        for row, (ids, labels) in enumerate(rows):
            n = min(len(ids) - 1, width)
            x[row, :n] = torch.tensor(ids[:n])
            y[row, :n] = torch.tensor(labels[1:n + 1])
        return x, y
