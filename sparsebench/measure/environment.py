"""What machine and software a result came from (environment.json; `sparsebench env`)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(args: list[str], cwd: Path | None = None) -> str | None:
    """``git ARGS`` in ``cwd``: its output, or None outside a repository or without git."""
    if not shutil.which("git"):
        return None
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _git_commit(cwd: Path | None = None) -> str | None:
    return _git(["rev-parse", "HEAD"], cwd)


def _git_commit_date(cwd: Path | None = None) -> str | None:
    """The committer date of HEAD (ISO 8601 with its offset): ``sparsebench history``'s order."""
    return _git(["log", "-1", "--format=%cI"], cwd)


def _compiler() -> dict[str, Any]:
    for name in ("gcc", "cc", "clang"):
        path = shutil.which(name)
        if path:
            try:
                ver = subprocess.run(
                    [path, "--version"], capture_output=True, text=True, timeout=5
                ).stdout.splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                ver = ""
            return {"cxx_compiler": path, "cxx_compiler_version": ver}
    return {"cxx_compiler": None, "cxx_compiler_version": None}


CACHING = "caching (freed blocks of 1 MiB or more reused within a case)"

# Environment variables that change which kernels run or how they are timed, with what they do;
# environment.json records those set (its "switches"), and compare warns when two runs differ.
SWITCHES = {
    "SPARSEBENCH_NATIVE": "0: block_sparse's native CPU kernels off (PyTorch / ATen instead)",
    "SPARSEBENCH_TRITON": "0: block_sparse's Triton kernels off",
    "SPARSEBENCH_TRITON_TUNE": "0: the first fitting Triton launch setting, without autotuning",
    "SPARSEBENCH_TRITON_PARTS": "auto, always or never: residue bands as parts of their own in the Triton kernels",
    "SPARSEBENCH_TRITON_UNITS": "keys or union: the order the Triton kernels walk moba's and quest's units in",
    "TRITON_INTERPRET": "1: Triton kernels run in the interpreter",
    "SPARSEBENCH_ALLOCATOR": "system: PyTorch's CPU allocator as it is (no reuse of freed blocks)",
    "SPARSEBENCH_TEST_SLOWDOWN": "F (test only): timed calls take F times as long (extra work), the probe as it is",
}


def switches() -> dict[str, str]:
    """The SWITCHES set in this process's environment, with their values."""
    return {name: os.environ[name] for name in SWITCHES if name in os.environ}


def collect() -> dict[str, Any]:
    import torch

    import sparsebench

    info: dict[str, Any] = {
        "sparsebench": sparsebench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": None,
        "gpu_count": 0,
        "git_commit": _git_commit(),  # of the folder the run started in
        "git_commit_date": _git_commit_date(),
        "sparsebench_commit": _git_commit(Path(sparsebench.__file__).resolve().parent),  # editable installs
        "sparsebench_commit_date": _git_commit_date(Path(sparsebench.__file__).resolve().parent),
    }
    try:
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu"] = torch.cuda.get_device_name(0)
    info.update(_compiler())
    for mod in ("numpy", "pandas", "matplotlib", "pydantic", "typer"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    from sparsebench.backends import block_sparse
    from sparsebench.measure import memory

    # CPU cases: freed blocks kept for the next request (memory.freed_memory_reused), or not
    reuse = memory.allocator_policy() == "reuse" and block_sparse.native_enabled()
    info["cpu_allocator"] = CACHING if reuse else "system"
    info["switches"] = switches()
    try:  # block_sparse's kernels on CUDA; its version without importing it
        info["triton"] = metadata.version("triton")
    except metadata.PackageNotFoundError:
        info["triton"] = None
    return info
