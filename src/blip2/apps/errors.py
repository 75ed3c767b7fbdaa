"""The errors the ``blip2`` commands report, and how a library error is worded for the command line."""

from __future__ import annotations

__all__ = ["CliError", "cli_message"]


class CliError(Exception):
    """A usage or setup error of a command: printed as ``blip2 COMMAND: error: ...``, exit code 2."""


def cli_message(error: BaseException) -> str:
    """What a command prints for ``error``. A library error that names the argument at fault (``argument``,
    ``value`` and ``reason`` attributes, as ``PipelineError`` has: ``fast='native': runs on CPU only ...``)
    names the command's option instead: ``--fast native: runs on CPU only ...``."""
    argument = getattr(error, "argument", None)
    if argument is None:
        return str(error)
    flag = "--" + argument.replace("_", "-")
    value = getattr(error, "value", None)
    return f"{flag}: {error.reason}" if value is None else f"{flag} {value}: {error.reason}"  # type: ignore[attr-defined]
