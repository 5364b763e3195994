"""Rendering: tables, summary.md, report.html and the figures."""
