"""Exit codes of the ``btns`` command and the mapping from exceptions to them."""

from __future__ import annotations

import errno

from ..core.errors import BackendError

OK = 0
#: A negative answer: the socket is not protected (or not connected), ``watch`` timed out
#: before ``--count`` events, ``testbed status`` found the testbed unhealthy.
NEGATIVE = 1
USAGE = 2  # argparse's own code for bad arguments
BACKEND = 3  # no backend, or its IKE daemon does not answer (or went away during ``watch``)
PERMISSION = 4  # EPERM/EACCES: not root, ptrace rules refuse pidfd_getfd, setns refused
NOT_FOUND = 5  # no such process, fd, namespace or recorded testbed; the fd is not an IP socket; not installed
FAILED = 6  # anything else: the testbed could not be built, a testbed is already up, ...
INTERRUPTED = 130  # Ctrl-C outside ``watch`` (where SIGINT is the normal way to stop, exit 0)

EXIT_CODES = (
    (OK, "success"),
    (
        NEGATIVE,
        "negative answer: the socket is not protected or not connected (token), fewer than --count "
        "events before --timeout (watch), testbed unhealthy (testbed status)",
    ),
    (USAGE, "usage error"),
    (BACKEND, "backend or IKE daemon unavailable (or gone during watch)"),
    (PERMISSION, "permission denied (not root, ptrace rules for pidfd_getfd, entering a namespace)"),
    (
        NOT_FOUND,
        "not found: no such process, fd, network namespace or recorded testbed; fd is not an IP socket; "
        "the command's distribution is not installed (testbed, demo: btns-lab)",
    ),
    (FAILED, "operation failed (testbed could not be built, already up, other errors)"),
    (INTERRUPTED, "interrupted by SIGINT (except watch, which stops cleanly with exit 0)"),
)

_NOT_FOUND_ERRNOS = {errno.ENOENT, errno.ESRCH, errno.EBADF, errno.ENOTSOCK, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT}


class CliError(Exception):
    """A failure to report on stderr with an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def code_for(exc: BaseException) -> int:
    """The exit code for an exception escaping a command."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, BackendError):
        return BACKEND
    if isinstance(exc, OSError):
        if exc.errno in (errno.EPERM, errno.EACCES):
            return PERMISSION
        if exc.errno in _NOT_FOUND_ERRNOS:
            return NOT_FOUND
    return FAILED


def epilog() -> str:
    """The exit-code table for ``--help``."""
    import textwrap

    lines = [
        textwrap.fill(what, 88, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7) for code, what in EXIT_CODES
    ]
    return "exit codes:\n" + "\n".join(lines)
