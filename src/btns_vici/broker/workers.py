"""btnsd's worker processes (``--workers N``): more cores for the hot request.

One Python process answers at most ~15,000 queries a second (README "btnsd: the broker"), so the
main process hands each accepted client to a worker that reads it:

* A **zygote** is forked early in :func:`.server.run` (after the listener exists and privileges
  were dropped, before any thread or backend exists) and stays single-threaded: every worker is
  forked from it, the first ones and any respawned later (the main process has threads by then,
  and forking a threaded process copies locks other threads may hold).
* Each worker has a channel to the main process (:mod:`.channel`). The main process sends it the
  accepted client's connection and keeps its own copy only for writing (answers, notifications).
* The worker reads every request of its clients. It answers the hot request itself with the main
  process's code (:meth:`.serving.Serving._hot`: its own backends, event-fed index and answer
  cache, the same rate limit per client) and forwards everything else, and the hot request for an
  unconnected socket (the attached demand lives in the main process), with the descriptor and the
  client's ident; the main process answers on its copy. A client's EOF is told to the main
  process, which drops the client as ever (what it loaded, its latches and demands).
* A worker that dies is noticed by the main process (its channel's EOF): the main process reads
  that worker's clients itself from then on, and a new worker is forked for new clients (at
  most one per slot a second). A request the dead worker had read but not answered is lost: the
  client's deadline reports it (ETIMEDOUT), never a wrong answer.
* Bounded: a forward that does not fit the channel is answered EAGAIN (never blocks); a worker
  that does not take a DROP within a second is killed (and its clients taken over). Workers are
  stopped by pid when the main process stops; a worker whose main process vanished sees its
  channel's EOF and exits, the zygote too (and PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import time
from typing import Any, NoReturn

from ..core.errors import BtnsError
from ..core.records import SocketView
from . import channel, protocol
from .metrics import Tally
from .policy import Config
from .serving import TRUNC, Client, Serving

log = logging.getLogger("btnsd")
_PR_SET_NAME, _PR_SET_PDEATHSIG = 15, 1
_PID = struct.Struct("!i")


def default_count() -> int:
    """os.cpu_count() capped at 4 (1 when unknown)."""
    return max(1, min(4, os.cpu_count() or 1))


def _timeouts(sock: socket.socket, seconds: float) -> None:
    tv = struct.pack("@ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


def _prctl(option: int, arg: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


# ---- the worker process ------------------------------------------------------------------------


class Worker(Serving):
    """A worker: reads the clients the main process hands it over ``chan``."""

    def __init__(self, config: Config, chan: socket.socket, tally: Tally) -> None:
        super().__init__(config, tally)
        self.tally = tally
        self.chan = chan
        _timeouts(chan, 2.0)
        self.sel.register(chan, selectors.EVENT_READ, None)

    def serve_forever(self) -> None:
        """Until the main process's end of the channel closes."""
        last = time.monotonic()
        while True:
            for key, _mask in self.sel.select(timeout=1.0):
                if key.data is None:
                    if not self._from_main():
                        return
                else:
                    self._readable(key.data)
            now = time.monotonic()
            if now - last >= 1.0:
                self._report(last)
                last = now

    def _from_main(self) -> bool:
        for _ in range(256):
            try:
                msg = channel.receive(self.chan)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if msg is None:
                return False
            kind, _flags, ident, payload, fd = msg
            if kind == channel.CLIENT and fd >= 0 and len(payload) == channel.CRED.size:
                pid, uid, gid = channel.CRED.unpack(payload)
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                c = Client(sock, pid, uid, gid, frozenset({gid}), ident, tokens=float(self.config.quota.burst))
                self.clients[ident] = c
                self.sel.register(sock, selectors.EVENT_READ, c)
            elif kind == channel.DROP:
                gone = self.clients.pop(ident, None)
                if gone is not None:
                    self._close(gone)
            elif fd >= 0:
                os.close(fd)
        return True

    def _report(self, since: float) -> None:
        """The tally and the clients heard from since ``since`` (their idle clocks) to the main process."""
        tally = self.tally.snapshot()
        active = [c.ident for c in self.clients.values() if c.last >= since]
        if tally is None and not active:
            return
        try:
            channel.send(self.chan, channel.stats(tally, active), flags=socket.MSG_DONTWAIT)
        except OSError:
            return  # the channel is full: the counts go with the next report
        self.tally.clear()

    def _forward(self, c: Client, data: bytes, fd: int, flags: int) -> None:
        msg = channel.message(channel.FORWARD, c.ident, data, channel.TRUNCATED if flags & TRUNC else 0)
        try:
            channel.send(self.chan, msg, fd, socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise BtnsError("btnsd is busy: its main process has not taken earlier requests", errno.EAGAIN) from None
        except OSError as exc:
            raise BtnsError(f"btnsd's main process is gone: {exc.strerror}", errno.ECONNRESET) from None

    def _request(self, c: Client, data: bytes, fds: list[int], flags: int) -> None:
        """Not the hot request: rate-limited here (this process reads the client), then forwarded."""
        try:
            self._ratelimit(c)
            self._forward(c, data, fds[0] if fds else -1, flags)
        except OSError as exc:
            self.metrics.error("bad_request")
            self._send(c, protocol.error(int.from_bytes(data[4:8], "big") if len(data) >= 8 else 0, exc))
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _main_only(
        self, c: Client, key: tuple[int, int], view: SocketView | None, data: bytes, fd: int
    ) -> dict[str, Any] | bytes | None:
        self._forward(c, data, fd, 0)  # the attached demand, the ACQUIRE responder: the main process's
        return None

    def _close(self, c: Client) -> None:
        with c.send_lock:
            c.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()

    def _drop(self, c: Client) -> None:
        if c.closed:
            return
        self._close(c)
        self.clients.pop(c.ident, None)
        try:
            channel.send(self.chan, channel.message(channel.GONE, c.ident))
        except OSError as exc:  # the main process idles the client out eventually
            log.warning("worker %d: could not tell the main process that %s went away: %s", os.getpid(), c.label(), exc)


def _worker_main(chan: socket.socket, config: Config, metrics: bool) -> NoReturn:
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _prctl(_PR_SET_NAME, b"btnsd-worker")
        Worker(config, chan, Tally(metrics)).serve_forever()
    except BaseException:
        log.exception("worker %d failed", os.getpid())
        code = 1
    finally:
        os._exit(code)  # never the main process's atexit work (lifecycle records are its own)


def _zygote_main(ctl: socket.socket, config: Config, metrics: bool, parent: int) -> NoReturn:
    """Fork a worker for every channel end the main process sends; reply with its pid. At the
    main process's EOF: wait for the workers (they see their channels' EOF too), then exit."""
    import select

    code = 0
    children: set[int] = set()
    try:
        _prctl(_PR_SET_NAME, b"btnsd-zygote")
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the main process's to handle
        while True:
            _reap(children, block=False)
            if not select.select([ctl], [], [], 1.0)[0]:
                continue
            try:
                msg = channel.receive(ctl)
            except (BlockingIOError, InterruptedError):
                continue
            if msg is None:
                break  # the main process is gone or stopping
            fd = msg[4]
            if fd < 0:
                continue
            chan = socket.socket(fileno=fd)
            pid = os.fork()
            if pid == 0:
                ctl.close()
                _worker_main(chan, config, metrics)
            children.add(pid)
            chan.close()
            ctl.send(_PID.pack(pid))
        deadline = time.monotonic() + 5.0
        while children and time.monotonic() < deadline:
            _reap(children, block=False)
            time.sleep(0.01)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _reap(children, block=True)
    except BaseException:
        log.exception("btnsd zygote failed")
        code = 1
    finally:
        os._exit(code)


def _reap(children: set[int], block: bool) -> None:
    """Collect exited workers (all of them when ``block``)."""
    while children:
        try:
            pid, _status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


# ---- the main process's side --------------------------------------------------------------------


class Handle:
    """The main process's view of one worker."""

    def __init__(self, pid: int, chan: socket.socket) -> None:
        self.pid, self.chan = pid, chan
        self.clients = 0
        self.alive = True

    def hand(self, c: Client) -> bool:
        """Give the worker ``c`` to read (False: it cannot take it now)."""
        try:
            msg = channel.message(channel.CLIENT, c.ident, channel.CRED.pack(c.pid, c.uid, c.gid))
            channel.send(self.chan, msg, c.sock.fileno(), socket.MSG_DONTWAIT)
        except OSError:
            return False
        self.clients += 1
        return True

    def drop(self, ident: int) -> None:
        """Tell the worker to close its copy of client ``ident``; one that does not take it in time is killed."""
        self.clients -= 1
        if not self.alive:
            return
        try:
            channel.send(self.chan, channel.message(channel.DROP, ident))
        except OSError as exc:
            log.warning("worker %d did not take a DROP (%s): killing it", self.pid, exc)
            self.kill(signal.SIGKILL)

    def kill(self, sig: int) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, sig)


class WorkerPool:
    """``count`` workers forked by the zygote; respawned when they die."""

    def __init__(self, count: int, config: Config, metrics: bool, listener: socket.socket) -> None:
        self.count = count
        self.handles: list[Handle] = []
        self._last_spawn = 0.0
        ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ctl.close()
            listener.close()  # only the main process accepts
            _zygote_main(theirs, config, metrics, parent)
        theirs.close()
        self.zygote: int | None = pid
        self._ctl = ctl
        _timeouts(ctl, 5.0)
        for _ in range(count):
            self.spawn()

    def alive(self) -> list[Handle]:
        return [h for h in self.handles if h.alive]

    def pick(self) -> Handle | None:
        """The live worker with the fewest clients."""
        live = self.alive()
        return min(live, key=lambda h: h.clients) if live else None

    def spawn(self) -> Handle | None:
        """A new worker (None: the zygote is gone or did not answer in time)."""
        if self.zygote is None:
            return None
        self._last_spawn = time.monotonic()
        mine, theirs = channel.pair()
        try:
            channel.send(self._ctl, channel.message(channel.SPAWN, 0), theirs.fileno())
            pid = _PID.unpack(self._ctl.recv(_PID.size))[0]
        except (OSError, struct.error) as exc:
            log.error("btnsd's zygote does not fork workers any more (%s): no new workers", exc)
            mine.close()
            self._reap_zygote()
            return None
        finally:
            theirs.close()
        _timeouts(mine, 1.0)
        h = Handle(pid, mine)
        self.handles.append(h)
        log.info("worker %d started", pid)
        return h

    def died(self, h: Handle) -> None:
        h.alive = False
        h.chan.close()
        self.handles.remove(h)

    def respawn(self) -> list[Handle]:
        """Workers for the slots of dead ones (at most one a second)."""
        if len(self.handles) >= self.count or time.monotonic() - self._last_spawn < 1.0:
            return []
        h = self.spawn()
        return [h] if h is not None else []

    def _reap_zygote(self) -> None:
        if self.zygote is None:
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(self.zygote, os.WNOHANG)[0] == 0:
                os.kill(self.zygote, signal.SIGKILL)
                os.waitpid(self.zygote, 0)
        self.zygote = None

    def stop(self) -> None:
        """SIGTERM every worker by pid, wait for them (2 s, then SIGKILL), stop the zygote."""
        for h in self.handles:
            h.kill(signal.SIGTERM)
            h.chan.close()
            h.alive = False
        self._ctl.close()  # the zygote's EOF
        deadline = time.monotonic() + 2.0
        pending = [h.pid for h in self.handles]
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if _running(p)]
            if pending:
                time.sleep(0.01)
        for p in pending:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        self.handles.clear()
        if self.zygote is not None:
            with contextlib.suppress(ChildProcessError):
                for _ in range(200):
                    if os.waitpid(self.zygote, os.WNOHANG)[0]:
                        break
                    time.sleep(0.01)
                else:
                    os.kill(self.zygote, signal.SIGKILL)
                    os.waitpid(self.zygote, 0)
            self.zygote = None


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
