"""The one domain exception family. Library code raises these; only the CLI (``sparsebench.cli``) turns them
into an exit code and one line of text."""

from __future__ import annotations


class SparsebenchError(Exception):
    """A user-facing problem: the message is one actionable line."""

    exit_code = 1


class ScenarioError(SparsebenchError):
    """A scenario file (or a command-line value) is malformed or impossible."""

    exit_code = 2


class PatternError(ScenarioError):
    """A pattern name or its parameters are invalid for the requested sequence length."""


class BackendUnavailable(SparsebenchError):
    """A backend cannot run here (missing library, device, dtype or mode)."""


class ResultsError(SparsebenchError):
    """A result folder is missing, empty, truncated or from another schema version."""

    exit_code = 2
