"""User plugins: a Python file that registers a pattern (``@PATTERNS.register``) or a backend
(``@BACKENDS.register``). Loaded only when the user names it with ``--plugin``; the worker
process loads the same files (passed through SPARSEBENCH_PLUGINS)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from sparsebench.errors import ScenarioError

ENV = "SPARSEBENCH_PLUGINS"


def load(paths: list[Path] | tuple[Path, ...]) -> None:
    loaded = []
    for raw in paths:
        path = Path(raw).resolve()
        if not path.is_file() or path.suffix != ".py":
            raise ScenarioError(f"--plugin {raw}: not a Python file")
        name = f"sparsebench_plugin_{path.stem}"
        if name in sys.modules:
            loaded.append(str(path))
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ScenarioError(f"--plugin {raw}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        # registered before it runs, as an import does: a dataclass under `from __future__ import
        # annotations` looks its module up in sys.modules while the class is being made
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's one-line error
            del sys.modules[name]
            raise ScenarioError(f"--plugin {raw}: {type(exc).__name__}: {exc}") from None
        loaded.append(str(path))
    if loaded:
        os.environ[ENV] = os.pathsep.join(loaded)


def load_from_env() -> None:
    value = os.environ.get(ENV, "")
    if value:
        load([Path(p) for p in value.split(os.pathsep) if p])
