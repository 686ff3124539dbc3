"""Fixtures for the packaging tests: the sdist and wheel built from this tree, and a venv made
from Debian's own /usr/bin/python3 (the stock interpreter an operator has) with the wheel in it.

The venv lives in a world-readable temporary directory so that tests may run it as ``nobody``.
Building needs the package index or pip's cache (setuptools>=77 in pip's isolated build env).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Venv:
    prefix: Path
    install_seconds: float

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.prefix / "bin" / name


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """``python -m build`` of this tree: one sdist, one wheel."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel)


@pytest.fixture(scope="session")
def system_venv(dists: Dists) -> Iterator[Venv]:
    """A venv of Debian's /usr/bin/python3 with the wheel and its ``cabi`` extra installed (timed)."""
    if not SYSTEM_PYTHON.exists():
        pytest.fail("needs Debian's python3 and python3-venv (scripts/setup.sh installs them)")
    base = Path(tempfile.mkdtemp(prefix="btns-sysvenv-"))
    base.chmod(0o755)
    prefix = base / "env"
    try:
        _run([str(SYSTEM_PYTHON), "-m", "venv", str(prefix)])
        start = time.monotonic()
        _run([str(prefix / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"{dists.wheel}[cabi]"])
        yield Venv(prefix, time.monotonic() - start)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def minimal_env(**extra: str) -> dict[str, str]:
    """No venv activation, no PYTHONPATH: what an operator's shell has."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    env.update(extra)
    return env
