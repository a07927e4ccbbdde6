"""The model-loading error, in a module of its own so that the CLI can name it without importing torch."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as asked (missing files, unsupported family, bad span)."""
