"""Checks every command makes before it loads a model: each one cheap, each failure one sentence.

A user who typed `--device gpu`, a busy `--port` or a path that does not exist should hear so in a
second, not after a 40 s load and a 30-line traceback. Each check raises ValueError or
FileNotFoundError (the CLI prints those as one `error:` line and exits 2) or returns the cleaned
value. Standard library only at import time (torch is asked only about its CUDA build).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
from pathlib import Path


def device(name: str | None) -> str:
    """The device to run on: `name` checked against what this torch build can reach, or the
    default (cuda if there is one, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if m is None:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this machine has no MPS device; use --device cpu")
    return name


def model_source(source: str | None, presets=()) -> str | None:
    """A --model value that can be loaded: None (the default model), a preset name, or an existing
    path; anything else is named before a loader starts."""
    if source is None or source in presets or Path(source).exists():
        return source
    raise FileNotFoundError(f"no model at {source}: expected a model directory, a .gguf file, or a preset "
                            f"name ({', '.join(presets)})")


def preset_name(name: str | None, presets) -> str | None:
    if name is not None and name not in presets:
        raise ValueError(f"unknown preset {name!r}: choose from {', '.join(presets)}")
    return name


def has_thinking_mode(source: str | None) -> bool:
    """Whether the model at `source` speaks a chat format with a thinking mode, known from its
    family (dsv32.registry) before any load: the default model's, a GGUF file's, or the one its
    config.json's model_type names."""
    from dsv32.registry import DEFAULT_FAMILY, GGUF_FAMILY, family

    if source is None or str(source).endswith(".gguf"):
        return family(DEFAULT_FAMILY if source is None else GGUF_FAMILY).thinking
    config = Path(source) / "config.json"
    if not config.is_file():
        return True  # a preset, or something the loader will name
    try:
        thinking = family(json.loads(config.read_text()).get("model_type")).thinking
    except (ValueError, OSError, AttributeError):
        return True  # the loader names a broken config.json or an unknown model_type
    return thinking or has_v32_tokens(Path(source) / "tokenizer.json")


def has_v32_tokens(tokenizer_json: Path) -> bool:
    """Whether a tokenizer.json lists all of V3.2's chat tokens as added tokens (a model of another
    family given V3.2's format, dsv32.llama.v32_chat); False where the file is missing or unreadable."""
    from dsv32.chat import SPECIAL_TOKENS

    try:
        added = {t.get("content") for t in json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])}
    except (OSError, ValueError, AttributeError):
        return False
    return all(t in added for t in SPECIAL_TOKENS)


def port_free(host: str, port: int) -> None:
    """Raise if nothing can listen on host:port (checked by binding, then released)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"port {port} on {host} is in use or not available ({e.strerror}): "
                             "pick another with --port") from None


TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")


def text_files(paths: list[str], suffixes=TEXT_SUFFIXES) -> list[Path]:
    """Files to read text from: files as given, directories walked for files with these suffixes
    (hidden ones skipped), a path that does not exist named."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"{p} is a directory with no {', '.join(suffixes)} files in it")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return files


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n
