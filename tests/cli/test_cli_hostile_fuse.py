"""Attack on the descriptors ``btns sockets`` and ``btns token --pid --fd`` borrow (pidfd_getfd):
between the /proc walk and the borrow, a hostile holder puts at that descriptor number a file of a
FUSE file system it serves and never answers. Before, ``btns sockets`` called fstat(2) on what it
borrowed (waits for the server forever) and ``btns token`` closed it (FLUSH: an uninterruptible
wait, SIGKILL does not end it). Now a helper process borrows and hands back only that socket."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from btns_vici.cli.cmd_sockets import exact_view
from btns_vici.cli.pidfd import SocketBorrower
from btns_vici.cli.sockdiag import SocketEntry

from .conftest import btns

pytestmark = pytest.mark.testbed  # (root: the server mounts a file system)

SERVER = Path(__file__).with_name("fuse_hostile.py")


class Hostile:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", "the hostile FUSE server did not start"
        self.pid, self.dirfd, self.filefd, self.sockfd, self.inode = map(int, line[1:])

    def stop(self) -> None:
        """It aborts its connection: whatever still waits on it (our helper's exit) fails now."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


@pytest.fixture
def hostile():
    h = Hostile()
    try:
        yield h
    finally:
        h.stop()


def _within(seconds: float, fn):
    out: list = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    th.join(seconds)
    assert out, f"no answer within {seconds} s (hung on the hostile file system)"
    return out[0]


def test_exact_view_never_touches_a_file_put_where_the_socket_was(hostile):
    h = hostile
    entry = SocketEntry(6, socket.AF_INET, "ESTAB", ipaddress.ip_address("127.0.0.1"), 1,
                        ipaddress.ip_address("127.0.0.1"), 2, h.inode, 0)  # fmt: skip
    before = set(os.listdir("/proc/self/fd"))
    borrower = SocketBorrower()
    try:
        for fd in (h.filefd, h.dirfd):  # the walk saw the socket at fd; now a FUSE file (or directory) is there
            assert _within(5, lambda fd=fd: exact_view(entry, [(h.pid, "hostile", fd)], borrower)) is None
        helper = borrower._pid
        other = SocketEntry(6, socket.AF_INET, "ESTAB", entry.local_addr, 1, entry.remote_addr, 2, h.inode + 1, 0)
        assert _within(5, lambda: exact_view(other, [(h.pid, "hostile", h.sockfd)], borrower)) is None
        got = _within(5, lambda: borrower.borrow(h.pid, h.sockfd, h.inode))  # the socket itself is handed over
        try:
            assert os.readlink(f"/proc/self/fd/{got}") == f"socket:[{h.inode}]"
        finally:
            os.close(got)
    finally:
        _within(5, borrower.close)  # the helper keeps the hostile files: its exit waits on the server
    assert set(os.listdir("/proc/self/fd")) == before
    h.stop()
    _within(5, lambda: os.waitpid(helper, 0))  # the connection aborted, the helper has exited: reaped here


def test_btns_token_of_a_hostile_file_descriptor_answers(hostile):
    res = btns("token", "--pid", str(hostile.pid), "--fd", str(hostile.filefd), timeout=20)
    assert res.returncode != 0 and "is not a socket" in res.stderr, (res.returncode, res.stderr)
