"""Errors caused by the user's input rather than by a bug.

`train.py` prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class: a mistake in flags, configuration, data or environment that the user can fix."""


class ConfigError(UserError, ValueError):
    """Unknown, out-of-range or contradictory settings."""


class DataError(UserError):
    """Dataset missing, truncated, corrupt or of the wrong shape."""


class PrivacyError(ConfigError):
    """Privacy parameters that are impossible or cannot reach the requested guarantee."""
