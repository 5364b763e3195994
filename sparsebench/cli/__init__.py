"""The command line: the app and its one error handler, and one module per group of commands."""
