"""User-facing errors. The CLI prints these as one clear message (never a traceback)."""

from __future__ import annotations


class SSLRecipeError(Exception):
    """An error the user can act on: the message says what is wrong, where, and what to do."""


class RecipeError(SSLRecipeError):
    """A recipe file or override is invalid."""


class DataError(SSLRecipeError):
    """Input data is missing, unreadable or inconsistent."""


class StageError(SSLRecipeError):
    """A pipeline stage failed in a way that needs the user's attention (e.g. a non-finite loss)."""
