"""The user errors of the ``hapm`` command line: :class:`CliError` and its exit status."""

from __future__ import annotations

#: Exit status of a user error.
EXIT_USER_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT, what a shell reports for a process killed by it).
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user error: reported as one line on standard error, exit status 2."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """The message of ``err`` on one line (lines joined), shortened to ``limit`` characters."""
    text = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
