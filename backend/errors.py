"""The few exception types PIEscope raises on purpose.

The CLI turns any `UserError` into one line on stderr and exit code 2; the API turns it into a
4xx answer with the message. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the person or client: the message says what and how to fix it."""

    http_status = 400


class NotFoundError(UserError):
    """A named thing (model, task, method, file, record) does not exist."""

    http_status = 404


class ShapeMismatchError(UserError):
    """A transcoder, patch or tensor whose shapes do not fit the model."""

    http_status = 422


class InvalidParameterError(UserError):
    """A parameter outside its allowed range (K <= 0, N too large, ...)."""

    http_status = 422


class ConflictError(UserError):
    """The request does not fit the record's state (cancelling a job that already finished)."""

    http_status = 409


class StoreBusyError(UserError):
    """Another worker owns the store (its lock is held): this process must touch nothing."""
