"""The command line. ``app.py`` holds the typer app, its one error handler and ``main``; ``run.py``
(run, validate), ``inspect.py`` (list, show, env), ``report.py`` (plot, compare) and ``kv.py`` (kv)
hold the commands. Importing the package imports ``app`` first, which registers every command."""

from sparsebench.cli import app as _app  # noqa: F401
