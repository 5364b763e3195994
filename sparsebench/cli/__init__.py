"""The command line. ``app.py`` holds the typer app, its one error handler and ``main``; ``run.py``
(run, validate), ``inspect.py`` (list, show, env), ``report.py`` (plot, compare) and ``kv.py`` (kv)
hold the commands and use app.py's helpers. Python imports this package before any of its modules
(``sparsebench.cli.app:main`` is the console script), and here every command is added to the app,
in the order ``--help`` lists them."""

from sparsebench.cli import history, inspect, kv, report, run
from sparsebench.cli.app import app

for _module in (run, inspect, report, history, kv):
    _module.register(app)

from sparsebench.cli import merge as _merge  # noqa: E402 - issue 22's command, after the others

_merge.register(app)
