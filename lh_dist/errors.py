"""The error a user's setting raises: one line naming the field or flag and what it accepts."""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""
