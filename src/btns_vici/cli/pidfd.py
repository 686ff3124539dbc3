"""Borrow another process's file descriptor: pidfd_open(2) + pidfd_getfd(2) (Linux >= 5.6).

pidfd_getfd needs ptrace access to the target (PTRACE_MODE_ATTACH_REALCREDS): root, or
the same user with a permissive ``kernel.yama.ptrace_scope``. Errors are OSErrors with the
kernel's errno: ESRCH no such process, EBADF no such fd, EPERM not permitted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import struct
import time
import weakref
from typing import Any

from .. import forksafe

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


class SocketBorrower:
    """Borrows other processes' sockets through a forked helper, so that this process never holds
    a descriptor that is not one.

    Between a /proc walk (or an operator's ``--fd``) and pidfd_getfd the descriptor's owner may put
    any file at that number, one of a FUSE file system it serves (an unprivileged user can mount
    one in a user namespace). fstat(2) of it waits for an answer that never comes, and close(2)
    sends FLUSH and waits for that *uninterruptibly*, even SIGKILL does not end it: holding such a
    descriptor once hangs the process for good. The helper takes the descriptor, reads what it is
    from its /proc/self/fd link (no call into its file system), and hands back only a socket
    (``socket:[inode]``, SCM_RIGHTS); anything else it keeps, never closing it, and answers ENOTSOCK.
    No answer within ``wait`` seconds: ETIMEDOUT, and the helper is given up.
    Errors are OSErrors with borrow_fd's errnos (ESRCH, EBADF, EPERM), ENOTSOCK or ETIMEDOUT.
    Use as a context manager (or :meth:`close`): the helper is stopped and reaped if it can be (a
    helper that keeps a hostile file open may itself hang in exit; it is not waited for).
    """

    WAIT = 2.0
    _REQ = struct.Struct("=iiQ")
    _ANS = struct.Struct("=i")

    def __init__(self, wait: float | None = None) -> None:
        self.wait = self.WAIT if wait is None else wait
        self._sock: socket.socket | None = None
        self._pid, self._pidfd = 0, -1
        self._broken = False
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def _start(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # the helper: never returns into the caller's code
            try:
                forksafe.keep_only(theirs.fileno())
                self._serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self._sock, self._pid = ours, pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            self._pidfd = -1
        # (a borrower dropped without close, e.g. a Snapshot btnsd lets go: stopped and reaped all the same)
        self._finalizer = weakref.finalize(self, _stop, ours, pid, self._pidfd)
        return ours

    def _serve(self, conn: socket.socket) -> None:
        while True:
            req = conn.recv(self._REQ.size)
            if len(req) != self._REQ.size:
                return
            pid, fd, inode = self._REQ.unpack(req)
            try:
                num = borrow_fd(pid, fd)
            except OSError as exc:
                conn.send(self._ANS.pack(exc.errno or errno.EIO))
                continue
            try:
                link = os.readlink(f"/proc/self/fd/{num}")
            except OSError:
                link = ""
            if link.startswith("socket:[") and (inode == 0 or link == f"socket:[{inode}]"):
                socket.send_fds(conn, [self._ANS.pack(0)], [num])
                os.close(num)  # a socket: closing it waits for no file system
            else:
                conn.send(self._ANS.pack(errno.ENOTSOCK))  # kept open: its close might never return

    def borrow(self, pid: int, fd: int, inode: int = 0) -> int:
        """A duplicate of process ``pid``'s descriptor ``fd``, which is a socket (``inode``: that one)."""
        if self._broken:
            raise OSError(errno.ETIMEDOUT, "the descriptor-borrowing helper did not answer before")
        sock = self._start()
        sock.settimeout(self.wait)
        try:
            sock.send(self._REQ.pack(pid, fd, inode))
            msg, fds, _flags, _addr = socket.recv_fds(sock, self._ANS.size, 1)
        except TimeoutError:
            self._broken = True
            self.close()
            raise OSError(errno.ETIMEDOUT, f"no answer borrowing descriptor {fd} of process {pid}") from None
        if len(msg) != self._ANS.size:
            for extra in fds:
                os.close(extra)
            self._broken = True
            self.close()
            raise OSError(errno.EIO, "the descriptor-borrowing helper went away")
        (err,) = self._ANS.unpack(msg)
        if err or len(fds) != 1:
            for extra in fds:
                os.close(extra)
            raise OSError(err or errno.EIO, f"descriptor {fd} of process {pid}: {os.strerror(err or errno.EIO)}")
        return fds[0]

    def close(self) -> None:
        finalizer, self._finalizer = self._finalizer, None
        self._sock, self._pid, self._pidfd = None, 0, -1
        if finalizer is not None:
            finalizer()

    def __enter__(self) -> SocketBorrower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(sock: socket.socket, pid: int, pidfd: int) -> None:
    """End a SocketBorrower's helper: EOF, then reaped (killed after 0.5 s; a helper that keeps a
    hostile file open may hang in its exit, uninterruptibly: it is not waited for)."""
    sock.close()  # EOF: the helper exits by itself
    try:
        deadline = time.monotonic() + 0.5
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            if time.monotonic() > deadline:
                if pidfd >= 0:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return
            time.sleep(0.002)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def borrow_socket(pid: int, fd: int, inode: int = 0, wait: float | None = None) -> int:
    """One :meth:`SocketBorrower.borrow` (a helper for it alone)."""
    with SocketBorrower(wait) as borrower:
        return borrower.borrow(pid, fd, inode)
