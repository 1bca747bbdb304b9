"""Errors a user can cause. Each carries one message that names the key/file/line and says what to do."""


class SFTLabError(Exception):
    """A problem with the user's config, data, paths or environment (not a bug in sftlab)."""


class ConfigError(SFTLabError):
    """A config value is invalid; raised before any model or data is loaded."""


class DataError(SFTLabError):
    """A data row or file is invalid; the message names the file and line."""
