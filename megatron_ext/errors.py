"""The one exception type for mistakes a user can make (config values, data, paths).

Messages name the offending field and say how to fix it. The launcher prints them without a
traceback and exits with status 2; internal invariants use ``assert`` instead.
"""


class ConfigError(ValueError):
    """A config value, data file or path the user supplied is wrong; the message says how to fix it."""


class ExportRefused(ConfigError):
    """A checkpoint uses a feature the target format cannot represent; the message names the feature.

    Exporting anyway would write a checkpoint that loads but computes something else."""
