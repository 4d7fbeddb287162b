"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class ConfigError(ValueError):
    """Bad user input (flags, presets, files): the message names the offending argument."""
