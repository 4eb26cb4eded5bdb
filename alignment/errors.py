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
