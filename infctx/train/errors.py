"""Errors that the CLI reports as one line instead of a traceback."""


class ConfigError(ValueError):
    """A recipe value is wrong; the message names the field and what to do."""
