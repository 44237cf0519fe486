"""Exceptions that cellnb raises for bad input, so the command line can print them without a traceback."""


class CellnbError(Exception):
    """An error whose message names the bad value and the fix; the CLI prints it as is."""


class DataError(CellnbError, ValueError):
    """The data directory, its layout, its manifest or its images are not usable."""


class ParameterError(CellnbError, ValueError):
    """A parameter has the wrong type, an invalid value or an unknown name."""


class ModelError(CellnbError, ValueError):
    """A backbone, head, preprocessing or weights choice cannot be built."""


class RunDirectoryError(CellnbError):
    """A run directory is missing files, or would overwrite a finished run."""
