"""The errors a user sees on one line (``fgds: error: ...``, exit status 2): a leaf, importing nothing."""


class InputError(ValueError):
    """Bad input from the user (data, options, files): reported on one line, exit status 2."""


class OutputError(InputError):
    """The output folder cannot be written (full, read-only, ...): one line, exit status 2."""
