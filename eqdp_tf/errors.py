"""Errors caused by the user's input rather than by a bug, and the one formatter of messages for the user.

`train.py` prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Base class: a mistake in flags, configuration, data or environment that the user can fix."""


class ConfigError(UserError, ValueError):
    """Unknown, out-of-range or contradictory settings."""


class DataError(UserError):
    """Dataset missing, truncated, corrupt or of the wrong shape."""


class PrivacyError(ConfigError):
    """Privacy parameters that are impossible or cannot reach the requested guarantee."""


def one_line(error):
    """A message for the user as one line: an OS error's own text (``strerror``), a TensorFlow error's ``message``
    without its ``{{function_node ...}}`` and ``[Op:...]`` clutter, otherwise ``str(error)``."""
    if isinstance(error, BaseException):
        text = getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)
    else:
        text = str(error)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", str(text))
    text = re.sub(r"\s*\[Op:[^\]]*\]", "", text)
    return " ".join(text.split())
