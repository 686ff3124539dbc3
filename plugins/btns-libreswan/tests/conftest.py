"""Fixtures: a live two-pluto lab. Missing prerequisites FAIL the tests, never skip them."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from btns_libreswan.lab import Lab, bring_up, build
from btns_libreswan.runner import missing_prerequisites


def require_root_and_tools() -> None:
    """pytest.fail (not skip) naming what a libreswan test lacks."""
    problems = missing_prerequisites()
    if problems:
        pytest.fail("libreswan prerequisites missing: " + "; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _private_key_dir() -> Iterator[None]:
    """The backend notes NULL peers in the known-peers store: keep it out of /var/lib/btns-vici."""
    d = tempfile.mkdtemp(prefix="btns-lsw-keys-")
    mp = pytest.MonkeyPatch()
    mp.setenv("BTNS_KEY_DIR", d)
    yield
    mp.undo()
    shutil.rmtree(d, ignore_errors=True)


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
