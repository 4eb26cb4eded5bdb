"""Error types that the entry points turn into one-line messages (no traceback).

Every error raised for bad user input must name the offending config key, file or row, e.g.
``ConfigError("method.beta must be > 0, got -5.0")``.
"""


class AlignmentError(Exception):
    """Base class of the errors that are reported to the user as one line."""


class ConfigError(AlignmentError):
    """A config key has a bad value, an unknown name or a missing file."""


class DataError(AlignmentError):
    """A dataset is missing, lacks required columns, or holds unreadable rows."""


class TrainingError(AlignmentError):
    """Training cannot go on (e.g. a non-finite loss)."""


def exit_on_error(entry_point):
    """Decorate an entry point so that an ``AlignmentError`` is printed as ``error: <message>`` on stderr and the
    process exits with status 2, without a traceback (the message already names the key, file or row)."""
    import functools
    import sys

    @functools.wraps(entry_point)
    def wrapper(*args, **kwargs):
        try:
            return entry_point(*args, **kwargs)
        except AlignmentError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
