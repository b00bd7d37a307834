"""Errors that reach the user as one line."""


class RopelensError(Exception):
    """An error the user can fix; printed as one line, never with a traceback."""


class ConfigError(RopelensError):
    """Bad configuration: the message names the key and the fix."""


class DataError(RopelensError):
    """Bad or missing input data."""
