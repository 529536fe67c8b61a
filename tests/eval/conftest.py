import json
import textwrap

import pytest

from dsv32.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with the chat format's special tokens, trained on two stdlib files."""
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer([json.decoder.__file__, textwrap.__file__], 400, d)
    return d
