"""The state file of a persistent testbed (``btns testbed up``): what to find and what to tear down.

Each charon is recorded with its pid AND its start time (field 22 of /proc/PID/stat),
so ``down`` never signals a process that merely reuses a recorded pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_STATE = "/run/btns-vici/testbed.json"
STATE_ENV = "BTNS_TESTBED_STATE"


def state_path(explicit: str | None = None) -> Path:
    """``--state``, else ``$BTNS_TESTBED_STATE``, else /run/btns-vici/testbed.json."""
    return Path(explicit or os.environ.get(STATE_ENV) or DEFAULT_STATE)


@dataclass(frozen=True)
class PeerState:
    name: str
    netns: str
    pid: int
    starttime: int
    vici_socket: str
    v4: str
    v6: str
    v4_plain: str
    v6_plain: str


@dataclass(frozen=True)
class TestbedState:
    __test__ = False  # not a pytest test class

    tag: str
    workdir: str
    connection: str
    created: float
    peers: tuple[PeerState, ...] = field(default_factory=tuple)

    @property
    def namespaces(self) -> list[str]:
        return [p.netns for p in self.peers]

    def peer_in(self, netns_name: str) -> PeerState | None:
        return next((p for p in self.peers if p.netns == netns_name), None)


def save(state: TestbedState, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, path)


def load(path: Path) -> TestbedState | None:
    """The recorded testbed, or None when there is no state file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    peers = tuple(PeerState(**p) for p in data.pop("peers"))
    return TestbedState(peers=peers, **data)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of ``pid`` from /proc/PID/stat, or None when there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[19])


def starttime(pid: int) -> int | None:
    """The start time of a live (not zombie) process, or None when there is none."""
    st = _stat(pid)
    return None if st is None or st[0] in ("Z", "X") else st[1]


def alive(pid: int, start: int) -> bool:
    """True when ``pid`` is still the very process that was recorded."""
    return starttime(pid) == start


def stop(procs: list[tuple[int, int]], timeout: float = 5.0) -> list[int]:
    """SIGTERM the recorded (pid, start time) processes still running, SIGKILL after ``timeout``.

    Returns the pids that were stopped. Each signal goes through a pidfd opened before the
    start time is checked, so it cannot reach another process that reused the pid. They are
    signalled together, then awaited together, until their new parent has reaped them
    (pid 1 here polls for zombies about every 2 s).
    """
    pidfds: dict[int, tuple[int, int]] = {}
    try:
        for pid, start in procs:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if alive(pid, start):
                pidfds[pid] = (fd, start)
            else:
                os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, (fd, start) in pidfds.items():
                if alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                        signal.pidfd_send_signal(fd, sig)
            if _wait(lambda: not any(alive(pid, start) for pid, (_, start) in pidfds.items()), timeout):
                break
        else:
            raise TimeoutError(f"processes {sorted(pidfds)} did not stop after SIGKILL")
        _wait(lambda: not any(_still_listed(pid, start) for pid, (_, start) in pidfds.items()), 3.0)
        return list(pidfds)
    finally:
        for fd, _ in pidfds.values():
            os.close(fd)


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _still_listed(pid: int, start: int) -> bool:
    """Still in /proc (running or a zombie not reaped yet)."""
    st = _stat(pid)
    return st is not None and st[1] == start
