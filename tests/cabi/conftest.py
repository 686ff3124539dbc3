"""Fixtures for the C ABI tests: the package installed into a fresh prefix, and a C compiler.

``cabi_prefix`` copies the source tree to a temporary directory and installs it,
non-editable, into a new virtual environment there, then builds the C ABI into
that environment (``pip install '.[cabi]'`` and ``btns-cabi build``: the steps a
user takes; pip fetches the build and runtime requirements from the package
index). Every C program is then compiled as the README says:
``cc -std=c99 -Wall -Wextra -Werror prog.c $(pkg-config --cflags --libs btns-ipsec)``
with PKG_CONFIG_PATH=<prefix>/lib/pkgconfig, and run with a minimal environment
(no virtualenv activation, no LD_LIBRARY_PATH, no PYTHONPATH).

``BTNS_CABI_PREFIX=/path/to/env`` reuses an environment that already has the
package and the C ABI installed (e.g. the dev ``.venv`` after scripts/setup.sh) and
skips the install steps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
C_DIR = Path(__file__).resolve().parent / "c"
EXAMPLES = ROOT / "examples" / "c"
CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror")
#: Where no backend daemon answers: the library must report ECONNREFUSED, not hang or crash.
NO_DAEMON = {"BTNS_BACKEND": "strongswan", "BTNS_VICI_SOCKET": "/nonexistent/btns-cabi-test.vici"}

_COPY = ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "src", "examples")


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "build")
    for name in _COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="session")
def cabi_prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An environment prefix with btns-vici installed (non-editable) by pip."""
    reuse = os.environ.get("BTNS_CABI_PREFIX")
    if reuse:
        return Path(reuse)
    base = tmp_path_factory.mktemp("btns-cabi")
    tree, prefix = base / "src", base / "env"
    tree.mkdir()
    _copy_tree(tree)
    venv.create(prefix, with_pip=True, symlinks=True)
    proc = subprocess.run(
        [
            str(prefix / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{tree}[cabi]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    proc = subprocess.run(
        [str(prefix / "bin" / "btns-cabi"), "build"], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"btns-cabi build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return prefix


def pkg_config(prefix: Path, *args: str) -> list[str]:
    out = subprocess.run(
        ["pkg-config", *args, "btns-ipsec"],
        env={**os.environ, "PKG_CONFIG_PATH": str(prefix / "lib" / "pkgconfig")},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def run_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: the program must find its library and Python by itself."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    # The test session's private state directories (btns_lab's pytest plugin): nothing under /run.
    env.update({k: os.environ[k] for k in ("BTNS_CACHE_DIR", "BTNS_STATE_DIR") if k in os.environ})
    env.update(extra or {})
    return env


Compiler = Callable[[Path], Path]


@pytest.fixture(scope="session")
def compile_c(cabi_prefix: Path, tmp_path_factory: pytest.TempPathFactory) -> Compiler:
    """compile_c(source) -> executable, built with the flags pkg-config gives for the installed library."""
    if shutil.which("cc") is None or shutil.which("pkg-config") is None:
        pytest.fail("the C ABI tests need cc and pkg-config (Debian: gcc pkg-config)")
    out_dir = tmp_path_factory.mktemp("btns-cabi-bin")
    flags = pkg_config(cabi_prefix, "--cflags", "--libs")

    def build(source: Path) -> Path:
        exe = out_dir / source.stem
        proc = subprocess.run(
            ["cc", *CFLAGS, str(source), *flags, "-o", str(exe)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, f"cc {source.name} failed:\n{proc.stderr}"
        return exe

    return build


def run(
    exe: Path | list[str], *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    cmd = [str(exe)] if isinstance(exe, Path) else list(exe)
    return subprocess.run([*cmd, *args], env=run_env(env), capture_output=True, text=True, timeout=timeout, check=False)


def fields(output: str) -> dict[str, str]:
    """'name: value' lines -> {name: value} (the examples print one attribute per line)."""
    result = {}
    for line in output.splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            result[name] = value
    return result
