"""The command line. ``app.py`` holds the typer app, its one error handler and ``main``; ``run.py``
(run, validate), ``inspect.py`` (list, show, env), ``report.py`` (plot, compare), ``history.py``,
``merge.py`` (merge), ``kv.py`` (kv) and ``capture.py`` (capture) hold the commands and use app.py's
helpers. Python imports this package before any of its modules (``sparsebench.cli.app:main`` is the
console script), and here every command is added to the app, in the order ``--help`` lists them."""

from sparsebench.cli import capture, history, inspect, kv, merge, report, run
from sparsebench.cli.app import app

for _module in (run, inspect, report, history, merge, kv, capture):
    _module.register(app)
