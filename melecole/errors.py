"""User-facing errors. Scripts print their message on one line instead of a traceback."""


class MeLeCoLeError(Exception):
    """Base class: the message names the file / key / config field and what was expected."""


class ConfigError(MeLeCoLeError, ValueError):
    """A config file, key or value is wrong."""


class DataError(MeLeCoLeError, ValueError):
    """An input volume, folder or HDF5 key is missing or has the wrong shape/type."""


class CheckpointError(MeLeCoLeError, ValueError):
    """A checkpoint is missing, unreadable or does not fit the model/config."""
