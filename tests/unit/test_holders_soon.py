"""``btns sockets``' PROCESS column from a forked helper (cli/sockdiag.HoldersSoon), attacked: the
right process and fd, never the helper's copies; nothing left behind (no zombie, no descriptor)
when the caller fails midway or SIGCHLD is ignored; no hang when the helper never answers."""

from __future__ import annotations

import errno
import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from btns_vici.cli.sockdiag import HoldersSoon, socket_holders


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _gone(pid: int) -> bool:
    """No process (nor zombie) ``pid`` is left that is our child."""
    try:
        os.waitpid(pid, os.WNOHANG)  # (a zombie left behind is reaped here: still a failure)
    except ChildProcessError:
        return True
    return False


def test_shows_our_socket_under_our_pid_and_fd_never_the_helpers_copy():
    with socket.socket() as s:
        inode = os.fstat(s.fileno()).st_ino
        with HoldersSoon() as soon:
            helper = soon._pid
            got = soon.result()
        assert helper and (os.getpid(), got[inode][0][1], s.fileno()) == got[inode][0]
        assert got[inode] == [(os.getpid(), got[inode][0][1], s.fileno())]  # the helper's copy is not listed
        assert _gone(helper)


def test_an_interrupted_result_raises_the_interruption_and_leaves_nothing():
    """A signal handler raising while result() waits (e.g. SIGINT): that exception, not EBADF from
    closing the pipe twice; the helper killed and reaped, no descriptor left."""

    class Interrupted(Exception):
        pass

    def alarm(*_: object) -> None:
        raise Interrupted

    before = _fds()
    old = signal.signal(signal.SIGALRM, alarm)
    try:
        with pytest.raises(Interrupted), HoldersSoon() as soon:
            helper = soon._pid
            os.kill(helper, signal.SIGSTOP)  # it never answers before the alarm
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            soon.result()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert _gone(helper)
    assert _fds() == before


def test_leaving_without_result_reaps_the_helper():
    before = _fds()
    with pytest.raises(PermissionError), HoldersSoon() as soon:
        helper = soon._pid
        raise PermissionError(1, "sock_diag refused")  # what list_sockets raises without the right
    assert _gone(helper) and _fds() == before


def test_a_helper_that_never_answers_is_killed_and_the_walk_done_here():
    with socket.socket() as s:
        inode = os.fstat(s.fileno()).st_ino
        soon = HoldersSoon(wait=0.3)
        with soon:
            helper = soon._pid
            os.kill(helper, signal.SIGSTOP)
            t0 = time.monotonic()
            got = soon.result()
            took = time.monotonic() - t0
        assert got[inode] == [(os.getpid(), got[inode][0][1], s.fileno())]
        assert took < 0.3 + 2.0
        assert _gone(helper)


_IGNORED = textwrap.dedent(
    """
    import os, signal, socket, sys
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # inherited through exec from a parent that ignores it
    from btns_vici.cli.sockdiag import HoldersSoon
    s = socket.socket()
    before = set(os.listdir("/proc/self/fd"))
    with HoldersSoon() as soon:
        got = soon.result()
    inode = os.fstat(s.fileno()).st_ino
    assert [(p, fd) for p, _c, fd in got[inode]] == [(os.getpid(), s.fileno())], got.get(inode)
    assert set(os.listdir("/proc/self/fd")) == before
    print("ok")
    """
)


def test_sigchld_ignored_still_answers():
    """A caller started with SIGCHLD ignored (the disposition survives exec): the helper is reaped
    by the kernel, waitpid says ECHILD; the answer is still the walk's, no error."""
    out = subprocess.run([sys.executable, "-c", _IGNORED], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_fallback_walk_matches():
    with socket.socket() as s:
        inode = os.fstat(s.fileno()).st_ino
        assert [(p, fd) for p, _c, fd in socket_holders()[inode]] == [(os.getpid(), s.fileno())]


# -- the descriptor-borrowing helper (cli/pidfd.SocketBorrower) ---------------------------------------


def test_the_borrower_hands_back_that_socket_only_and_a_dropped_one_is_reaped():
    from btns_vici.cli.pidfd import SocketBorrower

    before = _fds()
    with socket.socket() as s, open("/proc/self/stat", "rb") as f:
        inode = os.fstat(s.fileno()).st_ino
        borrower = SocketBorrower()
        got = borrower.borrow(os.getpid(), s.fileno(), inode)
        assert os.readlink(f"/proc/self/fd/{got}") == f"socket:[{inode}]"
        os.close(got)
        for fd, want in ((f.fileno(), errno.ENOTSOCK), (s.fileno(), errno.ENOTSOCK), (10**6, errno.EBADF)):
            with pytest.raises(OSError) as exc:
                borrower.borrow(os.getpid(), fd, inode + 1 if fd == s.fileno() else inode)
            assert exc.value.errno == want
        helper = borrower._pid
        del borrower, exc  # dropped without close (as btnsd drops a Snapshot): stopped and reaped all the same
        gc.collect()  # (the tracebacks held it in a cycle)
    assert _gone(helper)
    assert _fds() == before


def test_a_forked_helper_holds_none_of_the_parent_s_descriptors():
    """forksafe.keep_only: a pipe the parent closes reaches EOF although the helper still lives."""
    import select

    from btns_vici import forksafe

    r, w = os.pipe()
    keep_r, keep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            forksafe.keep_only(keep_r)
            os.read(keep_r, 1)  # lives until the parent says so
        finally:
            os._exit(0)
    try:
        os.close(w)
        ready, _, _ = select.select([r], [], [], 5)
        assert ready and os.read(r, 1) == b""  # EOF: the helper did not keep the write end
    finally:
        os.close(r)
        os.write(keep_w, b"x")
        os.waitpid(pid, 0)
        os.close(keep_r)
        os.close(keep_w)
