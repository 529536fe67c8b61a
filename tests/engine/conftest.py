"""Fixtures shared by the engine tests: one intra-op thread, and a tiny random model."""

import pytest
import torch

from dsv32.config import preset
from dsv32.model import Transformer


@pytest.fixture(scope="module")
def one_thread():
    """These forwards are tiny: one intra-op thread runs them fastest, and on a busy two-core
    machine a second, spinning OpenMP thread slows a file tenfold. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with a DSA top-k of 8, seeded, in eval mode."""
    torch.manual_seed(0)
    return Transformer(preset("tiny").replace(index_topk=8)).eval()
