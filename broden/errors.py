"""Error types shared by every package: the CLIs map InputError to exit code 2."""
from __future__ import annotations

__all__ = ["InputError", "BrodenFormatError"]


class InputError(ValueError):
    """Bad user input (a file, field or option): the message says what was expected."""


class BrodenFormatError(InputError):
    """A Broden-format directory breaks the format; the message names the file and row."""
