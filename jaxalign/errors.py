"""User-facing errors.

Every mistake a user can make (a bad file, record, field, option or config key) raises a subclass of
:class:`JaxAlignError` whose message names *where* the problem is. The CLI prints the message without a
traceback and exits with status 2. Programming errors (wrong shapes inside library code) stay
``ValueError``/``TypeError``.
"""

from __future__ import annotations


class JaxAlignError(Exception):
    """Base class of all errors caused by user input."""


class ConfigError(JaxAlignError):
    """A bad option, config key or value (the message names the key)."""


class DataError(JaxAlignError):
    """A bad data file or record (the message names file, record and field)."""

    def __init__(self, message: str, *, path: str | None = None, record: int | None = None,
                 field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)
        self.path, self.record, self.field = path, record, field


class ModelError(JaxAlignError):
    """A model folder or file that cannot be loaded (missing file, unsupported type, bad tensor)."""


class LossError(JaxAlignError):
    """An unknown loss name or a missing input a loss needs."""


class LossOptionError(LossError, ConfigError):
    """An unknown loss name or option, or an option value of the wrong type or range (names the option)."""


class CheckpointError(JaxAlignError):
    """A checkpoint that cannot be restored, or a resume that would change the run."""
