"""Errors that mean "this machine cannot do what was asked", with a message that says what
to change. The CLI prints them as one line instead of a traceback."""

from __future__ import annotations


class ResourceError(RuntimeError):
    """A device, memory or other resource the request needs is not there."""
