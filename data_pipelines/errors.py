"""Data problems a user can cause (config, paths, files).

``DataConfigError`` is a :class:`megatron_ext.errors.ConfigError`, the project's one exception type
for user mistakes, so the launcher reports it like any other config error.
"""

from megatron_ext.errors import ConfigError


class DataConfigError(ConfigError):
    """A data config, path or file is wrong; the message names the field and the fix."""
