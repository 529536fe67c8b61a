import pytest
from scripted import Server, engine_args, tiny_v32_dir

from dsv32.server import load_engine


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random tiny V3.2-format checkpoint (a module may define its own)."""
    return tiny_v32_dir(tmp_path_factory.mktemp("tiny-test"))


@pytest.fixture(scope="module")
def real(model_dir):
    """That model served, each test module its own server."""
    engine, tok = load_engine(engine_args(model_dir))
    server = Server(engine, tok)
    yield server
    server.stop()
