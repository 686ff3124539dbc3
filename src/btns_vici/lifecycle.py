"""Ownership of what this process loads into IKE daemons (issue 13, item 5: lifecycle).

``api.prepare_connect`` and ``api.listen`` make the backend load connections (and our host
key) into the daemon. Those are *owned* by the sockets that needed them:

* :func:`own` records that socket ``sock`` uses connection ``name`` of backend ``be``;
  :func:`adopt` that an admitted connection uses the one its SA belongs to (its policyName);
* when the last socket using a connection closes (checked by a reaper thread every
  :data:`REAP_INTERVAL` seconds while anything is owned: an ``fstat`` per owned socket) or
  the process exits (``atexit``), the connection is released (``Backend.release``:
  terminated and unloaded) unless another live process owns it too; with strongSwan the
  library's keys are unloaded too once charon has no ``btns-`` connection left
  (:mod:`btns_vici.strongswan.keys`);
* every owner writes a record, ``<state dir>/<pid>-<start time>.json``, naming the backend,
  its options and the connections, as soon as the backend loaded them. A process that died
  (kill -9) leaves its record: the next process that owns something (or btnsd at start, or
  :func:`sweep_stale`) finds records of dead owners (pid gone, or reused: the start time or
  the boot id differs) and releases what no live owner still lists.

Processes with equal demands share a connection (its name is a hash of the demand), so a
connection is released only when no live record lists it (a window remains: a process exiting
while another is between its ``load-conn`` and its record may unload the other's connection;
the other's connect then fails closed). Only the library's own names (``btns-init-``/``btns-resp-``
and 12 hex digits) are owned: operator connections and the leap learner's are never released. The state directory is
``$BTNS_STATE_DIR``, else ``/run/btns-vici/owned``; where it cannot be written (no root),
ownership is kept in memory only (released at exit, not after kill -9).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import forksafe

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/btns-vici/owned"
#: Seconds between close checks of owned sockets (only while something is owned).
REAP_INTERVAL = 1.0
#: The connections enforce.establish/serve name (enforce.conn_name): the only ones owned.
OWNABLE = re.compile(r"btns-(init|resp)-[0-9a-f]{12}")


#: The pseudo socket identity of :meth:`Owner.hold` (never a real socket's: st_dev 0).
HELD = (0, 0)


def open_socket_keys() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every socket this process has open (any descriptor, dups included)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (or the listing's own descriptor)
        if stat.S_ISSOCK(st.st_mode):
            out.add((st.st_dev, st.st_ino))
    return out


def state_dir() -> Path:
    return Path(os.environ.get("BTNS_STATE_DIR") or DEFAULT_STATE_DIR)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        return int(raw[raw.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def alive(pid: int, started: int) -> bool:
    """Whether process ``pid`` that started at ``started`` still runs (not a reused pid)."""
    return start_time(pid) == started


@dataclass(frozen=True)
class Loaded:
    """One connection an owner loaded: which backend (name, options) and the connection's name."""

    backend: str
    options: tuple[tuple[str, str], ...]
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "options": dict(self.options), "name": self.name}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Loaded:
        opts = obj.get("options") or {}
        if not isinstance(opts, Mapping) or not all(isinstance(v, str) for v in opts.values()):
            raise ValueError("options must map strings to strings")
        backend, name = obj.get("backend"), obj.get("name")
        if not isinstance(backend, str) or not isinstance(name, str) or not name:
            raise ValueError("backend and name must be strings")
        return cls(backend, tuple(sorted((str(k), v) for k, v in opts.items())), name)


@dataclass
class _Use:
    backend: Any  # btns_vici.backend.Backend (not imported: backend imports nothing of ours)
    sockets: dict[tuple[int, int], int] = field(default_factory=dict)  # socket identity -> fd


class Owner:
    """This process's owned connections, its record and its reaper."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.started = start_time(self.pid) or 0
        self.uses: dict[Loaded, _Use] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._reaper: threading.Thread | None = None
        self._swept = False
        self._recording = True

    @property
    def record_path(self) -> Path:
        return state_dir() / f"{self.pid}-{self.started}.json"

    # -- the record -------------------------------------------------------------------------------
    def _write_record(self) -> None:
        if not self._recording:
            return
        path = self.record_path
        if not self.uses:
            _remove_record(path)
            return
        body = {
            "pid": self.pid,
            "start": self.started,
            "boot": _boot_id(),
            "pidns": _pidns(),
            "loaded": [lo.to_json() for lo in self.uses],
        }
        try:
            for attempt in (0, 1):
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                try:
                    tmp.write_text(json.dumps(body))
                    os.replace(tmp, path)
                    break
                except FileNotFoundError:  # another owner removed the empty directory just now
                    if attempt:
                        raise
        except OSError as exc:
            self._recording = False
            log.warning("cannot record owned connections in %s (%s): released at exit only", path.parent, exc)

    # -- owning and releasing -------------------------------------------------------------------
    def own(self, be: Any, name: str, sock: Any) -> None:
        """Record that ``sock`` uses connection ``name`` of ``be`` (call before loading it)."""
        from .sockets import resolve_fd, socket_key

        if not OWNABLE.fullmatch(name):
            return  # nothing loaded, the operator's connection (conn/child), the learner's: not ours
        if not self._swept:
            self._swept = True
            sweep_stale()
        lo = Loaded(be.name, tuple(sorted(be.options.items())), name)
        fd, key = resolve_fd(sock), socket_key(sock)
        with self._lock:
            new = lo not in self.uses
            use = self.uses.setdefault(lo, _Use(be))
            use.sockets[key] = fd
            if new:
                self._write_record()
            self._start_reaper()

    def hold(self, be: Any, name: str) -> None:
        """Record ``name`` as ours without a socket (btnsd: its clients' ownership is its own);
        released by :meth:`unhold`, at exit, or after a crash by the next :func:`sweep_stale`."""
        if not OWNABLE.fullmatch(name):
            return
        lo = Loaded(be.name, tuple(sorted(be.options.items())), name)
        with self._lock:
            use = self.uses.setdefault(lo, _Use(be))
            if HELD not in use.sockets:
                use.sockets[HELD] = -1
                self._write_record()

    def unhold(self, be: Any, name: str) -> None:
        """Forget a :meth:`hold` (the caller releases the connection itself)."""
        lo = Loaded(be.name, tuple(sorted(be.options.items())), name)
        with self._lock:
            use = self.uses.get(lo)
            if use is None:
                return
            use.sockets.pop(HELD, None)
            if not use.sockets:
                del self.uses[lo]
                self._write_record()

    def adopt(self, be: Any, sock: Any, policy_name: str | None) -> None:
        """``sock`` (a connection admitted by an event loop, say) uses the connection its SA belongs
        to, named by its pToken's policyName ("conn/child"), if that connection is one we own."""
        from .sockets import resolve_fd, socket_key

        conn = (policy_name or "").partition("/")[0]
        if not OWNABLE.fullmatch(conn):
            return
        lo = Loaded(be.name, tuple(sorted(be.options.items())), conn)
        with self._lock:
            use = self.uses.get(lo)
            if use is not None:
                use.sockets[socket_key(sock)] = resolve_fd(sock)

    def owned(self) -> list[Loaded]:
        with self._lock:
            return list(self.uses)

    def reap(self) -> list[str]:
        """Release connections none of whose sockets is open any more; their names."""
        with self._lock:
            if not self.uses:
                return []
            live: set[tuple[int, int]] | None = None
            for use in self.uses.values():
                for key, fd in list(use.sockets.items()):
                    if fd < 0 or _fd_is(fd, key):  # held (no socket), or open
                        continue
                    if live is None:
                        live = open_socket_keys()  # a dup may hold it under another descriptor
                    if key not in live:
                        del use.sockets[key]
            done = [(lo, use) for lo, use in self.uses.items() if not use.sockets]
            for lo, _ in done:
                del self.uses[lo]
            if done:
                self._write_record()
        for lo, use in done:
            _release(use.backend, lo)
        return [lo.name for lo, _ in done]

    def release_all(self) -> None:
        """At exit: release everything this process owns (what no other live owner lists)."""
        if os.getpid() != self.pid:
            return  # a forked child: its parent owns these
        with self._lock:
            done = list(self.uses.items())
            self.uses.clear()
        for lo, use in done:
            _release(use.backend, lo)
        _remove_record(self.record_path)

    def _start_reaper(self) -> None:
        if self._reaper is not None and self._reaper.is_alive():
            return
        self._reaper = threading.Thread(target=self._run, name="btns-lifecycle-reaper", daemon=True)
        self._reaper.start()

    def _run(self) -> None:
        while not self._wake.wait(REAP_INTERVAL):
            try:
                self.reap()
            except Exception:  # never kill the reaper: the next tick retries
                log.exception("lifecycle reaper")
            with self._lock:
                if not self.uses:
                    self._reaper = None
                    return


def _remove_record(path: Path) -> None:
    """Remove a record, and the state directory once it is empty (nothing left behind)."""
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # fails while other owners' records are there
        if path.parent.parent.name == "btns-vici":  # the default /run/btns-vici, if we made it and it is empty
            path.parent.parent.rmdir()


def _fd_is(fd: int, key: tuple[int, int]) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == key


def _records() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    directory = state_dir()
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(obj, dict):
            out.append((path, obj))
    return out


def _record_alive(obj: Mapping[str, Any]) -> bool | None:
    """True/False whether the record's owner runs; None: cannot tell (another pid namespace)."""
    pid, started = obj.get("pid"), obj.get("start")
    if not isinstance(pid, int) or not isinstance(started, int):
        return False
    if obj.get("boot") != _boot_id():
        return False  # written before a reboot
    if obj.get("pidns") != _pidns():
        return None
    return alive(pid, started)


def _loaded_of(obj: Mapping[str, Any]) -> list[Loaded]:
    out = []
    for item in obj.get("loaded") or []:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            out.append(Loaded.from_json(item))
    return out


def _listed_by_others(lo: Loaded) -> bool:
    """Whether a live owner other than us (or one we cannot judge) still lists ``lo``."""
    me = os.getpid()
    for _, obj in _records():
        if obj.get("pid") == me and obj.get("pidns") == _pidns():
            continue
        if _record_alive(obj) is not False and lo in _loaded_of(obj):
            return True
    return False


def _release(be: Any, lo: Loaded) -> bool:
    if _listed_by_others(lo):
        log.info("%s: still used by another process, kept", lo.name)
        return False
    try:
        be.release(lo.name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):  # the daemon is gone, and with it what it loaded
            log.info("%s not unloaded: %s", lo.name, exc)
        else:
            log.warning("could not unload %s: %s", lo.name, exc)
        return False
    log.info("unloaded %s: its last socket closed", lo.name)
    _unload_keys(be)
    return True


def _unload_keys(be: Any) -> None:
    """strongSwan: the host keys ``load-key`` loaded go with the daemon's last ``btns-`` connection."""
    if be.name != "strongswan":
        return  # pluto reads keys from its own store: nothing loaded per connection
    from .plugins import get_plugin_manager
    from .strongswan.keys import unload_unused

    try:
        plugin = get_plugin_manager().get_plugin("strongswan")
        if plugin is None:
            return  # no strongSwan backend registered: nothing of ours was loaded into charon
        session = plugin.context(be.options).session
        gone = unload_unused(session, be.options)
    except OSError as exc:
        log.warning("could not unload the library's keys: %s", exc)
        return
    if gone:
        log.info("unloaded keys %s: no btns- connection left", ", ".join(gone))


def sweep_stale() -> list[str]:
    """Release what dead owners (kill -9) left loaded; remove their records. The names released."""
    from .plugins import get_backend

    released = []
    for path, obj in _records():
        if _record_alive(obj) is not False:
            continue
        _remove_record(path)  # first: _listed_by_others must not count the dead owner
        for lo in _loaded_of(obj):
            try:
                be = get_backend(lo.backend, dict(lo.options))
            except OSError as exc:  # e.g. the daemon is gone: so is what it had loaded
                log.info("stale %s: backend %s unavailable (%s)", lo.name, lo.backend, exc)
                continue
            if _release(be, lo):
                released.append(lo.name)
    return released


_owner = Owner()


def owner() -> Owner:
    return _owner


def own(be: Any, name: str, sock: Any) -> None:
    """Module-level :meth:`Owner.own` of this process."""
    _owner.own(be, name, sock)


def hold(be: Any, name: str) -> None:
    """Module-level :meth:`Owner.hold` of this process."""
    _owner.hold(be, name)


def unhold(be: Any, name: str) -> None:
    """Module-level :meth:`Owner.unhold` of this process."""
    _owner.unhold(be, name)


def adopt(be: Any, sock: Any, policy_name: str | None) -> None:
    """Module-level :meth:`Owner.adopt` of this process."""
    _owner.adopt(be, sock, policy_name)


@atexit.register
def _at_exit() -> None:
    _owner.release_all()


@forksafe.in_child
def _reset_after_fork() -> None:
    global _owner
    _owner = Owner()  # the parent owns what it loaded; the child owns nothing yet
