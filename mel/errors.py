"""Errors that say what was wrong and what to do about it.

Every user-facing failure in the library raises a subclass of MELError, so the CLI and the
app can show the message instead of a traceback.
"""
import math


class MELError(Exception):
    """Base class for errors meant to be shown to a user."""


class InputError(MELError, ValueError):
    """Bad user input: a span outside the caption, an empty caption, a corrupt image..."""


class DatasetFormatError(MELError):
    """A dataset file is malformed. The message names the file and the record."""

    def __init__(self, path, message, record=None):
        where = f"{path}" + (f", record {record!r}" if record is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.record = record


class KBError(MELError):
    """A knowledge base file is missing, locked, empty or of another version."""


class ModelUnavailableError(MELError):
    """A model or backend cannot be loaded here (no hub access, missing optional package)."""


class CheckpointError(MELError):
    """A checkpoint directory is missing files or its config does not match the model."""


MAX_WHOLE = 2**31 - 1  # the largest count a command accepts by default (SQLite, numpy and C take it as is)


def require_whole(label: str, value, low: int, high: int | None = MAX_WHOLE):
    """`value` if it is a whole number >= `low` and <= `high` (None: no upper bound), not a bool, else an
    InputError naming `label` (a count past `high` would overflow SQLite's LIMIT, islice or a C int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{label} must be a whole number >= {low}, got {_shown(value)}")
    if high is not None and value > high:
        raise InputError(f"{label} is too large (at most {high:,}), got {_shown(value)}")
    return value


def _shown(value) -> str:
    """repr of `value`, short even for a huge int (str() of one with over 4,300 digits is refused)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        sign = "negative " if value < 0 else ""
        return f"a {sign}number of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    return repr(value)


def require_finite(label: str, value, low: float | None = None, high: float | None = None):
    """`value` if it is a finite number within the inclusive bounds given, else an InputError naming `label`."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        span = f" between {low} and {high}" if high is not None else (f" >= {low}" if low is not None else "")
        raise InputError(f"{label} must be a finite number{span}, got {value!r}")
    return value
