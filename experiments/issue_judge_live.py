"""The issue judge (dsv32.synth.issue_judge) against a live OpenAI-compatible endpoint, on the
commit messages of a repository's history: the newest `--n` commits that change both tests and
source (the miner's candidates, without running their tests), each judged with its gold patch and
test patch. Prints one JSON line per commit and the count of each verdict.

    dsv32 serve --max-model-len 8192 --port 8000 &                          # the default model
    python experiments/issue_judge_live.py --repo . --rev 8d43985 --n 8 --base-url http://127.0.0.1:8000/v1

The patches are cut to `--max-patch-chars` (4,000 by default, so that rubric and patches fit an
8K window) and the judge writes at most `--max-tokens` per reply. docs/synth.md reports a run.
"""

import argparse
import json
import time
from collections import Counter

from dsv32.agent.policy import OpenAIPolicy
from dsv32.engine import SamplingParams
from dsv32.synth.git_history import commits, diff, read_commit
from dsv32.synth.issue_judge import IssueJudge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True)
    p.add_argument("--rev", default="HEAD")
    p.add_argument("--n", type=int, default=8, help="commits to judge")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", help="default: the first model the endpoint serves")
    p.add_argument("--max-patch-chars", type=int, default=4000)
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()
    judge = IssueJudge(OpenAIPolicy(args.base_url, args.model, thinking_mode="chat"),
                       sampling=SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                       max_patch_chars=args.max_patch_chars)
    counts, start = Counter(), time.monotonic()
    for sha in commits(args.repo, args.rev, None):
        c = read_commit(args.repo, sha)
        if c.parent is None or not c.test_paths or not c.source_paths:
            continue
        v = judge(c.message, diff(args.repo, c.parent, sha, c.source_paths), diff(args.repo, c.parent, sha, c.test_paths))
        counts[v.verdict] += 1
        print(json.dumps({"commit": sha[:12], "subject": c.message.splitlines()[0][:80], **v.to_json()}), flush=True)
        if sum(counts.values()) >= args.n:
            break
    print(json.dumps({"verdicts": dict(counts), "seconds": round(time.monotonic() - start)}))


if __name__ == "__main__":
    main()
