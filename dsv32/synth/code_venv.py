"""A repository's virtualenv: built once under the miner's output folder, with the repository's
declared dependencies installed, and reused by every run of its tests (issue 18: "a per-repo
virtualenv with its dependencies installed once and reused").

By default the venv is isolated from the miner: `python -m venv --without-pip` of the current
interpreter, without `--system-site-packages`, so neither the base install's site-packages nor
this process's (when it runs in a venv) are on its `sys.path`. It is then seeded with copies of
the build and test tools only (`SEEDS`: pip, setuptools, wheel, pytest, and what they require,
as installed here), with their dist-info (so pip sees them installed and may replace them) and
console scripts that run the venv's python. Everything else the repository needs, it must
install. `inherit=True` gives the venv of before: `--system-site-packages`, plus a `.pth` line
naming this interpreter's own site-packages when it is a venv, so whatever the miner can import
stays reachable behind what the repository installs.

The install, in the sandbox with the venv bound writable, from the snapshot's root:
- `pip install -r F` for each `requirements*.txt`, sorted by name;
- `pip install R...` for pyproject.toml's `[build-system] requires` (the build backend: the
  build below is not isolated, so the backend must be in the venv, or reachable from it);
- `pip install --no-build-isolation .` when there is a `pyproject.toml`, `setup.py` or
  `setup.cfg` (not `-e`: an editable install would point at the sandbox's work directory, which
  is gone after the build; the runs put their own checkout first on PYTHONPATH instead, `src/`
  too when there is one, so the installed copy of the package never shadows the code under test).
pip runs with `--no-index` unless the network is allowed (`allow_network`, which also keeps the
host's network in the sandbox); `--find-links DIR` adds local wheels either way.

The stamp, `dsv32-venv.json` in the venv, holds the SHA-256 of the dependency files (their names
and bytes), whether the venv inherits the miner's packages, and whether the install worked. A
later build with the same hash and the same `inherit` reuses the venv; a changed dependency file
rebuilds it from nothing. A failed install is reused as failed (with its pip log) only under the
same install options, so rerunning with `--find-links` or the setup agent tries again. When a
`fixer` is given (the environment-setup agent, dsv32.synth.code_setup_agent), a failed install is
handed to it, and the venv counts as built when the fixer makes the test suite collect.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.agent.sandbox import Limits, Sandbox
from dsv32.synth.code_env import extract, hand_over, run_env

STAMP = "dsv32-venv.json"
PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")
REQUIREMENTS = "requirements*.txt"
LOG_TAIL = 4000
COLLECT_CMD = "python -m pytest --collect-only -q -p no:cacheprovider"
SEEDS = ("pip", "setuptools", "wheel", "pytest")   # what an isolated venv gets from the miner (with their requirements)


@dataclass(frozen=True)
class VenvOptions:
    """How the venv is built: offline unless `allow_network`; `find_links` are local wheel folders."""

    allow_network: bool = False
    find_links: tuple[str, ...] = ()
    timeout: float = 900.0      # seconds for the whole install
    fixer: str | None = None    # the setup agent's name (its model), recorded in the stamp
    inherit: bool = False       # True: the venv also sees the miner's packages (--system-site-packages and more)

    def key(self) -> dict:
        return {"allow_network": self.allow_network, "find_links": [str(Path(d).resolve()) for d in self.find_links],
                "fixer": self.fixer, "inherit": self.inherit}


@dataclass
class VenvState:
    """The venv at `path` as its stamp records it: `ok`, or why not (`detail`, the log's tail)."""

    path: Path
    stamp: str                      # the dependency files' hash
    files: list[str]                # the dependency files found
    ok: bool
    detail: str = ""
    log: str = field(default="", repr=False)
    built: bool = False             # True when this call built it; False when it was reused
    seconds: float = 0.0

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


# the fixer: (sandbox, repository checkout inside it, venv, the failed install's log) -> (ok, what it did)
Fixer = Callable[[Sandbox, Path, Path, str], tuple[bool, str]]


def dependency_files(tar_path: Path) -> dict[str, bytes]:
    """{name: bytes} of the snapshot's root-level dependency files."""
    out = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            if m.isfile() and "/" not in m.name and (m.name in PROJECT_FILES or fnmatch.fnmatch(m.name, REQUIREMENTS)):
                out[m.name] = tar.extractfile(m).read()
    return dict(sorted(out.items()))


def stamp_of(files: dict[str, bytes]) -> str:
    """SHA-256 over the dependency files' names and contents, and the interpreter's version."""
    h = hashlib.sha256(f"python {sys.version_info[0]}.{sys.version_info[1]}\0".encode())
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def build_requires(pyproject: bytes) -> list[str]:
    """`[build-system] requires` of a pyproject.toml ([] when it has none or does not parse)."""
    try:
        data = tomllib.loads(pyproject.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    requires = data.get("build-system", {}).get("requires", [])
    return [r for r in requires if isinstance(r, str)] if isinstance(requires, list) else []


def install_commands(files: dict[str, bytes], venv: Path, options: VenvOptions) -> list[tuple[str, str]]:
    """(what, the pip command) for each install step, run from the repository's root."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
           "--no-input"]
    if not options.allow_network:
        pip.append("--no-index")
    for d in options.find_links:
        pip += ["--find-links", str(Path(d).resolve())]
    cmds = [(f"-r {f}", shlex.join(pip + ["-r", f])) for f in files if fnmatch.fnmatch(f, REQUIREMENTS)]
    if any(f in PROJECT_FILES for f in files):
        # the build backend first: the build is not isolated, so it must be in (or reachable from) the venv
        if requires := build_requires(files.get("pyproject.toml", b"")):
            cmds.append((f"the build requirements {' '.join(requires)}", shlex.join(pip + requires)))
        cmds.append((". (the project)", shlex.join(pip + ["--no-build-isolation", "."])))
    return cmds


def read_stamp(venv: Path) -> dict | None:
    try:
        return json.loads((venv / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _parent_site_packages() -> list[str]:
    """This interpreter's own site-packages when it is a venv (the base install's come with
    --system-site-packages)."""
    if sys.prefix == sys.base_prefix:
        return []
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def _requirement_names(dist: importlib.metadata.Distribution) -> list[str]:
    """The names of what `dist` requires, leaving out the requirements of its extras."""
    out = []
    for req in dist.requires or []:
        if not re.search(r"\bextra\s*==", req) and (m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)):
            out.append(m.group())
    return out


def seed_distributions(names: tuple[str, ...] = SEEDS) -> list[importlib.metadata.Distribution]:
    """The distributions `names`, as this interpreter has them installed, and, recursively, the
    ones they require (extras' requirements left out; one not installed here is skipped, so a
    requirement for another platform or Python costs nothing)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[name] = dist
        todo += _requirement_names(dist)
    return [found[n] for n in sorted(found)]


def seed(venv: Path, site: Path, dists: list[importlib.metadata.Distribution]) -> list[str]:
    """Copy each distribution's files that live in its site-packages (modules and dist-info) into
    the venv's `site`, and write its console scripts into the venv's bin/, run by the venv's
    python. Returns "name version" for each."""
    for dist in dists:
        for f in dist.files or []:
            src = Path(dist.locate_file(f))
            if ".." in f.parts or not src.is_file():   # scripts in bin/, or listed and gone
                continue
            dest = site / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        for ep in dist.entry_points.select(group="console_scripts"):
            script = venv / "bin" / ep.name
            head = ep.attr.split(".")[0]
            script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {ep.module} import {head}\n"
                              f"sys.exit({ep.attr}())\n", encoding="utf-8")
            script.chmod(0o755)
    return [f"{d.metadata['Name']} {d.version}" for d in dists]


def create(venv: Path, inherit: bool = False) -> list[str]:
    """An empty venv of this interpreter at `venv`: isolated and seeded with the build and test
    tools (returned as "name version"), or, with `inherit`, one that sees what this interpreter
    sees (returns [])."""
    flags = ["--system-site-packages"] if inherit else []
    subprocess.run([sys.executable, "-m", "venv", *flags, "--without-pip", str(venv)], check=True,
                   capture_output=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    if not inherit:
        return seed(venv, site, seed_distributions())
    if parents := _parent_site_packages():
        (site / "_dsv32_parent.pth").write_text("".join(p + "\n" for p in parents), encoding="utf-8")
    return []


def collects(box: Sandbox, venv: Path, timeout: float) -> tuple[bool, str]:
    """Whether pytest collects the checkout's tests without errors (exit status 0, or 5: none
    collected), and its output."""
    r = box.run(["sh", "-c", run_env(venv) + COLLECT_CMD], timeout=timeout, max_output=LOG_TAIL)
    return (not r.timed_out and r.exit_code in (0, 5)), r.output


def ensure_venv(venv: Path, tar_path: Path, sandbox_root: Path, options: VenvOptions = VenvOptions(), *,
                unsafe_no_sandbox: bool = False, memory_gb: float = 16.0, fixer: Fixer | None = None) -> VenvState:
    """The venv for the snapshot `tar_path`: reused when its stamp matches (the dependency files'
    hash, and `options.inherit`), else built (the install runs in a sandbox under `sandbox_root`)."""
    venv = Path(venv).resolve()
    files = dependency_files(tar_path)
    stamp = stamp_of(files)
    rec = read_stamp(venv)
    if (rec is not None and rec.get("stamp") == stamp and rec.get("inherit", True) == options.inherit
            and (rec.get("ok") or rec.get("options") == options.key())):  # a stamp without "inherit" predates isolation
        return VenvState(venv, stamp, list(files), bool(rec["ok"]), rec.get("detail", ""), rec.get("log", ""))
    start = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    seeded = create(venv, options.inherit)
    limits = Limits(cpu_seconds=int(options.timeout) + 60, memory_bytes=int(memory_gb * (1 << 30)),
                    processes=512, file_size_bytes=4 << 30, open_files=4096, tmp_bytes=2 << 30)
    links = tuple(str(Path(d).resolve()) for d in options.find_links)  # read-only inside, at the same paths
    box = Sandbox(sandbox_root, "venv", limits=limits, unsafe_no_sandbox=unsafe_no_sandbox, rw_paths=(str(venv),),
                  ro_paths=links, network=options.allow_network)
    try:
        repo = box.work / "repo"
        extract(tar_path, repo)
        hand_over(box, repo)
        hand_over(box, venv)
        log, ok, detail = [], True, f"installed {', '.join(files) or 'nothing (no dependency files)'}"
        for what, cmd in install_commands(files, venv, options):
            r = box.run(["sh", "-c", run_env(venv) + cmd], timeout=options.timeout, max_output=LOG_TAIL)
            log.append(f"$ {cmd}\n{r.output}")
            if r.timed_out or r.exit_code != 0:
                why = f"timed out after {options.timeout:g}s" if r.timed_out else f"exit status {r.exit_code}"
                ok, detail = False, f"pip install {what}: {why}"
                break
        text = "\n".join(log)
        if not ok and fixer is not None:
            fixed, what = fixer(box, repo, venv, text[-LOG_TAIL:])
            text += f"\n--- setup agent ---\n{what}"
            ok, detail = fixed, (f"fixed by the setup agent after: {detail}" if fixed
                                 else f"{detail}; the setup agent did not fix it")
    finally:
        box.remove()
        _take_back(venv)
    state = VenvState(venv, stamp, list(files), ok, detail, text[-LOG_TAIL:], True, time.monotonic() - start)
    (venv / STAMP).unlink(missing_ok=True)  # the install could write there: a link must not be followed
    (venv / STAMP).write_text(json.dumps({"stamp": state.stamp, "files": state.files, "ok": ok, "detail": detail,
                                          "log": state.log, "options": options.key(), "inherit": options.inherit,
                                          "seeded": seeded,
                                          "seconds": round(state.seconds, 2)}, indent=1) + "\n", encoding="utf-8")
    return state


def _take_back(tree: Path) -> None:
    """Give the venv back to us (the sandbox's uid built it), read-only for the runs' sandboxes."""
    uid, gid = os.getuid(), os.getgid()
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            try:
                if os.lstat(path).st_uid != uid:
                    os.chown(path, uid, gid, follow_symlinks=False)
            except OSError:
                pass
