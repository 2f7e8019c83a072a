"""Dotted keys of nested dicts: the one flattening that configs and result rows share.

``config`` (``--set a.b=value`` overrides) and ``results`` (a row's ``config/a/b`` columns)
both import it from here, so that neither imports the other.
"""

from __future__ import annotations


def flatten(data: dict, prefix: str = "", sep: str = "."):
    """(key, value) pairs of a nested dict, keys joined by sep: {"a": {"b": 1}} -> ("a.b", 1)."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}{sep}", sep)
        else:
            yield f"{prefix}{key}", value
