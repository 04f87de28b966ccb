"""Exceptions for user mistakes: the CLI prints them as one line, the server maps them to 4xx."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (bad input, missing model); never shown as a traceback."""


class InvalidRequestError(UserError, ValueError):
    """A request parameter is invalid. ``param`` names it, as OpenAI error bodies do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(UserError):
    """The model folder or hub id could not be resolved to a local diffusers-layout folder."""
