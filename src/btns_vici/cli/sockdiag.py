"""Every TCP and UDP socket of a network namespace, from the kernel's sock_diag (like ``ss``).

The netlink socket is opened inside the namespace (setns in the calling thread);
it keeps that namespace, so the dumps answer for it. The dump is :mod:`btns_vici.inetdiag`
(struct-unpacked, stdlib only: pyroute2's decoder cost 75 µs a socket). Protocols,
families and states may be selected in the kernel (``list_sockets(..., states=...)``),
as ``ss`` does.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import socket
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from .. import forksafe
from .. import inetdiag as _inetdiag
from ..core.selectors import Flow, IPAddress

#: TCP states (include/net/tcp_states.h) as ``ss`` names them; UDP uses ESTAB (connected) and UNCONN.
STATES = {
    1: "ESTAB",
    2: "SYN-SENT",
    3: "SYN-RECV",
    4: "FIN-WAIT-1",
    5: "FIN-WAIT-2",
    6: "TIME-WAIT",
    7: "UNCONN",
    8: "CLOSE-WAIT",
    9: "LAST-ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW-SYN-RECV",
}
INET_DIAG_MARK = 15
PROTOCOLS = (("tcp", socket.IPPROTO_TCP), ("udp", socket.IPPROTO_UDP))
FAMILIES = (socket.AF_INET, socket.AF_INET6)
#: state name -> its bit in sock_diag's idiag_states mask
STATE_BITS = {name: 1 << number for number, name in STATES.items()}


def state_mask(states: Iterable[str] | None) -> int:
    """The kernel's idiag_states mask for state names (None: every state)."""
    if states is None:
        return _inetdiag.ALL_STATES
    mask = 0
    for name in states:
        mask |= STATE_BITS.get(name, 0)
    return mask


@dataclass(frozen=True)
class SocketEntry:
    """One socket as sock_diag reports it."""

    proto: int
    family: int
    state: str
    local_addr: IPAddress
    local_port: int
    remote_addr: IPAddress
    remote_port: int
    inode: int
    uid: int
    bound_ifindex: int = 0  # SO_BINDTODEVICE (idiag_if)
    mark: int | None = None  # SO_MARK (INET_DIAG_MARK: only shown to CAP_NET_ADMIN), None when not shown

    @property
    def connected(self) -> bool:
        """Has a peer, hence a flow (LISTEN and unconnected UDP sockets have none)."""
        return self.state != "LISTEN" and self.remote_port != 0 and int(self.remote_addr) != 0  # not :: / 0.0.0.0

    @cached_property  # (a listing asks each connected socket several times; frozen fields never change)
    def flow(self) -> Flow | None:
        if not self.connected:
            return None
        return Flow(self.proto, self.local_addr, self.local_port, self.remote_addr, self.remote_port)


def list_sockets(
    netns_name: str | None = None,
    *,
    protocols: Collection[int] | None = None,
    families: Collection[int] | None = None,
    states: Collection[str] | None = None,
) -> list[SocketEntry]:
    """TCP and UDP sockets, IPv4 and IPv6, of ``netns_name`` (None: ours), sorted like ``ss``.

    ``protocols`` (IPPROTO_TCP/UDP), ``families`` (AF_INET/AF_INET6) and ``states`` (names of
    :data:`STATES`) narrow the dump in the kernel; None selects all.
    """
    if not netns_name:  # ours: no setns (and no ctypes to import for it)
        diag = _inetdiag.open_socket()
    else:
        diag = _in_netns(netns_name)
    mask = state_mask(states)
    out: list[SocketEntry] = []
    names = STATES
    with diag:
        seq = 0
        for _, proto in PROTOCOLS:  # (protocol, family) in ascending order: each dump sorted, then joined
            if protocols is not None and proto not in protocols:
                continue
            for family in FAMILIES:
                if families is not None and family not in families:
                    continue
                seq += 1
                rows = _inetdiag.rows(diag, family, proto, mask, seq=seq)
                rows.sort(key=_row_order)
                out += [
                    _entry((proto, family, names.get(st) or str(st), src, sp, dst, dp, inode, uid, ifindex, mark))
                    for st, sp, dp, src, dst, ifindex, uid, inode, mark in rows
                ]
    return out


_FIELDS = tuple(f.name for f in fields(SocketEntry))
_new = object.__new__


def _entry(values: tuple[Any, ...]) -> SocketEntry:
    """``SocketEntry(*values)`` at half the cost: a frozen dataclass's __init__ sets each field
    through object.__setattr__ (2.7 µs for these 11, 27 ms of a 10,000-socket listing); this fills
    the instance dict at once (tests/unit/test_cli_fast_listing.py holds the two equal)."""
    entry = _new(SocketEntry)
    entry.__dict__.update(zip(_FIELDS, values, strict=True))
    return entry


def _in_netns(name: str) -> socket.socket:
    """A sock_diag socket opened inside network namespace ``name`` (it keeps that namespace)."""
    from .. import netns

    if not os.path.exists(netns.netns_path(name)):
        raise FileNotFoundError(2, f"no network namespace {name!r} (see `ip netns list`)")
    try:
        with netns.entered(name):
            return _inetdiag.open_socket()
    except PermissionError:
        raise PermissionError(1, f"entering network namespace {name!r} needs CAP_SYS_ADMIN (root)") from None


def _row_order(r: tuple[Any, ...]) -> tuple[Any, ...]:
    """As ``ss`` sorts: local address, port, peer address, port, inode (same family: the integer
    value orders as the packed bytes do)."""
    return (int(r[3]), r[1], int(r[4]), r[2], r[7])


Holders = dict[int, list[tuple[int, str, int]]]


def socket_holders(skip: int | None = None) -> Holders:
    """Socket inode -> [(pid, command name, fd)], one per descriptor (what ``ss -p`` shows).

    Processes whose descriptors we may not read are skipped, as ``ss`` does; so is process
    ``skip`` (the helper of :func:`socket_holders_soon`, which holds copies of our descriptors).
    Each process's fd directory is opened once and its links read relative to it (``dir_fd``: no
    path walk per descriptor, ~10% of the scan at 10,000 sockets).
    """
    holders: Holders = {}
    readlink, listdir, opendir, close = os.readlink, os.listdir, os.open, os.close
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    for entry in os.scandir("/proc"):
        name = entry.name
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == skip:
            continue
        try:
            dfd = opendir(f"/proc/{name}/fd", flags)
        except OSError:
            continue
        try:
            try:
                fds = listdir(dfd)
            except OSError:
                continue
            comm = None
            for fd in fds:
                try:
                    target = readlink(fd, dir_fd=dfd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    if comm is None:  # read once, for processes that hold a socket
                        try:
                            with open(f"/proc/{name}/comm", errors="surrogateescape") as f:
                                comm = f.read()
                            comm = comm[:-1] if comm.endswith("\n") else comm  # (the kernel's; the rest is the name)
                        except OSError:
                            break  # gone meanwhile: skipped, as ss does
                    holders.setdefault(int(target[8:-1]), []).append((pid, comm, int(fd)))
        finally:
            close(dfd)
    for held in holders.values():
        if len(held) > 1:
            held.sort(key=lambda h: (h[0], h[2]))
    return holders


class HoldersSoon:
    """:func:`socket_holders`, made by a forked helper process while the caller does other work.

    ``btns sockets`` needs both the kernel's socket dump and the /proc walk for its PROCESS
    column (10,000 readlinks at 10,000 sockets: a sixth of the command); on two cores they
    overlap. The helper sends the result back through a pipe (its length, then marshal: plain
    ints, strs and tuples) and exits; anything that goes wrong there (no fork, a failed walk, a
    short or malformed result, no answer within ``wait`` seconds) makes :meth:`result` walk /proc
    itself, so the answer is the same either way. The helper is signalled through a pidfd only
    (never a pid the kernel may have reaped and reused: SIGCHLD may be ignored, a disposition
    that survives exec) and reaped where it can be; the pipe is closed exactly once. Use it as a
    context manager: leaving it without :meth:`result` (or with an exception raised while
    :meth:`result` waits) stops and reaps the helper (nothing is left behind in a long-lived caller).
    """

    #: Seconds :meth:`result` waits for the helper before walking /proc itself.
    WAIT = 10.0

    def __init__(self, wait: float | None = None) -> None:
        self.wait = self.WAIT if wait is None else wait
        self._pid, self._rfd, self._pidfd = 0, -1, -1
        try:
            rfd, wfd = os.pipe()
        except OSError:
            return
        try:
            pid = os.fork()
        except OSError:
            os.close(rfd)
            os.close(wfd)
            return
        if pid == 0:  # the helper: walk, write, exit (never returns into the caller's code)
            code = 1
            try:
                forksafe.keep_only(wfd)
                data = marshal.dumps(socket_holders(skip=os.getpid()))
                with open(wfd, "wb") as out:
                    out.write(len(data).to_bytes(8, "big") + data)
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        self._pid, self._rfd = pid, rfd
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # (gone and reaped already: nothing left to signal)
            self._pidfd = -1

    def result(self) -> Holders:
        data = self._collect()
        got: object = None
        if data is not None and len(data) >= 8 and int.from_bytes(data[:8], "big") == len(data) - 8:
            try:
                got = marshal.loads(data[8:])
            except (EOFError, ValueError, TypeError):
                got = None
        return got if isinstance(got, dict) else socket_holders()

    def _collect(self) -> bytes | None:
        """What the helper wrote until it closed the pipe (None: no helper, or no end within
        :attr:`wait`); the helper is gone afterwards, whatever is raised meanwhile."""
        if not self._pid:
            return None
        chunks, done = [], False
        try:
            waiting = select.poll()  # (select.select refuses descriptors over 1023)
            waiting.register(self._rfd, select.POLLIN)
            deadline = time.monotonic() + self.wait
            while (left := deadline - time.monotonic()) > 0:
                if not waiting.poll(max(1, int(left * 1000))):
                    break
                chunk = os.read(self._rfd, 1 << 20)
                if not chunk:
                    done = True
                    break
                chunks.append(chunk)
        finally:
            self._stop(kill=not done)
        return b"".join(chunks) if done else None

    def _stop(self, kill: bool = True) -> None:
        """Kill (through the pidfd) and reap the helper, close the pipe and the pidfd; once."""
        pid, rfd, pidfd = self._pid, self._rfd, self._pidfd
        self._pid, self._rfd, self._pidfd = 0, -1, -1
        try:
            ended = not kill
            if kill and pidfd >= 0:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    ended = True
            elif kill and pid and signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN:
                with contextlib.suppress(OSError):  # (no pidfd: an unreaped child keeps its pid)
                    os.kill(pid, signal.SIGKILL)
                    ended = True
            if pid:
                with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: the kernel reaped it
                    os.waitpid(pid, 0 if ended else os.WNOHANG)
        finally:
            for fd in (rfd, pidfd):
                if fd >= 0:
                    os.close(fd)

    def __enter__(self) -> HoldersSoon:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()


def socket_owners() -> dict[int, list[tuple[int, str]]]:
    """Socket inode -> [(pid, command name)] of the processes holding it (each process once)."""
    owners: dict[int, list[tuple[int, str]]] = {}
    for inode, held in socket_holders().items():
        procs = owners[inode] = []
        for pid, comm, _fd in held:
            if (pid, comm) not in procs:
                procs.append((pid, comm))
    return owners
