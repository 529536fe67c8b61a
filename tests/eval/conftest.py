import json
import shutil
import textwrap

import pytest

from dsv32.agent.sandbox import SandboxError
from dsv32.eval.code import CodeJudge
from dsv32.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with the chat format's special tokens, trained on two stdlib files."""
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer([json.decoder.__file__, textwrap.__file__], 400, d)
    return d


@pytest.fixture(scope="module")
def judge(request, tmp_path_factory):
    """A CodeJudge in bubblewrap (skips where it cannot start one); a test module may set
    JUDGE_TIME_LIMIT, seconds per test (default 2)."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    try:
        j = CodeJudge(tmp_path_factory.mktemp("judge"), time_limit=getattr(request.module, "JUDGE_TIME_LIMIT", 2.0),
                      memory_mb=256)
    except SandboxError as e:
        pytest.skip(f"bubblewrap cannot start a sandbox here: {e}")
    yield j
    j.close()
