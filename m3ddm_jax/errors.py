"""User-facing errors.

Every error that a user can cause (a bad file, a bad checkpoint, a bad config or argument) is raised as a
subclass of :class:`UserError`. Entry scripts catch exactly this class and print its message as one line
on stderr with a non-zero exit; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""


class CheckpointError(UserError):
    """A weights file or folder is missing, unreadable, or does not match the model."""


class ConfigError(UserError):
    """A model or run configuration holds a value this implementation does not support."""
