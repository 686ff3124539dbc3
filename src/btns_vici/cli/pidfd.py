"""Borrow another process's file descriptor: pidfd_open(2) + pidfd_getfd(2) (Linux >= 5.6).

pidfd_getfd needs ptrace access to the target (PTRACE_MODE_ATTACH_REALCREDS): root, or
the same user with a permissive ``kernel.yama.ptrace_scope``. Errors are OSErrors with the
kernel's errno: ESRCH no such process, EBADF no such fd, EPERM not permitted.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
#: pidfd_getfd: 438 on every architecture (syscalls from 424 on share one number; alpha aside).
SYS_PIDFD_GETFD = 438


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A new descriptor in this process for ``targetfd`` of the process behind ``pidfd`` (close-on-exec)."""
    fd: int = _libc.syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(targetfd), ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {targetfd}): {os.strerror(err)}")
    return fd


def borrow_fd(pid: int, fd: int) -> int:
    """A duplicate of process ``pid``'s descriptor ``fd`` (the caller closes it)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ProcessLookupError(3, f"no process {pid}") from None
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
