"""The `btns` command driven as a user would: a subprocess, against the session testbed.

The testbed fixtures come from btns-lab's pytest plugin (btns_lab.pytest_plugin; they raise, so
the tests ERROR, when root, iproute2, openssl or strongSwan are missing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

#: The installed console script when there is one, else the module (identical behaviour).
SCRIPT = Path(sys.executable).with_name("btns")
BTNS = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "btns_vici.cli"]


def btns(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``btns ARGS`` and return the finished process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*prefix, *BTNS, *args], capture_output=True, text=True, timeout=timeout, env=full_env, check=False
    )


def btns_json(*args: str, code: int = 0, **kw: Any) -> Any:
    """Run ``btns --json ARGS``, assert the exit code and return the parsed JSON."""
    res = btns("--json", *args, **kw)
    assert res.returncode == code, f"exit {res.returncode}, stderr: {res.stderr}"
    return json.loads(res.stdout)


def peer_args(peer: Any) -> list[str]:
    """Global options selecting one testbed peer's charon and namespace."""
    return ["--netns", peer.netns, "--vici-socket", peer.vici_path]


@pytest.fixture
def conn(tb):
    """A BTNS raw-key connection established between the peers (unloaded by ``tb``)."""
    name = f"cli{os.getpid() % 1000}"
    tb.up(name, "rawkey")
    return name
