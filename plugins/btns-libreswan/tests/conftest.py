"""The libreswan tests' own set-up (the lab fixtures come from btns-lab's pytest plugin)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_key_dir() -> Iterator[None]:
    """The backend notes NULL peers in the known-peers store: keep it out of /var/lib/btns-vici."""
    d = tempfile.mkdtemp(prefix="btns-lsw-keys-")
    mp = pytest.MonkeyPatch()
    mp.setenv("BTNS_KEY_DIR", d)
    yield
    mp.undo()
    shutil.rmtree(d, ignore_errors=True)
