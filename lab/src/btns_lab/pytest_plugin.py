"""pytest fixtures that build testbeds (entry point group ``pytest11``: installing btns-lab registers them).

* ``testbed`` (session): the host testbed, two charons in ``btns-tb-*`` namespaces
  (:class:`btns_lab.testbed.Testbed`); ``tb``: the same, with every connection a test
  loaded unloaded afterwards (and a dead charon restarted);
* ``backend_a`` / ``backend_b``: the strongSwan backend of each peer;
* ``pair_factory``: ``connected_pair(proto, family, port=0, plain=False)`` -> (socket in A,
  socket in B), closed afterwards;
* ``lab`` (module): two plutos with nullc/pskc/rsac/anyc IKE SAs (:mod:`btns_lab.libreswan`).

Missing prerequisites (root, iproute2, openssl, strongSwan, libreswan's packages) make the
fixtures raise or ``pytest.fail``: the tests ERROR or FAIL, they are never skipped.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from btns_vici import dataplane
from btns_vici.backend import Backend
from btns_vici.plugins import get_backend, get_plugin_manager

from .libreswan.lab import Lab, bring_up, build
from .libreswan.runner import missing_prerequisites
from .testbed import Peer, Testbed, connected_pair

PairFactory = Callable[..., tuple[socket.socket, socket.socket]]


def _forget(p: Peer) -> None:
    """Drop the library's cached sessions and data-plane state of a peer that goes away."""
    plugin = get_plugin_manager().get_plugin("strongswan")
    plugin.forget(p.options)
    dataplane.forget(p.netns)


@pytest.fixture(autouse=True, scope="session")
def _private_run_state() -> Iterator[None]:
    """The library's shared state under /run/btns-vici (the coverage cache, the lifecycle's owner
    records) goes to a directory of this test session, removed afterwards: a test run leaves
    nothing on the host and never reads another run's state. Subprocesses inherit it."""
    d = tempfile.mkdtemp(prefix="btns-run-")
    mp = pytest.MonkeyPatch()
    mp.setenv("BTNS_CACHE_DIR", str(Path(d) / "cache"))
    mp.setenv("BTNS_STATE_DIR", str(Path(d) / "owned"))
    yield
    mp.undo()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """Two charons in btns-tb-* namespaces for the whole session (raises when a prerequisite is missing)."""
    with Testbed() as tb:
        yield tb
        for p in tb.peers:
            _forget(p)


@pytest.fixture
def tb(testbed: Testbed) -> Iterator[Testbed]:
    """The session testbed, with every connection a test loaded unloaded afterwards."""
    yield testbed
    for p in testbed.peers:
        if p.proc is None or p.proc.poll() is not None:
            testbed.restart_charon(p)
    for name in list(testbed.conns):
        testbed.unload_conn(name)


@pytest.fixture
def backend_a(tb: Testbed) -> Backend:
    """The strongSwan backend of peer A (its VICI socket and namespace)."""
    return get_backend("strongswan", tb.a.options)


@pytest.fixture
def backend_b(tb: Testbed) -> Backend:
    """The strongSwan backend of peer B (its VICI socket and namespace)."""
    return get_backend("strongswan", tb.b.options)


@pytest.fixture
def pair_factory(tb: Testbed) -> Iterator[PairFactory]:
    """connected_pair(proto, family, port=0, plain=False) -> (socket in A, socket in B); closed afterwards."""
    made: list[socket.socket] = []

    def make(proto: int, family: int, port: int = 0, plain: bool = False) -> tuple[socket.socket, socket.socket]:
        a, b = connected_pair(tb, proto, family, port, plain)
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


def require_root_and_tools() -> None:
    """pytest.fail (not skip) naming what a libreswan test lacks."""
    problems = missing_prerequisites()
    if problems:
        pytest.fail("libreswan prerequisites missing: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Two plutos with nullc/pskc/rsac/anyc IKE SAs established (CHILD SAs fail: no ESP here)."""
    require_root_and_tools()
    work = Path(tempfile.mkdtemp(prefix="btns-lsw-test-"))
    try:
        the_lab = build(secrets.token_hex(2), work, pairs=6)  # pairs 4, 5: free for enforce tests
    except Exception as exc:  # turned into a test failure with the reason
        shutil.rmtree(work, ignore_errors=True)
        pytest.fail(f"could not start two plutos: {exc}", pytrace=False)
    try:
        up = bring_up(the_lab)
        if sorted(up) != sorted(("nullc", "pskc", "rsac", "anyc")):
            pytest.fail(f"IKE SAs not established: only {up}\n{the_lab.a.tail()}", pytrace=False)
        yield the_lab
    finally:
        the_lab.pair.teardown()
        shutil.rmtree(work, ignore_errors=True)
