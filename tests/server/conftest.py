import pytest
from scripted import Server, engine_args, tiny_v32_dir

from dsv32.server import load_engine


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A served random tiny V3.2-format model (each test module its own; a module may define its own)."""
    engine, tok = load_engine(engine_args(tiny_v32_dir(tmp_path_factory.mktemp("tiny-served"))))
    server = Server(engine, tok)
    yield server
    server.stop()
